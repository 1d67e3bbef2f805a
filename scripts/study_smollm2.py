"""The essential-sparsity study on the embedded SmolLM2-135M: the figures of BENCHMARKS.md and reports/.

    python scripts/study_smollm2.py --work /work/runs/study --report reports/smollm2-essential-sparsity

1. Four sweeps, 0.10 to 0.70 in steps of 0.05: OMP layer, OMP global, Wanda and SparseGPT
   (calibrated on 32 x 512 tokens of the embedded text, seed 0), each measured by held-out token
   perplexity (the first 4 windows of 2048 tokens of the held-out split) and ARC-Easy / PIQA (0-shot, the first
   ``--limit`` validation questions), keep-masks saved per level. Each sweep is a plain
   ``llm-prune sweep`` run (resumable: rerunning this script continues where it stopped).
2. Where the zeros are at 0.4 global (``llm-prune inspect``).
3. Keep-mask similarity between OMP, Wanda and SparseGPT at 0.1-0.5 (``llm-prune masks compare``).
4. One figure per metric with the four curves and their knees, and a mask-similarity overview.

Everything small (JSON, CSV, PNG, markdown) is copied into ``--report``; masks and logs stay in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SWEEPS = {
    "omp-layer": ["--method", "omp"],
    "omp-global": ["--method", "omp", "--scope", "global"],
    "wanda": ["--method", "wanda", "--nsamples", "32", "--seqlen", "512", "--seed", "0"],
    "sparsegpt": ["--method", "sparsegpt", "--nsamples", "32", "--seqlen", "512", "--seed", "0"],
}
MASK_LEVELS = ["0.1", "0.2", "0.3", "0.4", "0.5"]


def llm_prune(*args, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ llm-prune {' '.join(map(str, args))}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "llm_prune", *map(str, args)], check=True, stdout=f, stderr=f)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--levels", default="0.1:0.7:0.05")
    p.add_argument("--limit", type=int, default=100, help="ARC-Easy / PIQA questions per level")
    p.add_argument("--only", nargs="+", choices=list(SWEEPS), help="sweeps to run (default: all)")
    p.add_argument("--figures-only", action="store_true",
                   help="run no sweep and no inspect: compare the saved masks and draw the figures from what is finished")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "study.log"
    evals = ["--eval", "ppl,arc_easy,piqa", "--eval-limit", args.limit, "--eval-batch-size", "16", "--eval-ppl-windows", "4",
             "--eval-data", "local", "--save-mask", "--quiet"]
    seconds = {}
    for name, method in SWEEPS.items():
        if args.figures_only or (args.only and name not in args.only):
            continue
        out = args.work / f"sweep-{name}"
        seconds[name] = llm_prune("sweep", "smollm2-135m", *method, "--sparsities", args.levels, *evals,
                                  "--out", out, "--resume", "--report", log=log)
    if not args.figures_only:
        llm_prune("inspect", "smollm2-135m", "--sparsity", "0.4", "--scope", "global", "--out", args.work / "inspect-0.4-global",
                  "--overwrite", "--report", "--quiet", log=log)
    for level in MASK_LEVELS:
        masks = [args.work / f"sweep-{m}" / "masks" / f"{level}.safetensors" for m in ("omp-layer", "wanda", "sparsegpt")]
        if all(m.is_file() for m in masks):
            llm_prune("masks", "compare", *masks, "--labels", "omp,wanda,sparsegpt", "--out",
                      args.work / f"masks-{level}", "--overwrite", "--report", "--quiet", log=log)
    figures(args.work, args.report)
    if seconds:
        (args.work / "study-seconds.json").write_text(json.dumps(seconds, indent=1))
    return 0


def figures(work: Path, report: Path) -> None:
    """Copy the small outputs into ``report`` and draw the combined figures."""
    from llm_prune.study.knee import Knee
    from llm_prune.study.plots import Series, knee_plot, lines_over_steps

    report.mkdir(parents=True, exist_ok=True)
    sweeps = {}
    for name in SWEEPS:
        d = work / f"sweep-{name}"
        if (d / "sweep.json").is_file():
            sweeps[name] = json.loads((d / "sweep.json").read_text())
            dest = report / f"sweep-{name}"
            dest.mkdir(exist_ok=True)
            for f in d.iterdir():
                if f.is_file() and f.suffix in (".json", ".csv", ".png", ".md"):
                    shutil.copy2(f, dest / f.name)
    for extra in ["inspect-0.4-global", *[f"masks-{lv}" for lv in MASK_LEVELS]]:
        if (work / extra).is_dir():
            shutil.copytree(work / extra, report / extra, dirs_exist_ok=True)
    if not sweeps:
        return
    first = next(iter(sweeps.values()))
    for curve in first["curves"]:
        if "/" in first["curves"][curve]["task"]:
            continue
        series = {}
        for name, s in sweeps.items():
            c, k = s["curves"][curve], s["knees"][curve]
            knee = Knee(**{f: (tuple(v) if isinstance(v, list) else v) for f, v in k.items()
                           if f in Knee.__dataclass_fields__})
            levels = [lv["sparsity"] for lv in s["levels"]]
            stderr = c["stderr"] if all(e is not None for e in c["stderr"]) else None
            series[name] = Series(levels, c["values"], stderr, knee)
        main_name, main = next(iter(series.items()))
        knee_plot(report / f"knees-{curve.replace('/', '-')}.png", f"SmolLM2-135M {curve}", main.levels, main.values,
                  first["curves"][curve]["dense"], main.knee, stderr=main.stderr, series_label=main_name,
                  extra_series={k: v for k, v in series.items() if k != main_name})
    overall = {}
    for level in MASK_LEVELS:
        f = work / f"masks-{level}" / "masks.json"
        if f.is_file():
            for pair in json.loads(f.read_text())["pairs"]:
                overall.setdefault(f"{pair['a']} vs {pair['b']}", []).append((float(level), pair["overall"]["cosine"]))
    if overall:
        levels = sorted({lv for pts in overall.values() for lv, _ in pts})
        lines_over_steps(report / "mask-cosine-overall.png", levels,
                         {k: [c for _, c in sorted(v)] for k, v in overall.items()},
                         "keep-mask cosine similarity", "SmolLM2-135M: masks of OMP, Wanda, SparseGPT vs sparsity",
                         xlabel="sparsity")


if __name__ == "__main__":
    sys.exit(main())
