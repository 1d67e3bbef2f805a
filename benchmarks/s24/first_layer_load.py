import os, time, shutil
os.environ["HF_HUB_OFFLINE"]="1"; os.environ["TRANSFORMERS_VERBOSITY"]="error"
import torch, llm_prune
from llm_prune.models import resolve_model
from llm_prune.paths import cache_dir
path = resolve_model("smollm2-135m")
shutil.rmtree(cache_dir() / "keytables", ignore_errors=True)
llm_prune.load(path, dtype=torch.bfloat16, progress=False)  # imports and numba warm, no tables
t = time.perf_counter(); m = llm_prune.from_pretrained(path, sparsity=0.4, dtype=torch.bfloat16, progress=False); a = time.perf_counter() - t
t = time.perf_counter(); m = llm_prune.from_pretrained(path, sparsity=0.4, dtype=torch.bfloat16, progress=False); b = time.perf_counter() - t
print(os.environ["TAG"], "first layer load (no tables cached) %.3f s, second %.3f s, tables cached: %s" % (a, b, (cache_dir() / "keytables").is_dir()))
