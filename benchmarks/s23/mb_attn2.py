import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, n=30):
    for _ in range(3): f()
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3

def chunked(q, k, v, chunk=128):
    # q [B, H, S, D], k/v [B, KV, S, D]; causal; fp32 math
    B, H, S, D = q.shape; KV = k.shape[1]; g = H // KV
    q = q.float().reshape(B, KV, g * S, D) if False else q.float()
    k = k.float(); v = v.float()
    out = torch.empty(B, H, S, D)
    scale = D ** -0.5
    qg = q.view(B, KV, g, S, D)
    og = out.view(B, KV, g, S, D)
    for a in range(0, S, chunk):
        b = min(a + chunk, S)
        qc = qg[:, :, :, a:b]                      # [B, KV, g, c, D]
        s = torch.matmul(qc, k[:, :, None, :b].transpose(-1, -2))  # [B, KV, g, c, b]
        s.mul_(scale)
        s[..., a:b].masked_fill_(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, -1)
        og[:, :, :, a:b] = torch.matmul(p, v[:, :, None, :b])
    return out

for dt in [torch.bfloat16, torch.float32]:
    q = torch.randn(1, 9, 512, 64, dtype=dt); k = torch.randn(1, 3, 512, 64, dtype=dt); v = torch.randn(1, 3, 512, 64, dtype=dt)
    kk = k.repeat_interleave(3, 1); vv = v.repeat_interleave(3, 1)
    ref = F.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), is_causal=True)
    t1 = bench(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True))
    e1 = (F.scaled_dot_product_attention(q, kk, vv, is_causal=True).double() - ref).abs().max().item()
    for c in [64, 128, 256]:
        t2 = bench(lambda: chunked(q, k, v, c))
        e2 = (chunked(q, k, v, c).double() - ref).abs().max().item()
        print(dt, f"sdpa {t1:.2f} ms err {e1:.1e} | chunk{c} {t2:.2f} ms err {e2:.1e}")
