"""Where an export's time goes: seconds spent in each phase of `prune_checkpoint`, in-process.

    python scripts/stream_phases.py CKPT [--sparsity 0.5] [--scope layer] [--out /tmp/llm-prune-phases]
    python scripts/stream_phases.py CKPT --repeat 3 --vs-cp     # work only, beside cp

Wraps the exporter's phases with timers (threshold + histogram, applying the plan, writing
pieces, copying unpruned tensors, publishing each unit) and prunes CKPT with OMP; prints each
run's wall time and each phase's total. Phases overlap (copies run in a thread), so they need
not add up. The output directory is replaced. Used for BENCHMARKS.md, streaming runs 7 and 8.

``--vs-cp`` first runs the export once untimed (numba's kernels loaded, imports done), then
alternates `cp -r CKPT` in a subprocess with timed in-process exports: the pruner's own work
with no start-up at all, beside the copy it is measured against (``sync`` before each).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shutil
import subprocess
import time

from llm_prune import pipeline, writer
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.methods import METHODS, omp

THRESHOLD = "threshold (histogram)"
PHASES = [  # (owner, attribute, label)
    (omp.Plan, "apply", "apply plan"),
    (writer.ShardFile, "write", "write pieces"),
    (writer.ShardFile, "copy_from", "copy unpruned"),
    (writer.ShardWriter, "commit", "publish unit"),
    (pipeline, "_prune_targets", "prune targets (all of the above but copies)"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--scope", default="layer", choices=["layer", "global"])
    p.add_argument("--out", default="/tmp/llm-prune-phases")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--vs-cp", action="store_true", help="warm up once, then alternate cp and timed exports")
    args = p.parse_args()
    spent: dict[str, float] = collections.defaultdict(float)
    for owner, attr, label in PHASES:
        setattr(owner, attr, _timed(getattr(owner, attr), label, spent))
    omp = METHODS["omp"]  # the exporter asks the method for its plan: time it there
    METHODS["omp"] = dataclasses.replace(omp, plan=_timed(omp.plan, THRESHOLD, spent))
    cfg = PruneConfig(method="omp", sparsity=Sparsity.parse(args.sparsity, None), scope=args.scope)
    if args.vs_cp:
        _export(args, cfg)  # untimed: kernels loaded, caches warm
    ratios = []
    for _ in range(args.repeat):
        spent.clear()
        cp = _copy(args) if args.vs_cp else None
        wall = _export(args, cfg)
        print(f"run {wall:.2f} s" + (f"   cp {cp:.2f} s   run / cp {wall / cp:.2f}" if cp else ""))
        for label in [THRESHOLD, *(label for _, _, label in PHASES)]:
            print(f"  {label}: {spent[label]:.2f} s")
        if cp:
            ratios.append(round(wall / cp, 2))
    if ratios:
        print(f"work only / cp per pair: {' / '.join(map(str, ratios))}")


def _export(args, cfg) -> float:
    shutil.rmtree(args.out, ignore_errors=True)
    os.sync()  # no writeback left over from earlier runs
    t0 = time.perf_counter()
    pipeline.prune_checkpoint(args.ckpt, cfg, args.out, progress=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(args.out, ignore_errors=True)
    return wall


def _copy(args) -> float:
    dst = args.out + ".cp"
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", args.ckpt, dst], check=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    return wall


def _timed(fn, label: str, spent: dict):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[label] += time.perf_counter() - t
    return wrapper


if __name__ == "__main__":
    main()
