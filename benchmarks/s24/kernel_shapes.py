import time, torch, numpy as np
from llm_prune.kernels import magnitude as K
torch.set_num_threads(1); K.set_threads(1)
for dt in (torch.float32, torch.float16, torch.bfloat16):
  for shape in [(576, 576), (1536, 576), (4096, 4096)]:
    w = (torch.randn(shape) * 0.02).to(dt); out = torch.empty_like(w)
    x = K.bits(w); clear = K.sign_clear(x)
    key = int(np.partition(x & clear, int(0.4*x.size))[int(0.4*x.size)])
    def best(f):
        ts=[]
        for _ in range(30):
            t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
        return min(ts)
    c = best(lambda: K.prune_below_(w, key, 0, out))
    d = best(lambda: K.prune_below_(w, key, 1000, out))
    e = best(lambda: K.max_key(w))
    print(str(dt)[6:], shape, "prune %.2f  with ties %.2f  max_key %.2f G/s" % tuple(w.numel()/t/1e9 for t in (c, d, e)))
