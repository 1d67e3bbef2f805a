"""One Linear of SmolLM2's shapes in float32 and bfloat16 on 2 threads: ms and GFLOP/s, best of 3 rounds."""
import torch, time
torch.set_num_threads(2)
def t(f, n=20):
    f(); f()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n): f()
        best = min(best, (time.perf_counter()-t0)/n)
    return best
for (m,k,n) in [(512,576,576),(512,576,1536),(512,1536,576),(16384,576,1536)]:
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(m,k).to(dt); w = torch.randn(n,k).to(dt)
        s = t(lambda: torch.nn.functional.linear(a, w), n=5 if m>1000 else 20)
        print(m,k,n,dt, f"{s*1e3:.2f} ms {2*m*k*n/s/1e9:.0f} GFLOP/s")
