"""Fused CPU kernels for magnitude pruning, in place, over the integer view of the weights.

Magnitude pruning a 7B checkpoint is a memory-bound job: per weight, one look to histogram its
magnitude and one to keep or zero it. Torch composes that from 6-7 full passes (key, max,
bincount, compare, tie positions, multiply, count), each writing a temporary as large as the
tensor. These kernels do it in two passes that write nothing but the pruned weights, in place,
on all cores (numba, parallel over one part per thread or over chunks of ``CHUNK`` weights):

* ``key_histogram(w)``: counts of magnitude keys (``llm_prune.masks.magnitude_key``: |w|'s bit
  pattern, sign cleared) in 2^15 bins: the whole key for fp16/bf16, its high half for fp32
  (``bucket_histogram`` resolves the low half of one bucket). Everything a threshold, a
  finiteness check and the pruning statistics need.
* ``prune_below_(w, key, ties)``: zero every weight whose key is below ``key`` and the first
  ``ties`` (in flat order) whose key equals it: ``masks.threshold_keep`` exactly, including its
  tie order. Parallel chunks learn how many ties they own from a count per chunk.
* ``prune_nm_(w, n, m)``: keep the ``n`` largest magnitudes of every ``m`` consecutive weights,
  earlier weight first on ties: ``masks.nm_keep`` exactly.

Pruned weights become +0 (all bits clear), as everywhere in llm-prune. Compiled on first use and
cached on disk by numba (``cache=True``), so only the first run after installing pays ~seconds.
Tests check every kernel bit for bit against the torch reference in ``llm_prune.masks``.
"""

from __future__ import annotations

import threading

import numba as nb
import numpy as np
import torch

CHUNK = 1 << 18  # weights per parallel work item: small enough to balance 2-64 cores
BINS = 1 << 15
SPAN = 1 << 12  # weights per tie-quota step inside a chunk
# numba's fallback threading layer (workqueue, when neither OpenMP nor TBB is installed) aborts
# the process if two threads launch parallel kernels at once; the loader prunes in a thread.
_LOCK = threading.Lock()
_VIEW = {torch.float16: (torch.int16, 0), torch.bfloat16: (torch.int16, 0), torch.float32: (torch.int32, 16)}


def supported(w: torch.Tensor) -> bool:
    """True when the kernels can take ``w`` (CPU, contiguous, fp16/bf16/fp32)."""
    return w.dtype in _VIEW and w.device.type == "cpu" and w.is_contiguous()


def bits(w: torch.Tensor) -> np.ndarray:
    """The flat integer view of ``w``'s memory (shared, writes go to ``w``)."""
    return w.view(_VIEW[w.dtype][0]).reshape(-1).numpy()


def _clear(x: np.ndarray):
    """The sign-clearing mask in ``x``'s own integer type: the kernels then compare and mask in
    16-bit lanes for 16-bit weights (16 per AVX2 vector instead of 4 int64 ones)."""
    return x.dtype.type(0x7FFF if x.itemsize == 2 else 0x7FFFFFFF)


