"""``llm-prune masks compare A B [C ...]``: how much the keep-masks of pruned models agree (the paper's Fig. 10).

    llm-prune masks compare vicuna-omp-0.5 vicuna-wanda-0.5 vicuna-sparsegpt-0.5 --labels omp,wanda,sparsegpt
    llm-prune masks compare run-a/masks.safetensors run-b      a mask file (--save-mask) beside a checkpoint

Inputs are pruned checkpoint directories (any export format; kept = bitwise non-zero weight) or
mask files written with --save-mask. Every pair gets the cosine similarity of its 0/1 masks
(|a∧b|/sqrt(|a|·|b|), the paper's measure) and IoU, overall and per block, from exact counts.
Writes masks.json and masks.png (cosine per block, one line per pair). Options go before
``compare`` or after the inputs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import UserError
from . import add_output_arguments, finish

USAGE = "say `llm-prune masks compare A B [C ...]` (pruned checkpoint directories or mask files)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # A plain positional rather than a subcommand: every misuse then gets the one-line error below.
    p.add_argument("action", nargs="?", metavar="compare", help="the one action: compare two or more inputs")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="pruned checkpoint directory, mask file (.safetensors) or directory holding masks.safetensors")
    p.add_argument("--labels", help="comma-separated names for the inputs, in order (default: their directory names)")
    add_output_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..study.compare import check_labels, compare_sources, default_labels
    from ..study.output import Output

    if args.action != "compare":
        raise UserError(f"unknown action {args.action!r}: {USAGE}" if args.action else USAGE)
    if len(args.inputs) < 2:
        raise UserError(f"masks compare needs at least two inputs, got {len(args.inputs)}: {USAGE}")
    labels = check_labels(args.labels.split(","), len(args.inputs)) if args.labels else default_labels(args.inputs)
    out = Output(args.out or default_out(labels), overwrite=args.overwrite)
    try:
        payload = compare_sources(args.inputs, labels, progress=not args.quiet)
        out.picture(_per_block, "masks.png", payload)
    except BaseException:
        out.abort()
        raise
    return finish(out, payload, "masks.json", to_table(payload), args)


def default_out(labels: list[str]) -> Path:
    """masks-A-vs-B (-vs-C); from four inputs on, masks-A-vs-B-and-N-more."""
    safe = [re.sub(r"[^A-Za-z0-9._+-]+", "_", label).strip("._") or "input" for label in labels]
    shown = safe if len(safe) <= 3 else safe[:2]
    more = f"-and-{len(safe) - 2}-more" if len(safe) > 3 else ""
    return Path("masks-" + "-vs-".join(shown) + more)


def _per_block(path, payload: dict):
    from ..study.compare import per_block_series
    from ..study.plots import per_block_lines

    return per_block_lines(path, payload["blocks"], per_block_series(payload), "cosine similarity of keep-masks",
                           f"keep-mask similarity per block ({payload['tensors']} targets)")


def to_table(payload: dict) -> str:
    from ..report import table
    from ..study.compare import describe, pair_name, per_block_series

    inputs = [[i["label"], describe(i), f"{i['achieved']:.4f}", i["path"]] for i in payload["inputs"]]
    overall = [[pair_name(p), f"{p['overall']['cosine']:.4f}", f"{p['overall']['iou']:.4f}"] for p in payload["pairs"]]
    series = per_block_series(payload)
    ious = {pair_name(p): [p["blocks"][b]["iou"] for b in payload["blocks"]] for p in payload["pairs"]}
    blocks = [[b, *[f"{series[n][k]:.4f} ({ious[n][k]:.4f})" for n in series]] for k, b in enumerate(payload["blocks"])]
    return "\n".join([table(inputs, ["input", "what", "sparsity", "path"]), "",
                      f"keep-mask similarity over {payload['tensors']} targets ({payload['params']:,} weights)",
                      table(overall, ["pair", "cosine", "IoU"]), "", "per block: cosine (IoU)",
                      table(blocks, ["block", *series]), "", payload["rule"], payload["keep"]])
