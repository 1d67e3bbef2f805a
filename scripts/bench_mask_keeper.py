"""What holding the mask costs a fine-tuning run: a plain transformers Trainer vs the same with MaskKeeper.

    python scripts/bench_mask_keeper.py --pairs 3 --steps 20 --json benchmarks/mask-keeper.json

MiniLM (the embedded minilm-l6) pruned to 50% by OMP, fine-tuned on the packaged SST-2 split, the
same data, settings and seed on both sides; each side a fresh model, alternating which goes first
in each pair. Reports seconds per training step (the Trainer's own train_runtime / steps) of each
side, and their ratio (with callback / plain), median over pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def one_run(src, task, keeper_on: bool, steps: int, seed: int) -> float:
    from llm_prune.finetune import MaskKeeper
    from llm_prune.finetune.run import FinetuneConfig, target_params
    from llm_prune.finetune.train import TrainConfig, finetune, load_classifier

    model, processor = load_classifier(src, task, seed)
    targets = target_params(model, src, FinetuneConfig())
    keeper = MaskKeeper.from_zeros(model, list(targets)) if keeper_on else None
    result = finetune(model, processor, task, TrainConfig(max_steps=steps, seed=seed), keeper=keeper, progress=False)
    return result["train_seconds"] / result["steps"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from llm_prune import PruneConfig, Sparsity, prune_checkpoint
    from llm_prune.finetune.tasks import load_task
    from llm_prune.models import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "minilm-omp-0.5"
        prune_checkpoint(resolve_model("minilm-l6"), PruneConfig(sparsity=Sparsity(0.5)), src, progress=False)
        task = load_task("sst2")
        one_run(src, task, True, 2, 0)  # warm-up: imports, caches
        plain, kept = [], []
        for i in range(args.pairs):
            for side in ([False, True] if i % 2 == 0 else [True, False]):
                (kept if side else plain).append(one_run(src, task, side, args.steps, 0))
    ratios = [k / p for k, p in zip(kept, plain)]
    row = {"plain_s_per_step": statistics.median(plain), "mask_keeper_s_per_step": statistics.median(kept),
           "ratio_median": statistics.median(ratios), "ratios": ratios, "plain": plain, "kept": kept,
           "steps": args.steps, "pairs": args.pairs}
    print(f"plain Trainer {row['plain_s_per_step']:.3f} s/step, with MaskKeeper {row['mask_keeper_s_per_step']:.3f} s/step, "
          f"ratio {row['ratio_median']:.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
