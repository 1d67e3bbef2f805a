"""``llm-prune trace DIR [DIR ...]``: zeros and near-zeros over training, abrupt jumps flagged (the paper's Fig. 8).

    llm-prune trace runs/mlm                                   a folder of checkpoint-N subdirectories
    llm-prune trace ckpt-a ckpt-b ckpt-c --eps 1e-4            checkpoint directories (ordered by step)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_output_arguments, add_selection_arguments, default_out, finish


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                   help="checkpoint directories, or one folder holding checkpoint-* subdirectories")
    p.add_argument("--eps", type=float, default=1e-3, help="near-zero: |w| < eps (default 1e-3)")
    add_selection_arguments(p)
    add_output_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..config import PruneConfig, Sparsity
    from ..study.distributions import check_eps
    from ..study.output import Output
    from ..study.trace import draw, find_checkpoints, open_all, trace

    cfg = PruneConfig(sparsity=Sparsity(0.0), targets=tuple(args.targets), exclude=tuple(args.exclude))
    # Everything that can be refused from names and headers is refused before the output exists.
    check_eps(args.eps)
    located, ordered_by = find_checkpoints(args.dirs)
    ckpts = open_all(located, cfg)
    out = Output(args.out or default_out(str(args.dirs[0]), "trace"), overwrite=args.overwrite)
    try:
        payload = trace(located, ordered_by, ckpts, args.eps, progress=not args.quiet)
        out.picture(draw, "trace.png", payload)
    except BaseException:
        out.abort()
        raise
    return finish(out, payload, "trace.json", to_table(payload), args)


def to_table(payload: dict) -> str:
    from ..report import table
    from ..study.trace import caption, summary, verdict

    header, rows = summary(payload)
    return "\n".join([caption(payload), table(rows, header), verdict(payload)])
