"""``llm-prune finetune MODEL``: prune a pre-trained encoder, fine-tune the kept weights, compare with dense.

    llm-prune finetune minilm-l6 --task sst2 --method omp --sparsity 0.5
    llm-prune finetune minilm-l6 --task rte --method lth --rounds 3 --sparsity 0.5 --seeds 0,1,2
    llm-prune finetune vit-digits --task digits --method omp --sparsity 0.4 --scope global
    accelerate launch --multi_gpu --num_processes 2 -m llm_prune.cli finetune ...   data parallel (gloo on CPU)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_output_arguments, add_selection_arguments, default_out, finish, method_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import SCOPES

    p.add_argument("model", nargs="?", default="minilm-l6",
                   help="a BERT- or ViT-family checkpoint directory or known name (default: minilm-l6)")
    p.add_argument("--task", default="sst2", help="sst2, rte, mrpc, digits, a .csv/.jsonl file or an image folder")
    p.add_argument("--method", default="omp", choices=sorted({"lth", *method_names()}),
                   help="omp: prune once, then fine-tune; lth: lottery tickets (iterative, rewinding)")
    p.add_argument("--sparsity", help="fraction of the targeted weights to remove (default 0.5)")
    p.add_argument("--pattern", help="N:M pattern instead of a sparsity (omp)")
    p.add_argument("--scope", default="layer", choices=SCOPES)
    add_selection_arguments(p)
    add_training_arguments(p.add_argument_group("fine-tuning (transformers Trainer)"))
    p.add_argument("--seed", type=int, default=0, help="seed of the head's init and the data order")
    p.add_argument("--format", default="dense", choices=["dense", "bitmask", "packed24"],
                   help="how the fine-tuned sparse checkpoint is stored")
    add_output_arguments(p)


def add_training_arguments(g) -> None:
    """The fine-tuning options ``llm-prune finetune`` and ``llm-prune sweep --finetune`` share."""
    g.add_argument("--rounds", type=int, default=3,
                   help="lth: rounds of pruning to reach the sparsity, each pruning the same fraction of the kept "
                        "weights (default 3); in a sweep, one chain of rounds runs up the levels and --rounds is "
                        "the number between consecutive levels")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate, linear decay (default 2e-5)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-length", type=int, default=128, help="text: tokens per example")
    g.add_argument("--seeds", help="several seeds, comma-separated: the spread over seeds (finetune: overrides --seed)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the fine-tune/test split (default 0)")
    g.add_argument("--test-frac", type=float, default=0.3, help="share of the data held out for test (default 0.3)")
    g.add_argument("--data", default="local", choices=["local", "hub"], help="GLUE: packaged validation split, or the hub's")


def config_from_args(args: argparse.Namespace, *, task: str | None = None, sparsity=None):
    from ..config import Sparsity
    from ..errors import UserError
    from ..finetune.run import FinetuneConfig
    from ..finetune.train import TrainConfig

    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    else:
        seeds = (getattr(args, "seed", 0),)
    train = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                        max_length=args.max_length, seed=seeds[0])
    if sparsity is None:
        sparsity = Sparsity.parse(args.sparsity if args.sparsity or args.pattern else "0.5", args.pattern)
    return FinetuneConfig(task=task or args.task, method=args.method, sparsity=sparsity, scope=args.scope, rounds=args.rounds,
                          targets=tuple(args.targets), exclude=tuple(args.exclude), train=train, seeds=seeds,
                          split_seed=args.split_seed, test_frac=args.test_frac, data=args.data)


def run(args: argparse.Namespace) -> int:
    from ..finetune.run import run_finetune
    from ..models import resolve_model
    from ..study.output import Output

    import os
    import tempfile

    cfg = config_from_args(args)
    src = resolve_model(args.model)
    task_name = cfg.task.rstrip("/").split("/")[-1]
    final = args.out or default_out(args.model, f"finetune-{task_name}-{cfg.method}-{cfg.sparsity.label}")
    rank = int(os.environ.get("RANK", "0"))  # under accelerate launch every rank trains; rank 0 writes
    if rank != 0:
        with tempfile.TemporaryDirectory() as scratch:
            run_finetune(src, cfg, Output(Path(scratch) / "out"), fmt=args.format, progress=False,
                         source_name=args.model, export_model=False)
        return 0
    out = Output(final, overwrite=args.overwrite)
    try:
        payload = run_finetune(src, cfg, out, fmt=args.format, progress=not args.quiet, source_name=args.model)
    except BaseException:
        out.abort()
        raise
    return finish(out, payload, "finetune.json", to_table(payload), args)


def to_table(payload: dict) -> str:
    from ..report import table

    s = payload["settings"]
    rows = []
    for metric, r in payload["metrics"].items():
        d, p = r["dense"], r["pruned"]
        sd = lambda x: f" ± {100 * x['std']:.2f}" if x["std"] is not None else ""  # noqa: E731
        rows.append([metric, f"{100 * d['mean']:.2f}{sd(d)}", f"{100 * p['mean']:.2f}{sd(p)}", f"{100 * r['drop']:+.2f}"])
    what = s["method"] + (f", {s['rounds']} rounds" if s["method"] == "lth" else "")
    return "\n".join([f"{payload['model']} fine-tuned on {payload['task']['name']}: {what}, "
                      f"{s['pattern'] or s['sparsity']} ({s['scope']} scope), achieved {payload['achieved']:.4f}",
                      table(rows, ["metric", "dense %", "pruned %", "drop (+ = worse)"]),
                      f"data: {payload['task']['described']}",
                      f"seeds {', '.join(map(str, s['seeds']))} (mean ± std over seeds); the sparse model is in checkpoint/"])
