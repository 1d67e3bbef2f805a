"""The gain table of ``llm_prune.permute.refine``, compiled (numba), candidates in parallel.

gain[i, j] = Σ_r max(0, cand[r, i] - nth[r, j]): what group j would keep beyond its current top N
with candidate i in the slot being reassigned. In torch that is a [rows, groups, groups] tensor
built, clamped and summed chunk by chunk, memory-bound; here each (i, j) is one pass over two
contiguous rows of the transposed inputs, accumulated in registers.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from llm_prune.kernels import numba_start

numba_start.start()


def gain_table(cand: torch.Tensor, nth: torch.Tensor) -> torch.Tensor:
    """[groups, groups] sums over rows of max(0, cand[:, i] - nth[:, j]) (inputs [rows, groups])."""
    c = np.ascontiguousarray(cand.t().to(torch.float32).numpy())
    t = np.ascontiguousarray(nth.t().to(torch.float32).numpy())
    out = np.empty((c.shape[0], t.shape[0]), dtype=np.float64)
    _gain(c, t, out)
    return torch.from_numpy(out)


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _gain(c, t, out):
    # fastmath lets the sum over rows vectorise (~20x a strict-order sum): each (i, j) is still
    # summed by one thread, so the table does not depend on the thread count, but its last bits
    # may differ between CPUs of different vector widths, and with them a near-tie of the assignment.
    groups, rows = c.shape
    for i in nb.prange(groups):
        ci = c[i]
        for j in range(t.shape[0]):
            tj = t[j]
            s = np.float32(0.0)
            for r in range(rows):
                d = ci[r] - tj[r]
                s += d if d > 0 else np.float32(0.0)
            out[i, j] = s
