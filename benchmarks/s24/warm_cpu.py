import os, time, resource, statistics
os.environ["HF_HUB_OFFLINE"]="1"; os.environ["TRANSFORMERS_VERBOSITY"]="error"
import torch, transformers, llm_prune
from llm_prune.models import resolve_model
path = resolve_model("smollm2-135m")
dt = torch.bfloat16
def touch(m):
    with torch.no_grad():
        for p in m.parameters(): p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
kinds = {
 "hf": lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt),
 "load": lambda: llm_prune.load(path, dtype=dt, progress=False),
 "global": lambda: llm_prune.from_pretrained(path, sparsity=0.4, scope="global", dtype=dt, progress=False),
 "layer": lambda: llm_prune.from_pretrained(path, sparsity=0.4, scope="layer", dtype=dt, progress=False),
}
res = {k: [] for k in kinds}
for k, f in kinds.items(): touch(f())
for r in range(7):
    for k, f in kinds.items():
        f0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter(); m = f(); touch(m); t = time.perf_counter()-t
        f1 = resource.getrusage(resource.RUSAGE_SELF)
        res[k].append((t, f1.ru_minflt-f0.ru_minflt, f1.ru_utime-f0.ru_utime, f1.ru_stime-f0.ru_stime))
        del m
for k, v in res.items():
    print(k, "median s %.3f" % statistics.median(x[0] for x in v), "faults %d" % statistics.median(x[1] for x in v),
          "user %.3f sys %.3f" % (statistics.median(x[2] for x in v), statistics.median(x[3] for x in v)))
