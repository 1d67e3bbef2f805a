"""``llm-prune inspect MODEL``: where the zeros are, per block and module type (the paper's Fig. 1).

    llm-prune inspect smollm2-135m --sparsity 0.4 --scope global     what OMP would prune, nothing written
    llm-prune inspect PRUNED_DIR                                      the zeros an export holds
"""

from __future__ import annotations

import argparse

from . import add_output_arguments, add_selection_arguments, default_out, finish, method_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import SCOPES
    from ..models import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint directory, hub id or known short name")
    p.add_argument("--sparsity", help="prune to this sparsity (in memory, nothing written); without it and "
                                      "--pattern, count the zeros the checkpoint holds")
    p.add_argument("--pattern", help="N:M pattern instead of a sparsity")
    p.add_argument("--method", default="omp", choices=method_names(), help="a data-free method (default: omp)")
    p.add_argument("--scope", default="layer", choices=SCOPES, help="layer, or global: one threshold over all targets")
    add_selection_arguments(p)
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights (trusted sources only)")
    add_output_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..config import PruneConfig, Sparsity
    from ..models import resolve_model
    from ..study.inspect import grid, inspect
    from ..study.output import Output

    stored = args.sparsity is None and args.pattern is None
    sparsity = Sparsity(0.0) if stored else Sparsity.parse(args.sparsity, args.pattern)
    cfg = PruneConfig(method=args.method, sparsity=sparsity, scope=args.scope, targets=tuple(args.targets),
                      exclude=tuple(args.exclude))
    src = resolve_model(args.model)
    suffix = "inspect" if stored else f"inspect-{args.method}-{sparsity.label}{'-global' if args.scope == 'global' else ''}"
    out = Output(args.out or default_out(args.model, suffix), overwrite=args.overwrite)
    try:
        payload = inspect(src, cfg, stored=stored, progress=not args.quiet, allow_pickle=args.allow_pickle)
        blocks, types, values = grid(payload)
        out.picture(_heatmap, "inspect.png", blocks, types, values, payload)
    except BaseException:
        out.abort()
        raise
    return finish(out, payload, "inspect.json", to_table(payload), args)


def _heatmap(path, blocks, types, values, payload):
    from ..study.plots import heatmap

    return heatmap(path, [f"block {b}" for b in blocks], types, values, f"fraction pruned: {payload['what']}",
                   "fraction of weights that are zero")


def to_table(payload: dict) -> str:
    from ..report import table
    from ..study.inspect import grid

    blocks, types, values = grid(payload)
    rows = [[b, *[f"{v:.3f}" for v in row]] for b, row in zip(blocks, values)]
    rows.append(["all", *[f"{payload['by_type'][t]['fraction']:.3f}" for t in types]])
    o = payload["overall"]
    return "\n".join([f"{payload['checkpoint']}: {payload['what']}", table(rows, ["block", *types]),
                      f"overall {o['fraction']:.4f} of {o['params']:,} targeted weights"])
