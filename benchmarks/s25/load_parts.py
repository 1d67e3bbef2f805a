"""Where a warm load's pruning time goes: milliseconds per load (mean of 5, in process) in the
loader's prepare, the table cache, each target's own_threshold, the global thresholds and prune_.

    python benchmarks/s25/load_parts.py layer float32    # scope, dtype
"""
import os, sys, time
os.environ["HF_HUB_OFFLINE"]="1"; os.environ["TRANSFORMERS_VERBOSITY"]="error"
import torch, llm_prune
from llm_prune.models import resolve_model
from llm_prune.loading import prune as LP, keytables as KT
path = resolve_model("smollm2-135m"); dt = getattr(torch, sys.argv[2]); scope = sys.argv[1]
acc = {}
def wrap(mod, name, label=None):
    f = getattr(mod, name); label = label or name
    def g(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: x = acc.setdefault(label, [0.0, 0]); x[0] += time.perf_counter() - t; x[1] += 1
    setattr(mod, name, g)
wrap(LP, "own_threshold"); wrap(LP, "prune_", "prune_"); wrap(KT.TableCache, "tables", "cache.tables"); wrap(LP, "global_thresholds"); wrap(LP.LoadPruner, "prepare")
wrap(KT.TableCache, "hashes_known")
f = lambda: llm_prune.from_pretrained(path, sparsity=0.4, scope=scope, dtype=dt, progress=False)
f(); f(); acc.clear()
for _ in range(5):
    f()
print(scope, dt, {k: ("%.1f ms" % (v[0] / 5 * 1e3), v[1] // 5) for k, v in acc.items()})
