"""Fused CPU kernels for magnitude pruning, in place, over the integer view of the weights.

Magnitude pruning a 7B checkpoint is a memory-bound job: per weight, one look to histogram its
magnitude and one to keep or zero it. Torch composes that from 6-7 full passes (key, max,
bincount, compare, tie positions, multiply, count), each writing a temporary as large as the
tensor. These kernels do it in two passes that write nothing but the pruned weights, in place,
on all cores (numba, parallel over one part per thread or over chunks of ``CHUNK`` weights):

* ``key_histogram(w)``: counts of magnitude keys (``llm_prune.magnitude``: |w|'s bit pattern,
  sign cleared; the layout table is there) in 2^15 bins: the whole key for fp16/bf16, its high
  half for fp32 (``bucket_histogram`` resolves the low half of one bin). Everything a
  threshold, a finiteness check and the pruning statistics need.
* ``prune_below_(w, key, ties, out=None)``: zero every weight whose key is below ``key`` and the
  first ``ties`` (in flat order) whose key equals it: ``magnitude.threshold_keep`` exactly,
  including its tie order. Parallel chunks learn how many ties they own from a count per chunk.
  The same pass finds the largest key, so inf and nan are refused without a pass of their own.
(N:M patterns have their kernels in ``kernels.nm``.)
* ``max_key(w)``: the largest key, a vectorised read (finiteness checks that need no histogram).

The prune kernels write into ``w`` itself or into ``out``: the exporter and the loader read a
tensor from a mapping of the source file and write the pruned weights into a buffer or the
model's memory, so the weights cross memory once. They return the zeros they wrote, so no
caller counts them again.
Pruned weights become +0 (all bits clear), as everywhere in llm-prune. Compiled on first use and
cached on disk by numba (``cache=True``), so only the first run after installing pays ~seconds.
Tests check every kernel bit for bit against the torch reference in ``llm_prune.magnitude``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numba as nb
import numpy as np
import torch

from llm_prune.magnitude import BINS, LAYOUT, LOW_BITS, NonFinite
from llm_prune.kernels import numba_start

numba_start.start()  # numba loads its registries once, without scipy.linalg (see numba_start)

CHUNK = 1 << 18  # weights per parallel work item: small enough to balance 2-64 cores
SPAN = 1 << 12  # weights per tie-quota step inside a chunk
# Counts inside a kernel (zeros written, ties seen) are kept per GROUP weights in the weights'
# own integer width and then added to a 64-bit total: LLVM then compares and counts 16 lanes per
# AVX2 vector for 16-bit weights instead of widening every lane to 64 bits. A 16-bit count
# holds GROUP without overflowing.
GROUP = 1 << 12
# numba's fallback threading layer (workqueue, when neither OpenMP nor TBB is installed) aborts
# the process if two threads launch parallel kernels at once; the loader prunes in a thread.
LOCK = threading.Lock()
# dtype -> (integer view, shift from a key to its histogram bin); sign masks by integer width.
_VIEW = {d: (lay.int_dtype, LOW_BITS if lay.wide else 0) for d, lay in LAYOUT.items()}
_CLEAR = {lay.int_dtype.itemsize: lay.sign_clear for lay in LAYOUT.values()}
WIDE_CLEAR = LAYOUT[torch.float32].sign_clear
NARROW_CLEAR = LAYOUT[torch.float16].sign_clear
_LOW_MASK = (1 << LOW_BITS) - 1


def supported(w: torch.Tensor) -> bool:
    """True when the kernels can take ``w`` (CPU, contiguous, fp16/bf16/fp32)."""
    return w.dtype in _VIEW and w.device.type == "cpu" and w.is_contiguous()


def bits(w: torch.Tensor) -> np.ndarray:
    """The flat integer view of ``w``'s memory (shared, writes go to ``w``)."""
    return w.view(_VIEW[w.dtype][0]).reshape(-1).numpy()


def sign_clear(x: np.ndarray):
    """The sign-clearing mask in ``x``'s own integer type: the kernels then compare and mask in
    16-bit lanes for 16-bit weights (16 per AVX2 vector instead of 4 int64 ones)."""
    return x.dtype.type(_CLEAR[x.itemsize])


