"""The key histogram kernel over signed vs unsigned integer views of one 7B-shaped weight.

    python scripts/bench_histogram.py

llm_prune.kernels.magnitude.key_histogram passes the weights' bits as unsigned integers, so
numba indexes the table without its fix-up for negative indices; this times both views of the
same 11008x4096 weight per dtype, alternating, best of 4 (BENCHMARKS.md, streaming run 7).
"""

import numpy as np, time, torch
from llm_prune.kernels import magnitude as K
for dt in (torch.float16, torch.bfloat16, torch.float32):
    w = (torch.randn(11008, 4096) * 0.02).to(dt)
    x = K.bits(w); shift = K._VIEW[dt][1]
    u = x.view(np.uint16 if x.itemsize == 2 else np.uint32)
    fs = {"signed": lambda: K._histogram(x, K.sign_clear(x), shift, 2), "unsigned": lambda: K._histogram(u, K.sign_clear(u), shift, 2)}
    assert (fs["signed"]() == fs["unsigned"]()).all()
    res = {k: [] for k in fs}
    for rep in range(4):
        for k, f in fs.items():
            t = time.perf_counter(); f(); res[k].append(x.size / (time.perf_counter() - t) / 1e9)
    print(dt, {k: round(max(v), 2) for k, v in res.items()}, "G/s (best of 4, alternating)")
