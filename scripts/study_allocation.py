"""Issue 18's figures: does a non-uniform allocation move the knee? SmolLM2-135M, four methods × three allocations.

    python scripts/study_allocation.py --work /work/runs/allocation --report reports/allocation
    python scripts/study_allocation.py --work /work/runs/allocation --report reports/allocation --only wanda-owl-s0
    python scripts/study_allocation.py --work /work/runs/allocation --report reports/allocation --tables-only
    python scripts/study_allocation.py --work /work/runs/allocation-ppl --report reports/allocation --eval ppl \
        --ppl-windows 24 --ppl-seqlen 512

Every cell is a plain ``llm-prune sweep`` with ``--resume`` (rerunning continues where it stopped):
- OMP, Wanda, SparseGPT and RIA at 50%, 60% and 70% unstructured, each with ``--allocation``
  uniform, owl (calibrated methods only: OWL reads activations) and alpha;
- the same four at 2:4, where allocation cannot apply (every group of four keeps two), and Wanda
  and RIA at 2:4 with ``--permute`` (RIA's channel permutation: what helps N:M instead);
- calibrated methods over calibration seeds 0, 1, 2 (``--seed``); OMP reads no data, one run.
Metrics: held-out perplexity (the embedded passages' held-out split) and ARC-Easy at ``--limit``
examples. ``--tables-only`` reads the finished sweeps and writes ``allocation.md`` and
``allocation.json`` (mean and spread over seeds per cell) and one plot per method into ``--report``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

METHODS = ["omp", "wanda", "sparsegpt", "ria"]
PERMUTABLE = ["wanda", "ria"]  # --permute: score-based N:M methods
NO_ALLOCATION = {"2of4": "n/a (2:4)", "2of4perm": "n/a (2:4, --permute)"}
PIVOT_COLUMN = {NO_ALLOCATION["2of4"]: "uniform", NO_ALLOCATION["2of4perm"]: "--permute"}  # 2:4 rows of the pivot
LEVELS = "0.5,0.6,0.7"


def plan(seeds: list[int], levels: str = LEVELS) -> dict[str, list[str]]:
    """Sweep name -> its arguments (model, method, levels, allocation, seed)."""
    cells = {}
    for method in METHODS:
        calibrated = method != "omp"
        for alloc in ["uniform", "owl", "alpha"] if calibrated else ["uniform", "alpha"]:
            for seed in seeds if calibrated else [0]:
                cells[f"{method}-{alloc}-s{seed}"] = ["--method", method, "--sparsities", levels, "--allocation", alloc,
                                                      *(["--seed", str(seed)] if calibrated else [])]
        for seed in seeds if calibrated else [0]:
            cells[f"{method}-2of4-s{seed}"] = ["--method", method, "--pattern", "2:4",
                                               *(["--seed", str(seed)] if calibrated else [])]
        if method in PERMUTABLE:
            for seed in seeds:
                cells[f"{method}-2of4perm-s{seed}"] = ["--method", method, "--pattern", "2:4", "--permute",
                                                       "--seed", str(seed)]
    return cells


def run_cell(name: str, args: list[str], work: Path, common: list[str]) -> None:
    log = work / "study.log"
    cmd = [sys.executable, "-m", "llm_prune", "sweep", "smollm2-135m", *args, *common, "--out", str(work / name)]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd[2:])}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=f)


def tables(work: Path, report: Path, cells: dict[str, list[str]], protocol: str = "") -> dict:
    """Mean and spread over seeds per (method, allocation, level) and metric, from finished sweeps;
    ``protocol`` (calibration, evaluation, ARC-Easy's limit) heads the markdown and the plots."""
    rows: dict[tuple, dict[str, list[float]]] = {}
    for name in cells:
        f = work / name / "sweep.json"
        if not f.is_file():
            continue
        sweep = json.loads(f.read_text())
        method, alloc, _ = name.rsplit("-", 2)
        for curve, c in sweep["curves"].items():
            for level, value in zip(sweep["levels"], c["values"]):
                key = (method, NO_ALLOCATION.get(alloc, alloc), level["label"])
                rows.setdefault(key, {}).setdefault(curve, []).append(value)
                rows[key].setdefault(f"dense {curve}", [c["dense"]])
    out = {" | ".join(k): {m: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
                               "n": len(v), "values": v} for m, v in metrics.items()}
           for k, metrics in sorted(rows.items())}
    report.mkdir(parents=True, exist_ok=True)
    (report / "allocation.json").write_text(json.dumps(out, indent=1))
    metrics = sorted({m for v in rows.values() for m in v if not m.startswith("dense")})
    lines = [*([protocol, ""] if protocol else []),
             "| method | allocation | level | " + " | ".join(metrics) + " |", "|---" * (3 + len(metrics)) + "|"]
    dense = {m: next((v[f"dense {m}"][0] for v in rows.values() if f"dense {m}" in v), None) for m in metrics}
    lines.append("| dense | | 0 | " + " | ".join(f"{d:.2f}" if d is not None else "" for d in dense.values()) + " |")
    for (method, alloc, level), v in sorted(rows.items()):
        lines.append(f"| {method} | {alloc} | {level} | " + " | ".join(mean_sd(v[m]) if m in v else "" for m in metrics)
                     + " |")
    for m in metrics:
        lines += ["", *pivot(rows, m)]
    (report / "allocation.md").write_text("\n".join(lines) + "\n")
    _plots(rows, metrics, report, protocol)
    return out


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def pivot(rows: dict, metric: str) -> list[str]:
    """One row per method and level, one column per allocation (2:4: plain and --permute), the
    best of each row in bold: where allocation helps, and where it does not, at a glance."""
    lower = "ppl" in metric
    columns = ["uniform", "owl", "alpha", "--permute"]
    table: dict[tuple, dict[str, list[float]]] = {}
    for (method, alloc, level), v in rows.items():
        if metric in v:
            table.setdefault((method, "2:4" if alloc in PIVOT_COLUMN else level), {})[PIVOT_COLUMN.get(alloc, alloc)] = v[metric]
    lines = [f"{metric}: mean ± sd over seeds (n), best per row in bold ({'lower' if lower else 'higher'} is better); "
             "2:4 rows: plain in the uniform column", "",
             "| method | level | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for (method, level), cols in sorted(table.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        means = {c: statistics.fmean(v) for c, v in cols.items()}
        best = (min if lower else max)(means.values())
        text = {c: f"{mean_sd(v)} ({len(v)})" for c, v in cols.items()}
        bold = {c: f"**{t}**" if means[c] == best and len(cols) > 1 else t for c, t in text.items()}
        lines.append(f"| {method} | {level} | " + " | ".join(bold.get(c, "") for c in columns) + " |")
    return lines


def _plots(rows: dict, metrics: list[str], report: Path, protocol: str = "") -> None:
    try:
        from llm_prune.study.plots import lines_over_steps
    except ImportError:
        return
    for method in METHODS:
        for metric in metrics:
            series, sds = {}, {}
            for (m, alloc, level), v in rows.items():
                if m == method and metric in v and alloc not in NO_ALLOCATION.values():
                    series.setdefault(alloc, {})[float(level)] = statistics.fmean(v[metric])
                    sds.setdefault(alloc, {})[float(level)] = statistics.stdev(v[metric]) if len(v[metric]) > 1 else 0.0
            levels = sorted({lv for s in series.values() for lv in s})
            if not series or not levels:
                continue
            lines_over_steps(report / f"{method}-{metric.replace('/', '-')}.png", levels,
                             {a: [s.get(lv, float("nan")) for lv in levels] for a, s in series.items()},
                             "held-out perplexity (log)" if "ppl" in metric else metric,
                             f"SmolLM2-135M, {method}: allocation against uniform (mean ± sd over seeds)"
                             + (f"\n{textwrap.fill(protocol, 80)}" if protocol else ""),
                             xlabel="sparsity", logy="ppl" in metric,
                             spread={a: [s.get(lv, 0.0) for lv in levels] for a, s in sds.items()})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=200, help="ARC-Easy examples (stated in every output)")
    p.add_argument("--eval", default="ppl,arc_easy")
    p.add_argument("--only", nargs="+", help="cells to run (names as in study.log, e.g. wanda-owl-s0)")
    p.add_argument("--levels", default=LEVELS, help=f"unstructured levels (default {LEVELS})")
    p.add_argument("--ppl-windows", type=int, help="held-out perplexity windows (default: the sweep's)")
    p.add_argument("--ppl-seqlen", type=int, help="held-out perplexity window length (default: the sweep's, "
                                                   "min(2048, context))")
    p.add_argument("--tables-only", action="store_true", help="run nothing: tables and plots from the finished cells")
    args = p.parse_args()
    cells = plan([int(s) for s in args.seeds.split(",")], args.levels)
    unknown = [c for c in args.only or [] if c not in cells]
    if unknown:
        p.error(f"unknown cells {unknown}; known: {', '.join(cells)}")
    args.work.mkdir(parents=True, exist_ok=True)
    common = ["--eval", args.eval, "--eval-limit", str(args.limit), "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--resume", "--quiet",
              *(["--eval-ppl-windows", str(args.ppl_windows)] if args.ppl_windows else []),
              *(["--eval-seqlen", str(args.ppl_seqlen)] if args.ppl_seqlen else [])]
    if not args.tables_only:
        for name, cell_args in cells.items():
            if not args.only or name in args.only:
                run_cell(name, cell_args, args.work, common)
    protocol = (f"calibration {args.nsamples} × {args.seqlen} tokens, seeds {args.seeds}; eval {args.eval}"
                + (f", ARC-Easy first {args.limit} examples" if "arc" in args.eval else "")
                + (f", perplexity windows {args.ppl_windows or 'all'} × {args.ppl_seqlen or 'min(2048, context)'} tokens"
                   if "ppl" in args.eval else ""))
    out = tables(args.work, args.report, cells, protocol)
    print(f"{len(out)} cells tabulated into {args.report / 'allocation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
