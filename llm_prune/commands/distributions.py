"""``llm-prune distributions MODEL [MODEL2]``: |w| histograms, exact zeros and near-zeros (the paper's Fig. 7).

    llm-prune distributions smollm2-135m                              one checkpoint
    llm-prune distributions RUN/checkpoint-0 RUN/checkpoint-1500      two of one architecture, side by side
    llm-prune distributions DENSE PRUNED --labels dense,pruned --eps 1e-4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_output_arguments, add_selection_arguments, default_out, finish
from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..models import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint directory, hub id or known short name")
    p.add_argument("model2", nargs="?", help="a second checkpoint of the same architecture, drawn beside the first")
    p.add_argument("--eps", type=float, default=1e-3, help="near-zero: |w| < eps (default 1e-3)")
    p.add_argument("--bins", type=int, default=80, help="log-spaced bins over the range of nonzero |w| (default 80)")
    p.add_argument("--labels", help="names of the checkpoints in tables and plots, comma-separated (default: "
                                    "their directory names)")
    add_selection_arguments(p)
    add_output_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..config import PruneConfig, Sparsity
    from ..models import resolve_model
    from ..study.distributions import check_eps, check_same_layout, distributions, draw, open_checkpoint
    from ..study.output import Output

    check_eps(args.eps)
    if args.bins < 1:
        raise UserError(f"--bins must be at least 1, got {args.bins}")
    names = [args.model] + ([args.model2] if args.model2 else [])
    labels = _labels(names, args.labels)
    cfg = PruneConfig(sparsity=Sparsity(0.0), targets=tuple(args.targets), exclude=tuple(args.exclude))
    # Everything that can be refused from headers is refused before the output directory exists.
    ckpts = [open_checkpoint(resolve_model(n), cfg, label) for n, label in zip(names, labels)]
    for other in ckpts[1:]:
        check_same_layout(ckpts[0], other)
    suffix = "distributions" if len(names) == 1 else f"vs-{labels[1]}-distributions"
    out = Output(args.out or default_out(args.model, suffix), overwrite=args.overwrite)
    try:
        payload = distributions(ckpts, args.eps, args.bins, progress=not args.quiet)
        out.picture(draw, "distributions.png", payload)
    except BaseException:
        out.abort()
        raise
    return finish(out, payload, "distributions.json", to_table(payload), args)


def _labels(names: list[str], given: str | None) -> list[str]:
    if given is not None:
        labels = [x.strip() for x in given.split(",")]
        if len(labels) != len(names) or not all(labels) or len(set(labels)) != len(labels):
            raise UserError(f"--labels needs {len(names)} distinct names, comma-separated; got {given!r}")
        return labels
    labels = [Path(n.rstrip("/")).name or n for n in names]
    if len(set(labels)) < len(labels):  # e.g. two runs' checkpoint-1000: name them by their parents too
        labels = ["/".join(Path(n.rstrip("/")).parts[-2:]) for n in names]
    if len(set(labels)) < len(labels):
        raise UserError("the two checkpoints have the same name: tell them apart with --labels a,b")
    return labels


def to_table(payload: dict) -> str:
    from ..report import table
    from ..study.distributions import caption, summary_header, summary_rows

    series = ", ".join(f"{c['label']} = {c['path']} ({c['dtype']})" for c in payload["checkpoints"])
    return "\n".join([series, table(summary_rows(payload), summary_header(payload)), caption(payload)])
