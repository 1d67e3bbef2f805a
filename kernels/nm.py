"""Fused CPU kernels for N:M magnitude pruning, in place, over the integer view of the weights.

``prune_nm_(w, n, m, out=None)`` keeps the ``n`` largest magnitudes of every ``m`` consecutive
weights, earlier weight first on ties: ``llm_prune.magnitude.nm_keep`` exactly, bit for bit
(tests check it), one pass that writes nothing but the pruned weights. 2:4 of 16-bit weights,
the pattern sparse tensor cores run, has its own word-wide kernel. Conventions as in
``kernels.magnitude``: pruned weights become +0, writes go to ``w`` or to ``out``, and the
zeros written are returned.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .magnitude import CHUNK, LOCK, NARROW_CLEAR, WIDE_CLEAR, bits, out_bits, sign_clear
from llm_prune.kernels import numba_start

numba_start.start()  # numba loads its registries once, without scipy.linalg (see numba_start)


def prune_nm_(w: torch.Tensor, n: int, m: int, out: torch.Tensor | None = None) -> int:
    """Keep the n largest of every m consecutive weights along the last dim, into ``out``
    (default: in place). Returns the zeros in the result."""
    x, y = bits(w), out_bits(w, out)
    if x.size == 0:
        return 0
    with LOCK:
        if (n, m) == (2, 4) and x.itemsize == 2 and x.size % 4 == 0:  # four 16-bit weights per word
            return int(_prune_24_words(x.view(np.uint64), None if y is None else y.view(np.uint64)))
        return int(_prune_24(x, y, sign_clear(x)) if (n, m) == (2, 4) else _prune_nm(x, y, n, m))


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_nm(x, y, n, m):
    clear = np.int64(NARROW_CLEAR) if x.itemsize == 2 else np.int64(WIDE_CLEAR)
    groups = x.size // m
    per_chunk = max(1, CHUNK // m)
    nchunks = (groups + per_chunk - 1) // per_chunk
    zeros = np.zeros(nchunks, dtype=np.int64)
    zero = x.dtype.type(0)
    if y is None:
        dst = x
    else:
        dst = y
    for c in nb.prange(nchunks):
        keys = np.empty(m, dtype=np.int64)
        z = 0
        for g in range(c * per_chunk, min((c + 1) * per_chunk, groups)):
            base = g * m
            for i in range(m):
                keys[i] = np.int64(x[base + i]) & clear
            for i in range(m):
                beaten = 0  # a later weight beats this one by being larger, an earlier by being as large
                for j in range(i):
                    beaten += keys[j] >= keys[i]
                for j in range(i + 1, m):
                    beaten += keys[j] > keys[i]
                v = x[base + i] if beaten < n else zero
                dst[base + i] = v
                z += (np.int64(v) & clear) == 0
        zeros[c] = z
    return zeros.sum()


@nb.njit(cache=True, nogil=True)
def _keep_2of4(seg, out, clear):
    # 2:4, the common case, unrolled: branch-free rank counts the compiler can vectorise.
    if out is None:  # an if on the argument: numba prunes the dead branch at compile time
        dst = seg
    else:
        dst = out
    zero = seg.dtype.type(0)
    z = 0
    for g in range(seg.size // 4):
        b = g * 4
        v0, v1, v2, v3 = seg[b], seg[b + 1], seg[b + 2], seg[b + 3]
        k0, k1, k2, k3 = v0 & clear, v1 & clear, v2 & clear, v3 & clear
        r0 = np.int32(k1 > k0) + np.int32(k2 > k0) + np.int32(k3 > k0)
        r1 = np.int32(k0 >= k1) + np.int32(k2 > k1) + np.int32(k3 > k1)
        r2 = np.int32(k0 >= k2) + np.int32(k1 >= k2) + np.int32(k3 > k2)
        r3 = np.int32(k0 >= k3) + np.int32(k1 >= k3) + np.int32(k2 >= k3)
        v0 = v0 if r0 < 2 else zero
        v1 = v1 if r1 < 2 else zero
        v2 = v2 if r2 < 2 else zero
        v3 = v3 if r3 < 2 else zero
        dst[b], dst[b + 1], dst[b + 2], dst[b + 3] = v0, v1, v2, v3
        z += np.int32((v0 & clear) == 0) + np.int32((v1 & clear) == 0) + np.int32((v2 & clear) == 0) \
            + np.int32((v3 & clear) == 0)
    return z


# 2:4 of 16-bit weights, one 64-bit word (one group of four) at a time, SIMD within the word:
# the strided loads of the kernel above do not vectorise, these word-wide shifts and
# subtractions do (scripts/bench_kernels.py compares them). Field i of a word is
# weight i of its group (little-endian). With the sign bits cleared, (a | 0x8000) - b has its
# field's bit 15 set exactly when a >= b, and never borrows from the next field.
_FIELD_HIGH = np.uint64(0x8000800080008000)
_FIELD_KEY = np.uint64(0x7FFF7FFF7FFF7FFF)
_FIELD_ONE = np.uint64(0x0001000100010001)
# The word rotated by 16*d bits puts weight (i+d) % 4 in field i. Where (i+d) % 4 < i the other
# weight is earlier and beats weight i when >=, elsewhere when > (masks.nm_keep's tie rule).
_EARLIER = (np.uint64(0x8000000000000000), np.uint64(0x8000800000000000), np.uint64(0x8000800080000000))


@nb.njit(cache=True, nogil=True)
def _keep_2of4_words(seg, out):
    if out is None:
        dst = seg
    else:
        dst = out
    z = 0
    for t in range(seg.size):
        w = seg[t]
        k = w & _FIELD_KEY
        kh = k | _FIELD_HIGH
        beaten = np.uint64(0)  # per field: how many of the group's other weights beat it (0-3)
        for d in range(1, 4):
            earlier = _EARLIER[d - 1]
            r = (k >> np.uint64(16 * d)) | (k << np.uint64(64 - 16 * d))
            ge = ((r | _FIELD_HIGH) - k) & _FIELD_HIGH  # other >= this
            gt = ~(kh - r) & _FIELD_HIGH  # other > this
            beaten += ((ge & earlier) | (gt & ~earlier)) >> np.uint64(15)
        pruned = (beaten >> np.uint64(1)) & _FIELD_ONE  # beaten by 2 or 3
        v = w & ~(pruned * np.uint64(0xFFFF))
        dst[t] = v
        zero = ~(((v & _FIELD_KEY) | _FIELD_HIGH) - _FIELD_ONE) & _FIELD_HIGH  # fields equal to +-0
        z += ((zero >> np.uint64(15)) * _FIELD_ONE) >> np.uint64(48)
    return z


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_24_words(x, y):
    per = CHUNK // 4
    nchunks = (x.size + per - 1) // per
    zeros = np.zeros(nchunks, dtype=np.int64)
    for c in nb.prange(nchunks):
        lo, hi = c * per, min((c + 1) * per, x.size)
        if y is None:
            zeros[c] = _keep_2of4_words(x[lo:hi], None)
        else:
            zeros[c] = _keep_2of4_words(x[lo:hi], y[lo:hi])
    return zeros.sum()


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_24(x, y, clear):
    nchunks = (x.size + CHUNK - 1) // CHUNK  # CHUNK is a multiple of 4: groups never straddle chunks
    zeros = np.zeros(nchunks, dtype=np.int64)
    for c in nb.prange(nchunks):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, x.size)
        if y is None:  # ifs on the arguments, not expressions: numba drops the dead branch
            zeros[c] = _keep_2of4(x[lo:hi], None, clear)
        else:
            zeros[c] = _keep_2of4(x[lo:hi], y[lo:hi], clear)
    return zeros.sum()
