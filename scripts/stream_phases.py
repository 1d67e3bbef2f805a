"""Where an export's time goes: seconds spent in each phase of `prune_checkpoint`, in-process.

    python scripts/stream_phases.py CKPT [--sparsity 0.5] [--scope layer] [--out /tmp/llm-prune-phases]

Wraps the exporter's phases with timers (threshold + histogram, applying the plan, writing
pieces, copying unpruned tensors, publishing each unit) and prunes CKPT once with OMP; prints
the run's wall time and each phase's total. Phases overlap (copies run in a thread), so they
need not add up. The output directory is replaced. Used for BENCHMARKS.md, streaming run 7.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import time

from llm_prune import pipeline, stream
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.methods import magnitude

PHASES = [  # (owner, attribute, label)
    (pipeline, "layer_plan", "threshold (histogram)"),
    (magnitude.Plan, "apply", "apply plan"),
    (stream.ShardFile, "write", "write pieces"),
    (stream.ShardFile, "copy_from", "copy unpruned"),
    (stream.ShardWriter, "commit", "publish unit"),
    (pipeline, "_prune_targets", "prune targets (all of the above but copies)"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--scope", default="layer", choices=["layer", "global"])
    p.add_argument("--out", default="/tmp/llm-prune-phases")
    args = p.parse_args()
    spent: dict[str, float] = collections.defaultdict(float)
    for owner, attr, label in PHASES:
        setattr(owner, attr, _timed(getattr(owner, attr), label, spent))
    shutil.rmtree(args.out, ignore_errors=True)
    os.sync()  # no writeback left over from earlier runs
    cfg = PruneConfig(method="omp", sparsity=Sparsity.parse(args.sparsity, None), scope=args.scope)
    t0 = time.perf_counter()
    pipeline.prune_checkpoint(args.ckpt, cfg, args.out, progress=False)
    print(f"run {time.perf_counter() - t0:.2f} s")
    for _, _, label in PHASES:
        print(f"  {label}: {spent[label]:.2f} s")
    shutil.rmtree(args.out, ignore_errors=True)


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
