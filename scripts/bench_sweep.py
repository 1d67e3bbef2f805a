"""A sweep's pruning cost beside the same levels run one by one: one load vs one run per level.

    python scripts/bench_sweep.py --levels 0.1:0.7:0.05 --json benchmarks/sweep-vs-independent.json

Side by side on the embedded SmolLM2, OMP layer scope, 13 levels, measured by a deliberately small
evaluation (token perplexity on one 128-token window) so that pruning dominates:

* ``llm-prune sweep smollm2-135m --sparsities LEVELS --eval ppl ...``: one process, one load;
* for each level ``llm-prune smollm2-135m --sparsity S --eval ppl ...`` (export, then evaluate
  the export) in its own process, as a user would script it.

The evaluation is the same work on both sides and is reported apart: each side's evaluation
seconds come from its own results (``eval_s`` of the sweep's levels; each run's ``seconds`` of its
tasks), and "pruning part" = wall time - evaluation seconds. The dense baseline is evaluated
once beforehand, so both sides read it from the cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVAL = ["--eval", "ppl", "--eval-seqlen", "128", "--eval-ppl-windows", "1", "--eval-data", "local"]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="0.1:0.7:0.05")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from llm_prune.study.knee import parse_levels

    levels = parse_levels(args.levels)
    exe = [sys.executable, "-m", "llm_prune"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timed([*exe, "smollm2-135m", "--sparsity", "0.5", *EVAL, "--no-save", "--out", str(tmp / "warm"), "--quiet"])
        sweep_wall = timed([*exe, "sweep", "smollm2-135m", "--sparsities", args.levels, *EVAL, "--out",
                            str(tmp / "sweep"), "--quiet"])
        sweep = json.loads((tmp / "sweep" / "sweep.json").read_text())
        sweep_eval = sum(lv["eval_s"] for lv in sweep["levels"])
        runs = []
        for s in levels:
            out = tmp / f"one-{s:g}"
            wall = timed([*exe, "smollm2-135m", "--sparsity", f"{s:g}", *EVAL, "--out", str(out), "--quiet"])
            evaluated = json.loads((out / "results.json").read_text())["evaluated"]["tasks"]
            runs.append({"level": s, "wall_s": wall, "eval_s": sum(t["seconds"] for t in evaluated.values())})
    one_wall, one_eval = sum(r["wall_s"] for r in runs), sum(r["eval_s"] for r in runs)
    row = {"levels": len(levels), "sweep_wall_s": sweep_wall, "sweep_eval_s": sweep_eval,
           "sweep_pruning_s": sweep_wall - sweep_eval, "sweep_prune_s_in_process": sweep["time"]["prune_s"],
           "independent_wall_s": one_wall, "independent_eval_s": one_eval, "independent_pruning_s": one_wall - one_eval,
           "ratio_pruning": (sweep_wall - sweep_eval) / (one_wall - one_eval), "runs": runs}
    print(f"{len(levels)} levels: sweep {sweep_wall:.1f} s wall ({sweep_eval:.1f} s evaluating, "
          f"{sweep_wall - sweep_eval:.1f} s the rest); independent runs {one_wall:.1f} s wall ({one_eval:.1f} s "
          f"evaluating, {one_wall - one_eval:.1f} s the rest); pruning part ratio {row['ratio_pruning']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
