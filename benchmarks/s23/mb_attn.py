import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, n=20):
    for _ in range(3): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3
for dt in [torch.bfloat16, torch.float32]:
    for B in [1, 4]:
        q = torch.randn(B, 9, 512, 64, dtype=dt); k = torch.randn(B, 3, 512, 64, dtype=dt); v = torch.randn(B, 3, 512, 64, dtype=dt)
        kk = k.repeat_interleave(3, 1); vv = v.repeat_interleave(3, 1)
        t1 = bench(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)) / B
        t2 = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) / B
        mask = torch.full((512, 512), float("-inf")).triu(1)
        def math():
            s = torch.matmul(q, kk.transpose(-1, -2)).float() * 0.125 + mask
            return torch.matmul(s.softmax(-1).to(dt), vv)
        t3 = bench(math) / B
        print(dt, B, f"sdpa {t1:.2f} ms/sample  gqa {t2:.2f}  math {t3:.2f}")
