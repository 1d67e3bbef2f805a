import time, torch
from llm_prune.methods.sparsegpt import _bands
torch.set_num_threads(2)
def bench(f, n=10):
    for _ in range(2): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n
for n in [576, 1536]:
    for k in [512, 1024, 2048]:
        x = torch.randn(k, n); acc = torch.zeros(n, n)
        def banded():
            for a, b in _bands(n):
                acc[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=0.5, alpha=0.1)
        def full(): acc.addmm_(x.t(), x, beta=0.5, alpha=0.1)
        xt = x.t().contiguous()
        def banded_c():
            for a, b in _bands(n):
                acc[a:b, a:].addmm_(xt[a:b], x[:, a:], beta=0.5, alpha=0.1)
        tb, tf, tc = bench(banded), bench(full), bench(banded_c)
        fl = n * n * k  # flops of the upper triangle (2 n^2 k / 2)
        print(f"n={n} k={k}: banded {tb*1e3/k*512:.2f} ms/512tok ({fl/tb/1e9:.0f} GF/s eff) full {tf*1e3/k*512:.2f} ({2*fl/tf/1e9:.0f} GF/s) banded-contig {tc*1e3/k*512:.2f}")
