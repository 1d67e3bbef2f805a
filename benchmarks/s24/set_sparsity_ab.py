import os, time, statistics
os.environ["HF_HUB_OFFLINE"]="1"; os.environ["TRANSFORMERS_VERBOSITY"]="error"
import torch, llm_prune
from llm_prune.models import resolve_model
path = resolve_model("smollm2-135m")
out = []
for scope in ("global", "layer"):
    m = llm_prune.from_pretrained(path, sparsity=0.4, scope=scope, dtype=torch.bfloat16, progress=False)
    ts = []
    for i in range(6):
        for s in (0.5, 0.6):
            t = time.perf_counter(); llm_prune.set_sparsity(m, s); ts.append(time.perf_counter() - t)
        m = llm_prune.from_pretrained(path, sparsity=0.4, scope=scope, dtype=torch.bfloat16, progress=False)
    out.append("set_sparsity %s %.1f ms" % (scope, 1000 * statistics.median(ts)))
print(os.environ["TAG"], " | ".join(out))
