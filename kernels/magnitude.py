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
* ``prune_below_(w, key, ties, out=None)``: zero every weight whose key is below ``key`` and the
  first ``ties`` (in flat order) whose key equals it: ``masks.threshold_keep`` exactly, including
  its tie order. Parallel chunks learn how many ties they own from a count per chunk.
* ``prune_nm_(w, n, m, out=None)``: keep the ``n`` largest magnitudes of every ``m`` consecutive
  weights, earlier weight first on ties: ``masks.nm_keep`` exactly.
* ``max_key(w)``: the largest key, a vectorised read (finiteness checks that need no histogram).

The prune kernels write into ``w`` itself or into ``out``: the exporter and the loader read a
tensor from a mapping of the source file and write the pruned weights into a buffer or the
model's memory, so the weights cross memory once. They return the zeros they wrote, so no
caller counts them again.
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
# Counts inside a kernel (zeros written, ties seen) are kept per GROUP weights in the weights'
# own integer width and then added to a 64-bit total: LLVM then compares and counts 16 lanes per
# AVX2 vector for 16-bit weights instead of widening every lane to 64 bits (the prune select
# ran 1.8x faster on one core). A 16-bit count holds GROUP without overflowing.
GROUP = 1 << 12
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
    parts = _parts(x)
    # Unsigned keys index the table without numba's fix-up for negative indices: 1.2x faster
    # for 16-bit weights, 1.6x for fp32 (scripts/bench_histogram.py).
    u = x.view(np.uint16 if x.itemsize == 2 else np.uint32)
    with _LOCK:
        return _histogram(u, _clear(u), _VIEW[w.dtype][1], parts)


def bucket_histogram(w: torch.Tensor, high: int) -> np.ndarray:
    """fp32 only: counts of the low 16 key bits of the weights whose high half is ``high``."""
    x = bits(w).view(np.uint32)
    with _LOCK:
        return _bucket_histogram(x, np.uint32(high), _parts(x))


