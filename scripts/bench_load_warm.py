"""Pruning at load time in a process that already has its imports, beside transformers' own load.

    python scripts/bench_load_warm.py --pairs 7 --json benchmarks/load-warm.json
    python scripts/bench_load_warm.py --synthetic-7b 2 --pairs 5 --dtypes bf16

A sweep, a notebook or a server loads models in a process whose imports are paid: there the cost
of pruning while loading is the load itself. For each checkpoint and dtype, in one process and
after one warm-up load of each kind (numba started, key tables cached), alternating pairs of

  hf     transformers.AutoModelForCausalLM.from_pretrained(path, dtype=...) + touching every weight
  ours   llm_prune.from_pretrained(path, sparsity, scope, dtype=...) + touching every weight

("touching": one byte per page of every parameter, so that both hold a usable model: transformers
leaves unconverted weights as lazy file mappings). Reports medians and the ratio of medians,
and per load the minor page faults and the user / kernel CPU seconds of the process.
``--whole-process`` adds the same comparison with each load in a fresh process (imports
included), as a user running one command sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CHILD = r"""
import os, sys, time
t0 = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
kind, path, dtype, scope, sparsity = sys.argv[1:6]
dtype = getattr(torch, dtype)
if kind == "hf":
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
else:
    import llm_prune
    model = llm_prune.from_pretrained(path, sparsity=float(sparsity), scope=scope, dtype=dtype, progress=False)
with torch.no_grad():
    for p in model.parameters():
        p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
print(time.perf_counter() - t0)
"""


def touch(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def warm_pairs(path: Path, dtype, scope: str, sparsity: float, pairs: int) -> dict:
    import transformers

    import llm_prune

    def hf():
        touch(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype))

    def ours():
        touch(llm_prune.from_pretrained(path, sparsity=sparsity, scope=scope, dtype=dtype, progress=False))

    hf(), ours()  # warm-up: imports of the model classes, numba, cached key tables
    times, costs = {"hf": [], "ours": []}, {"hf": [], "ours": []}
    for _ in range(pairs):
        for name, fn in (("hf", hf), ("ours", ours)):
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            times[name].append(round(time.perf_counter() - t, 4))
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            costs[name].append((r1.ru_minflt - r0.ru_minflt, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime))
    # Where the time goes, per load (medians): page faults (first writes to fresh memory, first
    # reads of a mapped file) and the CPU seconds of all threads, in user space and in the kernel.
    per_load = {name: {"minor_faults": int(statistics.median(c[0] for c in v)),
                       "user_s": round(statistics.median(c[1] for c in v), 3),
                       "system_s": round(statistics.median(c[2] for c in v), 3)} for name, v in costs.items()}
    return _summary(times) | {"per_load": per_load}


def whole_process_pairs(path: Path, dtype: str, scope: str, sparsity: float, pairs: int) -> dict:
    times = {"hf": [], "ours": []}
    run = lambda kind: float(subprocess.run([sys.executable, "-c", CHILD, kind, str(path), dtype, scope, str(sparsity)],
                                            capture_output=True, text=True, check=True).stdout.split()[-1])
    run("hf"), run("ours")  # warm-up: page cache, numba's on-disk cache, key tables
    for _ in range(pairs):
        for kind in ("hf", "ours"):
            times[kind].append(round(run(kind), 4))
    return _summary(times)


def _summary(times: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": med, "ratio": round(med["ours"] / med["hf"], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--synthetic-7b", type=int, metavar="BLOCKS",
                   help="a Llama-2-7B-shaped checkpoint of this many blocks (random fp16) instead of --model")
    p.add_argument("--work", type=Path, default=Path("/tmp/llm-prune-bench"))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--scope", default="global")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--whole-process", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import torch

    if args.synthetic_7b:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_stream import make_synthetic

        path = args.work / f"synthetic-{args.synthetic_7b}"
        if not (path / "config.json").is_file():
            make_synthetic(path, args.synthetic_7b)
        name = f"7B-shaped, {args.synthetic_7b} blocks"
    else:
        from llm_prune.models import resolve_model

        path, name = resolve_model(args.model), args.model
    rows = []
    for dtype in args.dtypes:
        dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)
        row = {"model": name, "dtype": dtype, "scope": args.scope, "sparsity": args.sparsity,
               "warm": warm_pairs(path, getattr(torch, dtype), args.scope, args.sparsity, args.pairs)}
        if args.whole_process:
            row["whole_process"] = whole_process_pairs(path, dtype, args.scope, args.sparsity, args.pairs)
        rows.append(row)
        w = row["warm"]
        f = {k: v["minor_faults"] for k, v in w["per_load"].items()}
        line = (f"{name} {dtype} {args.scope} {args.sparsity}: warm hf {w['median_s']['hf']:.3f} s, "
                f"llm-prune {w['median_s']['ours']:.3f} s, ratio {w['ratio']:.2f} "
                f"(minor faults per load {f['hf']} / {f['ours']})")
        if args.whole_process:
            wp = row["whole_process"]
            line += (f"; whole process hf {wp['median_s']['hf']:.2f} s, llm-prune {wp['median_s']['ours']:.2f} s, "
                     f"ratio {wp['ratio']:.2f}")
        print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu_threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
