"""Selection of the k smallest scores, compiled (numba): the masks of the torch code, to the bit.

``smallest_keep``: the k smallest of a whole tensor (SparseGPT's unstructured mask of one block
of columns), where ``llm_prune.magnitude.unstructured_keep``'s general machinery (tables,
merges, tensors of keys) costs several times more on blocks of this size.
``row_smallest_keep``: the k smallest of every row (Wanda's and RIA's per-output comparison
group), rows in parallel, where torch's ``kthvalue`` runs on one thread.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from llm_prune.kernels import numba_start

numba_start.start()  # numba loads its registries once, without scipy.linalg (see numba_start)


def supported(score: torch.Tensor) -> bool:
    return score.device.type == "cpu" and score.dtype == torch.float32 and score.dim() == 2


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


def row_smallest_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` smallest scores of every row (0 < k < columns; fp32, CPU), ties
    pruned from the left, -0.0 equal to 0.0: ``~llm_prune.methods.wanda.smallest_per_row`` to the bit."""
    keep = torch.empty(score.shape, dtype=torch.bool)
    _row_smallest_keep(score.contiguous().view(torch.int32).numpy(), k, keep.numpy())
    return keep


@nb.njit(cache=True, nogil=True, inline="always")
def _order_key(b):
    """The float with bits ``b`` (int32) as an integer in the floats' order, -0.0 as 0.0."""
    u = np.int64(b) & 0xFFFFFFFF
    if u == 0x80000000:
        u = 0
    return 0xFFFFFFFF - u if u >= 0x80000000 else u | 0x80000000


@nb.njit(parallel=True, cache=True, nogil=True)
def _row_smallest_keep(bits, k, keep):
    """Per row, a radix selection of the k-th smallest key, 11 + 11 + 10 bits (histograms small
    enough to clear per row), then one pass marking what is below it and the leftmost ties."""
    rows, cols = bits.shape
    for r in nb.prange(rows):
        hist = np.zeros(2048, dtype=np.int64)
        prefix, below = np.int64(0), np.int64(0)  # key bits chosen so far; keys below that prefix
        for shift, width in ((21, 11), (10, 11), (0, 10)):
            hist[:] = 0
            for j in range(cols):
                key = _order_key(bits[r, j])
                if (key >> (shift + width)) == prefix:
                    hist[(key >> shift) & ((1 << width) - 1)] += 1
            b = 0
            while below + hist[b] < k:
                below += hist[b]
                b += 1
            prefix = (prefix << width) | b
        ties = k - below  # keys equal to the k-th to prune, the leftmost first
        for j in range(cols):
            key = _order_key(bits[r, j])
            prune = key < prefix or (key == prefix and ties > 0)
            if key == prefix and prune:
                ties -= 1
            keep[r, j] = not prune