def key_histogram(w: torch.Tensor) -> np.ndarray:
    """int64 counts of magnitude keys in 2^15 bins (fp32: bins are the keys' high 16 bits)."""
    x = bits(w)
    if x.size == 0:
        return np.zeros(BINS, dtype=np.int64)
    # int32 counters keep each thread's table at 512 KiB (its L2); a part must not overflow them.
    parts = max(nb.get_num_threads(), -(-x.size // (1 << 31)))
    with _LOCK:
        return _histogram(x, _clear(x), _VIEW[w.dtype][1], parts)


def bucket_histogram(w: torch.Tensor, high: int) -> np.ndarray:
    """fp32 only: counts of the low 16 key bits of the weights whose high half is ``high``."""
    with _LOCK:
        return _bucket_histogram(bits(w), high)


def prune_below_(w: torch.Tensor, key: int, ties: int) -> int:
    """Prune in place (see module doc); returns how many ties it pruned (<= ``ties``)."""
    x = bits(w)
    if x.size == 0 or key < 0:
        return 0
    with _LOCK:
        return int(_prune_below(x, _clear(x), x.dtype.type(key), ties))


def prune_nm_(w: torch.Tensor, n: int, m: int) -> None:
    """Keep the n largest of every m consecutive weights along the last dim, in place."""
    x = bits(w)
    if x.size:
        with _LOCK:
            _prune_24(x, _clear(x)) if (n, m) == (2, 4) else _prune_nm(x, n, m)


# -- the kernels ------------------------------------------------------------------------------------------
# Keys: x & clear, the sign bit cleared (0x7FFF for 16-bit views, 0x7FFFFFFF for 32-bit), in x's
# own type. Parallel loops hand each thread a slice and call a plain loop over it that starts at
# 0: numba then drops its negative-index handling and LLVM vectorises the selects and counts
# (the prune select ran 2-10x faster than indexing the whole array from inside the parallel
# loop, in micro-benchmarks on a loaded 2-core machine).

@nb.njit(cache=True, nogil=True)
def _count_keys(seg, clear, shift, rows):
    # 4 interleaved rows: weights of one matrix share few keys, and back-to-back increments of
    # one counter would wait on each other.
    quads = seg.size // 4 * 4
    for i in range(0, quads, 4):
        rows[0, (seg[i] & clear) >> shift] += 1
        rows[1, (seg[i + 1] & clear) >> shift] += 1
        rows[2, (seg[i + 2] & clear) >> shift] += 1
        rows[3, (seg[i + 3] & clear) >> shift] += 1
    for i in range(quads, seg.size):
        rows[0, (seg[i] & clear) >> shift] += 1


@nb.njit(parallel=True, cache=True, nogil=True)
def _histogram(x, clear, shift, parts):
    per = np.zeros((parts, 4, BINS), dtype=np.int32)
    step = (x.size + parts - 1) // parts
    for p in nb.prange(parts):
        _count_keys(x[p * step:min((p + 1) * step, x.size)], clear, shift, per[p])
    out = np.zeros(BINS, dtype=np.int64)
    for p in range(parts):
        for r in range(4):
            out += per[p, r]
    return out


@nb.njit(parallel=True, cache=True, nogil=True)
def _bucket_histogram(x, high):
    nchunks = (x.size + CHUNK - 1) // CHUNK
    per = np.zeros((nchunks, 1 << 16), dtype=np.int32)
    for c in nb.prange(nchunks):
        row = per[c]
        for i in range(c * CHUNK, min((c + 1) * CHUNK, x.size)):
            k = np.int64(x[i]) & 0x7FFFFFFF
            if (k >> 16) == high:
                row[k & 0xFFFF] += 1
    out = np.zeros(1 << 16, dtype=np.int64)
    for c in range(nchunks):
        out += per[c]
    return out


@nb.njit(cache=True, nogil=True)
def _count_equal(seg, clear, key):
    e = 0
    for t in range(seg.size):
        e += (seg[t] & clear) == key
    return e


@nb.njit(cache=True, nogil=True)
def _keep_from(seg, clear, key):
    """Zero every weight whose key is below ``key``: one branch-free select."""
    zero = seg.dtype.type(0)
    for t in range(seg.size):
        v = seg[t]
        seg[t] = v if (v & clear) >= key else zero


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_below(x, clear, key, ties):
    nchunks = (x.size + CHUNK - 1) // CHUNK
    quota = np.zeros(nchunks, dtype=np.int64)  # ties each chunk prunes: the earliest ones overall
    if ties > 0:
        equal = np.zeros(nchunks, dtype=np.int64)
        for c in nb.prange(nchunks):
            equal[c] = _count_equal(x[c * CHUNK:min((c + 1) * CHUNK, x.size)], clear, key)
        left = ties
        for c in range(nchunks):
            quota[c] = min(left, equal[c])
            left -= quota[c]
    zero = x.dtype.type(0)
    for c in nb.prange(nchunks):
        seg = x[c * CHUNK:min((c + 1) * CHUNK, x.size)]
        i, q = 0, quota[c]
        while q > 0:  # this chunk prunes its first q ties, in spans of SPAN weights
            span = seg[i:min(i + SPAN, seg.size)]
            e = _count_equal(span, clear, key)
            if e <= q:  # every tie in the span goes
                _keep_from(span, clear, key + 1)
                q -= e
            else:  # the span where the quota runs out: weight by weight
                for t in range(span.size):
                    k = span[t] & clear
                    if k < key or (k == key and q > 0):
                        q -= k == key
                        span[t] = zero
                q = 0
            i += span.size
        _keep_from(seg[i:], clear, key)  # past the quota ties stay
    return quota.sum()


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_nm(x, n, m):
    clear = np.int64(0x7FFF) if x.itemsize == 2 else np.int64(0x7FFFFFFF)
    groups = x.size // m
    per_chunk = max(1, CHUNK // m)
    nchunks = (groups + per_chunk - 1) // per_chunk
    zero = x.dtype.type(0)
    for c in nb.prange(nchunks):
        keys = np.empty(m, dtype=np.int64)
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
                x[base + i] = x[base + i] if beaten < n else zero


@nb.njit(cache=True, nogil=True)
def _keep_2of4(seg, clear):
    # 2:4, the common case, unrolled: branch-free rank counts the compiler can vectorise.
    zero = seg.dtype.type(0)
    for g in range(seg.size // 4):
        b = g * 4
        k0 = seg[b] & clear
        k1 = seg[b + 1] & clear
        k2 = seg[b + 2] & clear
        k3 = seg[b + 3] & clear
        r0 = np.int32(k1 > k0) + np.int32(k2 > k0) + np.int32(k3 > k0)
        r1 = np.int32(k0 >= k1) + np.int32(k2 > k1) + np.int32(k3 > k1)
        r2 = np.int32(k0 >= k2) + np.int32(k1 >= k2) + np.int32(k3 > k2)
        r3 = np.int32(k0 >= k3) + np.int32(k1 >= k3) + np.int32(k2 >= k3)
        seg[b] = seg[b] if r0 < 2 else zero
        seg[b + 1] = seg[b + 1] if r1 < 2 else zero
        seg[b + 2] = seg[b + 2] if r2 < 2 else zero
        seg[b + 3] = seg[b + 3] if r3 < 2 else zero


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_24(x, clear):
    nchunks = (x.size + CHUNK - 1) // CHUNK  # CHUNK is a multiple of 4: groups never straddle chunks
    for c in nb.prange(nchunks):
        _keep_2of4(x[c * CHUNK:min((c + 1) * CHUNK, x.size)], clear)
