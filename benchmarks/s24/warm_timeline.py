import os, time, statistics
os.environ["HF_HUB_OFFLINE"]="1"; os.environ["TRANSFORMERS_VERBOSITY"]="error"
import torch, llm_prune, sys
from llm_prune.models import resolve_model
from llm_prune.loading import hf, prune
path = resolve_model("smollm2-135m")
scope = sys.argv[1] if len(sys.argv) > 1 else "global"
T = {}
def wrap(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        T.setdefault(key+">", time.perf_counter()-T0)
        r = f(*a, **k); T[key+"<"] = time.perf_counter()-T0; return r
    setattr(mod, name, g)
wrap(hf, "empty_model", "build"); wrap(hf, "model_names", "names"); wrap(hf, "tie_weights", "tie")
wrap(prune.LoadPruner, "prepare", "prepare"); wrap(prune.LoadPruner, "__call__", "prune")
def touch(m):
    with torch.no_grad():
        for p in m.parameters(): p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
rows=[]
for i in range(8):
    T.clear(); T0=time.perf_counter()
    m = llm_prune.from_pretrained(path, sparsity=0.4, scope=scope, dtype=torch.bfloat16, progress=False)
    T["end"]=time.perf_counter()-T0
    touch(m); T["touched"]=time.perf_counter()-T0; del m
    if i: rows.append(dict(T))
for k in rows[0]: print(k, "%.1f ms" % (1000*statistics.median(r[k] for r in rows)))
