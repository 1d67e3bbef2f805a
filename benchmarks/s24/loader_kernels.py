import os, time, statistics
os.environ["HF_HUB_OFFLINE"]="1"
import torch
from llm_prune.models import resolve_model
from llm_prune.loading.decode import DenseSource
from llm_prune.loading.keytables import TableCache, global_thresholds
from llm_prune.reader import CheckpointReader
from llm_prune.arch import arch_for
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.targets import select_targets, target_order
from llm_prune.methods import get_method, prune_
from llm_prune.kernels.magnitude import set_threads
path = resolve_model("smollm2-135m")
src = DenseSource(CheckpointReader(path)); arch = arch_for(src.reader.config); units = src.units(arch)
cfg = PruneConfig(method="omp", sparsity=Sparsity.parse(0.4, None), scope="global")
select_targets(units, src.infos, arch, cfg); order = target_order(units)
m = get_method("omp")
th, _ = global_thresholds(TableCache(src, m), order, 0.4, False)
ws = dict(src.read(order, mapped=order))
pre = {n: torch.empty(w.shape, dtype=w.dtype) for n, w in ws.items()}
for o in pre.values(): o.fill_(0)
def run(fresh, reuse=None):
    outs = []
    for n in order:
        w = ws[n]
        out = torch.empty(w.shape, dtype=w.dtype) if fresh else pre[n]
        prune_(m, w, cfg.sparsity, False, threshold=th[n], out=out); outs.append(out)
    return outs
def alloc_fill():
    return [torch.empty(w.shape, dtype=w.dtype).fill_(0) for w in ws.values()]
for threads in (1, 2):
    set_threads(threads)
    for name, f in [("fresh", lambda: run(True)), ("prefaulted", lambda: run(False)), ("alloc+fill only", alloc_fill)]:
        f(); ts=[]
        for _ in range(7):
            t=time.perf_counter(); r=f(); ts.append(time.perf_counter()-t); del r
        print(threads, name, "%.1f ms" % (1000*statistics.median(ts)))
