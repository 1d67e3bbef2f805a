"""SparseGPT's column loop inside one block of columns, compiled (numba), tiles of rows in parallel.

``llm_prune.methods.sparsegpt`` visits the columns of a block one at a time: prune the column,
spread its error over the columns still to come of the same row. In torch that is ~10 small
tensor operations per column (150,000 columns for SmolLM2), whose per-call cost was most of the
solver's time. Each row's updates touch that row only, so here the loop runs per tile of rows,
tiles in parallel, and every weight goes through the same float32 operations in the same order as the
torch loop (a product rounded, then subtracted: no fused multiply-add), so the results are
the same bits; tests compare the two.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from llm_prune.kernels import numba_start

numba_start.start()  # numba loads its registries once, without scipy.linalg (see numba_start)


def supported(W1: torch.Tensor) -> bool:
    return W1.device.type == "cpu" and W1.dtype == torch.float32


def solve_block_(W1: torch.Tensor, Hinv1: torch.Tensor, keep1: torch.Tensor, err1: torch.Tensor,
                 n: int = 0, m: int = 0) -> None:
    """The column loop of one block, in place: ``W1`` [rows, B] (fp32) ends with the kept weights
    updated and the pruned ones at ±0, ``err1`` holds each column's scaled error. Unstructured:
    ``keep1`` is given (m = 0). N:M: ``keep1`` is filled group by group from the weights as the
    updates leave them (score w²/Hinv[j, j]², ties keep the earlier weight, as ``nm_keep``)."""
    W, H = W1.numpy(), Hinv1.contiguous().numpy()
    keep, err = keep1.numpy(), err1.numpy()
    _solve_block(W, H, keep, err, n, m)


_TILE = 64  # rows per task: the tile's 128 columns (32 KiB of fp32) stay in the L1 cache


@nb.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _solve_block(W, H, keep, err, n, m):
    rows, B = W.shape
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for t in nb.prange((rows + _TILE - 1) // _TILE):
        r0 = t * _TILE
        R = min(_TILE, rows - r0)
        # The tile transposed: column j of its rows is contiguous, so each update is a vector op
        # over _TILE rows (over a row's remaining columns it was a short loop with a scalar tail).
        # Padding rows are zeros kept as they are: their error is 0 and nothing is copied back.
        Wt = np.zeros((B, _TILE), dtype=np.float32)
        kt = np.ones((B, _TILE), dtype=np.bool_)
        for r in range(R):
            for j in range(B):
                Wt[j, r] = W[r0 + r, j]
                kt[j, r] = keep[r0 + r, j]
        e = np.empty(_TILE, dtype=np.float32)
        score = np.empty(max(m, 1), dtype=np.float32)
        for i in range(B):
            if m > 0 and i % m == 0:
                for r in range(R):
                    for a in range(m):
                        w = Wt[i + a, r]
                        d = H[i + a, i + a]
                        score[a] = (w * w) / (d * d)
                    for a in range(m):
                        beaten = 0
                        for b in range(m):
                            if (b < a and score[b] >= score[a]) or (b > a and score[b] > score[a]):
                                beaten += 1
                        kt[i + a, r] = beaten < n
            d = H[i, i]
            for r in range(_TILE):
                w = Wt[i, r]
                q = w * (one if kt[i, r] else zero)
                e[r] = (w - q) / d
                Wt[i, r] = q
            for j in range(i + 1, B):
                h = H[i, j]
                for r in range(_TILE):
                    Wt[j, r] = Wt[j, r] - e[r] * h
            for r in range(R):
                err[r0 + r, i] = e[r]
        for r in range(R):
            for j in range(B):
                W[r0 + r, j] = Wt[j, r]
                keep[r0 + r, j] = kt[j, r]
