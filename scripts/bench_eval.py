"""SmolLM2-135M dense vs OMP variants on MMLU categories, ARC-Easy, PIQA and token perplexity.

    python scripts/bench_eval.py --limit 20 --mmlu-limit 1 --fewshot 0 --seqlen 512 --ppl-windows 4 --out /tmp/bench_eval
    (calibrated variants: wanda-0.5, sparsegpt-0.5, wanda-2:4, sparsegpt-2:4 with 8 x 512 embedded tokens)

Prunes each variant once into --out, evaluates it beside the (cached) dense baseline, and writes
bench.json plus a markdown table. Small limits on purpose: the CPU is shared and slow.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm_prune import PruneConfig, Sparsity, prune_checkpoint  # noqa: E402
from llm_prune.calibration import CalibConfig  # noqa: E402
from llm_prune.eval import EvalSettings, evaluate_pruned  # noqa: E402
from llm_prune.models import resolve_model  # noqa: E402

VARIANTS = {
    "omp-0.4-layer": PruneConfig(sparsity=Sparsity(0.4)),
    "omp-0.5-layer": PruneConfig(sparsity=Sparsity(0.5)),
    "omp-0.4-global": PruneConfig(sparsity=Sparsity(0.4), scope="global"),
    "omp-0.5-global": PruneConfig(sparsity=Sparsity(0.5), scope="global"),
    "omp-2:4": PruneConfig(sparsity=Sparsity.parse(None, "2:4")),
    "wanda-0.5": PruneConfig(method="wanda", sparsity=Sparsity(0.5)),
    "sparsegpt-0.5": PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5)),
    "wanda-2:4": PruneConfig(method="wanda", sparsity=Sparsity.parse(None, "2:4")),
    "sparsegpt-2:4": PruneConfig(method="sparsegpt", sparsity=Sparsity.parse(None, "2:4")),
}
# Calibration for the calibrated variants: the embedded text, small because this CPU is slow.
CALIB = CalibConfig(nsamples=8, seqlen=512, seed=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_eval"))
    p.add_argument("--limit", type=int, default=20, help="documents per zero-shot task")
    p.add_argument("--mmlu-limit", type=int, default=1, help="questions per MMLU subject")
    p.add_argument("--fewshot", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--mmlu-variants", default="omp-0.5-layer", help="variants also scored on MMLU (slow on CPU)")
    p.add_argument("--summarize", action="store_true", help="only print the markdown tables of OUT/bench.json")
    args = p.parse_args()
    if args.summarize:
        print(summarize(json.loads((args.out / "bench.json").read_text())["rows"]))
        return
    src = resolve_model("smollm2-135m")
    base = dict(batch_size=args.batch_size, seqlen=args.seqlen, ppl_windows=args.ppl_windows, data="local",
                progress=False, device="cpu")
    zero_shot = (["arc_easy", "piqa", "ppl"], EvalSettings(limit=args.limit, **base))
    mmlu = (["mmlu"], EvalSettings(fewshot=args.fewshot, limit=args.mmlu_limit, **base))
    # Zero-shot tasks for every variant first, then MMLU for the chosen ones (the expensive part).
    runs = [(n, zero_shot) for n in args.variants.split(",") if n] + \
        [(n, mmlu) for n in args.mmlu_variants.split(",") if n]
    bench = args.out / "bench.json"  # resume: keep the rows of an earlier run into the same --out
    rows = json.loads(bench.read_text())["rows"] if bench.is_file() else {}
    for name, (tasks, settings) in runs:
        out = args.out / name
        if not (out / "sparsity.json").is_file():
            cfg = VARIANTS[name]
            prune_checkpoint(src, cfg, out, overwrite=True, progress=False,
                             calib=CALIB if cfg.method != "omp" else None)
        t0 = time.perf_counter()
        payload = evaluate_pruned(src, out, tasks, settings, out / f"eval-{tasks[0]}", label=name)
        rows.setdefault(name, []).extend(payload["rows"])
        tp = {t: e.get("throughput") for t, e in payload["evaluated"]["tasks"].items()}
        tp_dense = {t: e.get("throughput") for t, e in payload["dense_baseline"]["tasks"].items()}
        rows[name].append({"tasks": tasks, "seconds": round(time.perf_counter() - t0, 1), "throughput": tp,
                           "dense_throughput": tp_dense, "dense_cached": [t for t, e in
                                                                          payload["dense_baseline"]["tasks"].items() if e.get("cached")]})
        print(name, tasks, f"{time.perf_counter() - t0:.0f} s", flush=True)
        (args.out / "bench.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))

    print(summarize(rows))


def summarize(rows: dict) -> str:
    """Markdown: one column per variant (dense first), one row per (task, metric); throughput after."""
    cells, dense, timing = {}, {}, []
    for name, items in rows.items():
        for r in items:
            if "task" in r:
                cells[(r["task"], r["metric"], name)] = r["pruned"]
                dense[(r["task"], r["metric"])] = r["dense"]
            else:
                for side, tp in (("dense", r["dense_throughput"]), (name, r["throughput"])):
                    for t, v in tp.items():
                        if v and (side != "dense" or t not in r["dense_cached"]):
                            timing.append((side, t, v))
    names = list(rows)
    fmt = lambda v, m: "-" if v is None else (f"{v:.2f}" if m == "ppl" else f"{100 * v:.1f}")
    out = ["| task | metric | dense | " + " | ".join(names) + " |", "|---|---|" + "---:|" * (len(names) + 1)]
    for (task, metric), d in dense.items():
        out.append(f"| {task} | {metric} | {fmt(d, metric)} | "
                   + " | ".join(fmt(cells.get((task, metric, n)), metric) for n in names) + " |")
    out += ["", "| model | task | requests | model s | requests/s |", "|---|---|---:|---:|---:|"]
    out += [f"| {side} | {t} | {v['requests']} | {v['model_seconds']:.1f} | {v['requests_per_s']:.2f} |"
            for side, t, v in timing]
    return "\n".join(out)


if __name__ == "__main__":
    main()