def _parts(x: np.ndarray) -> int:
    """Slices a histogram kernel gives its threads, each counting into its own table: one per
    thread, more when a slice could overflow the int32 counters that keep a 2^15-bin table
    (4 rows: 512 KiB) within a core's L2."""
    return max(nb.get_num_threads(), -(-x.size // (1 << 31)))


def set_threads(n: int | None) -> None:
    """How many cores kernels called from this thread use (None: all). numba keeps the setting
    per calling thread: a loader thread can prune on one core while the main thread builds."""
    nb.set_num_threads(min(n, nb.config.NUMBA_NUM_THREADS) if n else nb.config.NUMBA_NUM_THREADS)


def max_key(w: torch.Tensor) -> int:
    """The largest magnitude key of ``w`` (-1 when empty): one vectorised read, the cheap finiteness
    check for callers that need no histogram (N:M, a threshold already known)."""
    x = bits(w)
    if x.size == 0:
        return -1
    with _LOCK:
        return int(_max_key(x, _clear(x)))


def prune_below_(w: torch.Tensor, key: int, ties: int, out: torch.Tensor | None = None) -> tuple[int, int]:
    """Prune (see module doc) into ``out`` (default: ``w`` itself, in place).

    Returns (ties pruned, at most ``ties``; zeros in the result, counting -0)."""
    x, y = bits(w), _out_bits(w, out)
    if x.size == 0:
        return 0, 0
    if key < 0:  # nothing to prune
        if y is not None:
            y[:] = x
        return 0, int(np.count_nonzero((x & _clear(x)) == 0))
    with _LOCK:
        used, zeros = _prune_below(x, y, _clear(x), x.dtype.type(key), ties)
    return int(used), int(zeros)


def prune_nm_(w: torch.Tensor, n: int, m: int, out: torch.Tensor | None = None) -> int:
    """Keep the n largest of every m consecutive weights along the last dim, into ``out``
    (default: in place). Returns the zeros in the result."""
    x, y = bits(w), _out_bits(w, out)
    if x.size == 0:
        return 0
    with _LOCK:
        if (n, m) == (2, 4) and x.itemsize == 2 and x.size % 4 == 0:  # four 16-bit weights per word
            return int(_prune_24_words(x.view(np.uint64), None if y is None else y.view(np.uint64)))
        return int(_prune_24(x, y, _clear(x)) if (n, m) == (2, 4) else _prune_nm(x, y, n, m))


def _out_bits(w: torch.Tensor, out: torch.Tensor | None) -> np.ndarray | None:
    # None means in place: the kernels then write through the very array they read, which LLVM
    # vectorises (two views of one buffer would fail its overlap check and run scalar, 15x slower).
    if out is None or out is w:
        return None
    if out.dtype != w.dtype or out.numel() != w.numel() or not supported(out):
        raise ValueError(f"out must be a contiguous {w.dtype} CPU tensor of {w.numel()} elements")
    return bits(out)


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


@nb.njit(cache=True, nogil=True)
def _count_bucket(seg, high, row):
    for i in range(seg.size):
        k = seg[i] & 0x7FFFFFFF
        if (k >> 16) == high:
            row[k & 0xFFFF] += 1


@nb.njit(parallel=True, cache=True, nogil=True)
def _bucket_histogram(x, high, parts):
    # One table per thread, as in _histogram. (A table per CHUNK of weights meant zeroing and
    # summing 256 KiB per 2^18 weights: an fp32 threshold ran at 0.9 G weights/s, now 1.9.)
    per = np.zeros((parts, 1 << 16), dtype=np.int32)
    step = (x.size + parts - 1) // parts
    for p in nb.prange(parts):
        _count_bucket(x[p * step:min((p + 1) * step, x.size)], high, per[p])
    out = np.zeros(1 << 16, dtype=np.int64)
    for p in range(parts):
        out += per[p]
    return out


@nb.njit(cache=True, nogil=True)
def _max_seg(seg, clear):
    m = seg.dtype.type(0)
    for t in range(seg.size):
        k = seg[t] & clear
        m = k if k > m else m
    return m


@nb.njit(parallel=True, cache=True, nogil=True)
def _max_key(x, clear):
    nchunks = (x.size + CHUNK - 1) // CHUNK
    per = np.zeros(nchunks, dtype=np.int64)
    for c in nb.prange(nchunks):
        per[c] = _max_seg(x[c * CHUNK:min((c + 1) * CHUNK, x.size)], clear)
    return per.max()


@nb.njit(cache=True, nogil=True)
def _count_equal(seg, clear, key):
    u = seg.dtype.type
    e = 0
    end = seg.size - seg.size % GROUP
    for g in range(0, end, GROUP):
        n = u(0)  # a narrow count (see GROUP)
        for t in range(g, g + GROUP):
            n = u(n + ((seg[t] & clear) == key))
        e += np.int64(n)
    for t in range(end, seg.size):
        e += (seg[t] & clear) == key
    return e


@nb.njit(cache=True, nogil=True)
def _keep_from(seg, out, clear, key):
    """out (None: seg itself) = seg with every weight whose key is below ``key`` zeroed: one
    branch-free select. Returns the zeros written (either sign)."""
    if out is None:
        dst = seg
    else:
        dst = out
    u = seg.dtype.type
    zero = u(0)
    z = 0
    end = seg.size - seg.size % GROUP
    for g in range(0, end, GROUP):
        n = u(0)  # a narrow count (see GROUP)
        for t in range(g, g + GROUP):
            v = seg[t]
            v = v if (v & clear) >= key else zero
            dst[t] = v
            n = u(n + ((v & clear) == 0))
        z += np.int64(n)
    for t in range(end, seg.size):
        v = seg[t]
        v = v if (v & clear) >= key else zero
        dst[t] = v
        z += (v & clear) == 0
    return z


@nb.njit(cache=True, nogil=True)
def _prune_chunk(seg, out, clear, key, q):
    """One chunk of ``_prune_below``: its first ``q`` ties go, in spans of SPAN weights."""
    if out is None:
        dst = seg
    else:
        dst = out
    zero = seg.dtype.type(0)
    i, z = 0, 0
    while q > 0:
        end = min(i + SPAN, seg.size)
        span, ospan = seg[i:end], dst[i:end]
        e = _count_equal(span, clear, key)
        if e <= q:  # every tie in the span goes
            if out is None:
                z += _keep_from(span, None, clear, key + 1)
            else:
                z += _keep_from(span, ospan, clear, key + 1)
            q -= e
        else:  # the span where the quota runs out: weight by weight
            for t in range(span.size):
                v = span[t]
                k = v & clear
                if k < key or (k == key and q > 0):
                    q -= k == key
                    v = zero
                ospan[t] = v
                z += (v & clear) == 0
            q = 0
        i = end
    if out is None:  # past the quota ties stay
        return z + _keep_from(seg[i:], None, clear, key)
    return z + _keep_from(seg[i:], dst[i:], clear, key)


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_below(x, y, clear, key, ties):
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
    zeros = np.zeros(nchunks, dtype=np.int64)
    for c in nb.prange(nchunks):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, x.size)
        if y is None:  # ifs on the arguments, not expressions: numba drops the dead branch
            zeros[c] = _prune_chunk(x[lo:hi], None, clear, key, quota[c])
        else:
            zeros[c] = _prune_chunk(x[lo:hi], y[lo:hi], clear, key, quota[c])
    return quota.sum(), zeros.sum()


@nb.njit(parallel=True, cache=True, nogil=True)
def _prune_nm(x, y, n, m):
    clear = np.int64(0x7FFF) if x.itemsize == 2 else np.int64(0x7FFFFFFF)
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
# the strided loads of the kernel above do not vectorise (1.1 G weights/s on one core), these
# word-wide shifts and subtractions do (3.1 G/s, scripts/bench_kernels.py). Field i of a word is
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