def key_histogram(w: torch.Tensor, serial: bool = False) -> np.ndarray:
    """int64 counts of magnitude keys in 2^15 bins (fp32: bins are the keys' high 16 bits).
    ``serial``: on the calling thread alone, with no parallel launch (so without ``LOCK``):
    for a thread that makes tables beside kernels the main thread runs."""
    x = bits(w)
    if x.size == 0:
        return np.zeros(BINS, dtype=np.int64)
    # Unsigned keys index the table without numba's fix-up for negative indices
    # (scripts/bench_histogram.py measures both).
    u = x.view(np.uint16 if x.itemsize == 2 else np.uint32)
    parts = -(-x.size // (1 << 31))  # int32 counters: a slice per 2^31 weights
    if serial:
        return _histogram_serial(u, sign_clear(u), _VIEW[w.dtype][1], parts)
    with LOCK:
        return _histogram(u, sign_clear(u), _VIEW[w.dtype][1], max(nb.get_num_threads(), parts))


def bucket_histogram(w: torch.Tensor, high: int) -> np.ndarray:
    """fp32 only: counts of the low 16 key bits of the weights whose high half is ``high``."""
    x = bits(w).view(np.uint32)
    with LOCK:
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


@contextmanager
def all_cores_but_one():
    """Kernels called from this thread leave one core free (at least one thread) for the work
    other threads do beside them: hashing, copies, the kernel's copies into the page cache."""
    before = nb.get_num_threads()
    set_threads(max(1, nb.config.NUMBA_NUM_THREADS - 1))
    try:
        yield
    finally:
        nb.set_num_threads(before)


def max_key(w: torch.Tensor) -> int:
    """The largest magnitude key of ``w`` (-1 when empty): one vectorised read, the cheap finiteness
    check for callers that need no histogram (N:M, a threshold already known)."""
    x = bits(w)
    if x.size == 0:
        return -1
    with LOCK:
        return int(_max_key(x, sign_clear(x)))


def prune_below_(w: torch.Tensor, key: int, ties: int, out: torch.Tensor | None = None) -> tuple[int, int]:
    """Prune (see module doc) into ``out`` (default: ``w`` itself, in place).

    Returns (ties pruned, at most ``ties``; zeros in the result, counting -0). Raises
    ``NonFinite`` when ``w`` holds inf or nan, found by the same pass (what was written by
    then is not to be used)."""
    x, y = bits(w), out_bits(w, out)
    if x.size == 0:
        return 0, 0
    if key < 0:  # nothing to prune
        if y is not None:
            y[:] = x
        keys = x & sign_clear(x)
        _check_top(int(keys.max()), w.dtype)
        return 0, int(np.count_nonzero(keys == 0))
    with LOCK:
        used, zeros, top = _prune_below(x, y, sign_clear(x), x.dtype.type(key), ties)
    _check_top(int(top), w.dtype)
    return int(used), int(zeros)


def _check_top(top: int, dtype: torch.dtype) -> None:
    if top >= LAYOUT[dtype].inf_key:
        raise NonFinite()


def out_bits(w: torch.Tensor, out: torch.Tensor | None) -> np.ndarray | None:
    # None means in place: the kernels then write through the very array they read, which LLVM
    # vectorises (two views of one buffer would fail its overlap check and run scalar, 15x slower).
    if out is None or out is w:
        return None
    if out.dtype != w.dtype or out.numel() != w.numel() or not supported(out):
        raise ValueError(f"out must be a contiguous {w.dtype} CPU tensor of {w.numel()} elements")
    return bits(out)


# -- the kernels ------------------------------------------------------------------------------------------
# Keys: x & clear, the sign bit cleared (llm_prune.magnitude's layout), in x's own type.
# numba types `a & b` of two int16s as int64: a key kept in that width makes LLVM widen every lane
# and keep the running maximum in 64-bit lanes, so every key is cast back with `u(...)`.
# Parallel loops hand each thread a slice and call a plain loop over it that starts at 0: numba
# then drops its negative-index handling and LLVM vectorises the selects and counts, which it
# does not when the parallel loop indexes the whole array itself.

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
def _histogram_serial(x, clear, shift, parts):
    rows = np.zeros((4, BINS), dtype=np.int32)
    out = np.zeros(BINS, dtype=np.int64)
    step = (x.size + parts - 1) // parts
    for p in range(parts):
        _count_keys(x[p * step:min((p + 1) * step, x.size)], clear, shift, rows)
        for r in range(4):
            out += rows[r]
        rows[:] = 0
    return out


@nb.njit(cache=True, nogil=True)
def _count_bucket(seg, high, row):
    for i in range(seg.size):
        k = seg[i] & WIDE_CLEAR
        if (k >> LOW_BITS) == high:
            row[k & _LOW_MASK] += 1


@nb.njit(parallel=True, cache=True, nogil=True)
def _bucket_histogram(x, high, parts):
    # One table per thread, as in _histogram: a table per CHUNK of weights would mean zeroing
    # and summing 256 KiB per 2^18 weights.
    per = np.zeros((parts, 1 << LOW_BITS), dtype=np.int32)
    step = (x.size + parts - 1) // parts
    for p in nb.prange(parts):
        _count_bucket(x[p * step:min((p + 1) * step, x.size)], high, per[p])
    out = np.zeros(1 << LOW_BITS, dtype=np.int64)
    for p in range(parts):
        out += per[p]
    return out


@nb.njit(cache=True, nogil=True)
def _max_seg(seg, clear):
    u = seg.dtype.type
    m = u(0)
    for t in range(seg.size):
        k = u(seg[t] & clear)
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
            n = u(n + u(u(seg[t] & clear) == key))
        e += np.int64(n)
    for t in range(end, seg.size):
        e += (seg[t] & clear) == key
    return e


@nb.njit(cache=True, nogil=True)
def _keep_from(seg, out, clear, key):
    """out (None: seg itself) = seg with every weight whose key is below ``key`` zeroed: one
    branch-free select. Returns (the zeros written (either sign), the largest key read): the
    finiteness check comes with the pass instead of a pass of its own."""
    if out is None:
        dst = seg
    else:
        dst = out
    u = seg.dtype.type
    zero = u(0)
    z = 0
    top = u(0)
    end = seg.size - seg.size % GROUP
    for g in range(0, end, GROUP):
        n = u(0)  # a narrow count (see GROUP)
        for t in range(g, g + GROUP):
            v = seg[t]
            k = u(v & clear)
            top = k if k > top else top
            v = v if k >= key else zero
            dst[t] = v
            n = u(n + u(u(v & clear) == 0))
        z += np.int64(n)
    for t in range(end, seg.size):
        v = seg[t]
        k = u(v & clear)
        top = k if k > top else top
        v = v if k >= key else zero
        dst[t] = v
        z += (v & clear) == 0
    return z, top


@nb.njit(cache=True, nogil=True)
def _prune_chunk(seg, out, clear, key, q):
    """One chunk of ``_prune_below``: its first ``q`` ties go, in spans of SPAN weights.
    Returns (zeros written, largest key read)."""
    if out is None:
        dst = seg
    else:
        dst = out
    zero = seg.dtype.type(0)
    top = seg.dtype.type(0)
    i, z = 0, 0
    while q > 0:
        end = min(i + SPAN, seg.size)
        span, ospan = seg[i:end], dst[i:end]
        e = _count_equal(span, clear, key)
        if e <= q:  # every tie in the span goes
            if out is None:
                zs, ts = _keep_from(span, None, clear, key + 1)
            else:
                zs, ts = _keep_from(span, ospan, clear, key + 1)
            z += zs
            top = ts if ts > top else top
            q -= e
        else:  # the span where the quota runs out: weight by weight
            for t in range(span.size):
                v = span[t]
                k = v & clear
                top = k if k > top else top
                if k < key or (k == key and q > 0):
                    q -= k == key
                    v = zero
                ospan[t] = v
                z += (v & clear) == 0
            q = 0
        i = end
    if out is None:  # past the quota ties stay
        zs, ts = _keep_from(seg[i:], None, clear, key)
    else:
        zs, ts = _keep_from(seg[i:], dst[i:], clear, key)
    return z + zs, (ts if ts > top else top)


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
    tops = np.zeros(nchunks, dtype=x.dtype)
    for c in nb.prange(nchunks):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, x.size)
        if y is None:  # ifs on the arguments, not expressions: numba drops the dead branch
            zc, tc = _prune_chunk(x[lo:hi], None, clear, key, quota[c])
        else:
            zc, tc = _prune_chunk(x[lo:hi], y[lo:hi], clear, key, quota[c])
        zeros[c] = zc
        tops[c] = tc
    return quota.sum(), zeros.sum(), tops.max()
