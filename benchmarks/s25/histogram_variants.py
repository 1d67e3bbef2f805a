"""The key histogram's inner loop: the kernel's 4 interleaved rows (v0) against 64-bit loads with 4
or 8 rows (v1, v2), 2 rows (v3) and 32-bit loads (v4); one thread, best of 5, G weights/s.

    python benchmarks/s25/histogram_variants.py
"""
import time, torch, numpy as np, numba as nb
from llm_prune.kernels import magnitude as K
BINS = 1 << 15
nb.set_num_threads(1)

@nb.njit(nogil=True)
def v0(seg, clear, rows):
    quads = seg.size // 4 * 4
    for i in range(0, quads, 4):
        rows[0, (seg[i] & clear)] += 1
        rows[1, (seg[i + 1] & clear)] += 1
        rows[2, (seg[i + 2] & clear)] += 1
        rows[3, (seg[i + 3] & clear)] += 1

@nb.njit(nogil=True)
def v1(words, flat):
    # 4 keys per 64-bit word; rows at 0, BINS, 2BINS, 3BINS of one flat table
    m = np.uint64(0x7FFF)
    for i in range(words.size):
        w = words[i]
        flat[w & m] += 1
        flat[BINS + ((w >> np.uint64(16)) & m)] += 1
        flat[2 * BINS + ((w >> np.uint64(32)) & m)] += 1
        flat[3 * BINS + ((w >> np.uint64(48)) & m)] += 1

@nb.njit(nogil=True)
def v2(words, flat):
    # 2 words per step, 8 rows
    m = np.uint64(0x7FFF)
    n2 = words.size // 2 * 2
    for i in range(0, n2, 2):
        w = words[i]; v = words[i+1]
        flat[w & m] += 1
        flat[BINS + ((w >> np.uint64(16)) & m)] += 1
        flat[2 * BINS + ((w >> np.uint64(32)) & m)] += 1
        flat[3 * BINS + ((w >> np.uint64(48)) & m)] += 1
        flat[4*BINS + (v & m)] += 1
        flat[5*BINS + ((v >> np.uint64(16)) & m)] += 1
        flat[6 * BINS + ((v >> np.uint64(32)) & m)] += 1
        flat[7 * BINS + ((v >> np.uint64(48)) & m)] += 1

@nb.njit(nogil=True)
def v3(words, flat):
    # 4 keys per word, 2 rows (even/odd lanes alternate)
    m = np.uint64(0x7FFF)
    for i in range(words.size):
        w = words[i]
        flat[w & m] += 1
        flat[BINS + ((w >> np.uint64(16)) & m)] += 1
        flat[((w >> np.uint64(32)) & m)] += 1
        flat[BINS + ((w >> np.uint64(48)) & m)] += 1

@nb.njit(nogil=True)
def v4(words, flat):
    # uint32 words, 2 keys each, 4 rows
    m = np.uint32(0x7FFF)
    n2 = words.size // 2 * 2
    for i in range(0, n2, 2):
        w = words[i]; v = words[i+1]
        flat[w & m] += 1
        flat[BINS + ((w >> np.uint32(16)) & m)] += 1
        flat[2*BINS + (v & m)] += 1
        flat[3*BINS + ((v >> np.uint32(16)) & m)] += 1

for shape in [(4096, 4096), (11008, 4096), (1536, 576)]:
    w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    x = K.bits(w).view(np.uint16); words = x.view(np.uint64); w32 = x.view(np.uint32)
    ref = np.bincount(x & 0x7FFF, minlength=BINS)
    def f0():
        rows = np.zeros((4, BINS), np.int32); v0(x, np.uint16(0x7FFF), rows); return rows.sum(0)
    def mk(fn, arr, r):
        def f():
            flat = np.zeros(r * BINS, np.int32); fn(arr, flat); return flat.reshape(r, BINS).sum(0)
        return f
    fs = {"v0": f0, "v1": mk(v1, words, 4), "v2": mk(v2, words, 8), "v3": mk(v3, words, 2), "v4": mk(v4, w32, 4)}
    for k, f in fs.items():
        assert (f() == ref).all(), k
    res = {k: [] for k in fs}
    for rep in range(5):
        for k, f in fs.items():
            t = time.perf_counter(); f(); res[k].append(x.size / (time.perf_counter() - t) / 1e9)
    print(shape, {k: round(max(v), 2) for k, v in res.items()}, "G/s")
