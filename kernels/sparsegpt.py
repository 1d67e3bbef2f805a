"""SparseGPT's column loop inside one block of columns, compiled (numba), rows in parallel.

``llm_prune.methods.sparsegpt`` visits the columns of a block one at a time: prune the column,
spread its error over the columns still to come of the same row. In torch that is ~10 small
tensor operations per column (150,000 columns for SmolLM2), whose per-call cost was most of the
solver's time. Each row's updates touch that row only, so here the loop runs per row, rows in
parallel, and every weight goes through the same float32 operations in the same order as the
torch loop (a product rounded, then subtracted: no fused multiply-add), so the results are
the same bits; tests compare the two.

``smallest_keep`` chooses an unstructured block's mask (the k smallest scores of the block) in
three passes of one loop, where ``llm_prune.magnitude.unstructured_keep``'s general machinery
(tables, merges, tensors of keys) costs several times more on blocks of this size.
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


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _sub_scaled(x, y, e):
    """x -= e·y, a product rounded then subtracted (on 1-D slices LLVM vectorises it)."""
    for j in range(x.size):
        x[j] = x[j] - e * y[j]


@nb.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _solve_block(W, H, keep, err, n, m):
    rows, B = W.shape
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for r in nb.prange(rows):
        score = np.empty(max(m, 1), dtype=np.float32)
        for i in range(B):
            if m > 0 and i % m == 0:
                for a in range(m):
                    w = W[r, i + a]
                    d = H[i + a, i + a]
                    score[a] = (w * w) / (d * d)
                for a in range(m):
                    beaten = 0
                    for b in range(m):
                        if (b < a and score[b] >= score[a]) or (b > a and score[b] > score[a]):
                            beaten += 1
                    keep[r, i + a] = beaten < n
            w = W[r, i]
            q = w * (one if keep[r, i] else zero)
            e = (w - q) / H[i, i]
            _sub_scaled(W[r, i:], H[i, i:], e)
            W[r, i] = q
            err[r, i] = e


def smallest_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` smallest magnitudes of ``score`` (fp32, CPU), ties pruned in
    row-major order: the mask of ``unstructured_keep`` for the same count, to the bit."""
    keep = torch.empty(score.shape, dtype=torch.bool)
    _smallest_keep(score.contiguous().view(torch.int32).numpy().reshape(-1), k, keep.numpy().reshape(-1))
    return keep


@nb.njit(cache=True, nogil=True)
def _smallest_keep(bits, k, keep):
    """Radix selection on magnitude keys (sign cleared: ordered like |x|): the high 15 bits' histogram
    finds the bin of the k-th smallest, the low 16 bits' within that bin the key; then every
    weight below it is pruned, and the first ``k - below`` equal to it."""
    n = bits.size
    if k <= 0 or k >= n:
        keep[:] = k <= 0
        return
    clear = np.int32(0x7FFFFFFF)
    high = np.zeros(1 << 15, dtype=np.int64)
    for i in range(n):
        high[(bits[i] & clear) >> 16] += 1
    below, hb = 0, 0
    while below + high[hb] < k:
        below += high[hb]
        hb += 1
    low = np.zeros(1 << 16, dtype=np.int64)
    for i in range(n):
        key = bits[i] & clear
        if key >> 16 == hb:
            low[key & 0xFFFF] += 1
    lb = 0
    while below + low[lb] < k:
        below += low[lb]
        lb += 1
    key_k = (hb << 16) | lb
    ties = k - below
    for i in range(n):
        key = bits[i] & clear
        keep[i] = key > key_k
        if key == key_k:  # rare: no branch to mispredict on the others
            keep[i] = ties <= 0
            ties -= 1
