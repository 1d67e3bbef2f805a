"""``llm-prune``: argv -> frozen config -> one call per stage. Nothing below this file sees argv.

    llm-prune MODEL --method omp --sparsity 0.4 [--scope global] [--pattern 2:4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_TARGETS, SCOPES, PruneConfig, Sparsity
from .errors import UserError
from .methods import METHODS
from .models import ALIASES, DEFAULT_MODEL, EMBEDDED, resolve_model
from .report import format_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-prune",
        description="One-shot pruning of pre-trained transformers, streamed one block at a time.",
        epilog=f"Known names: {', '.join(sorted([*ALIASES, *EMBEDDED]))}. Default model: {DEFAULT_MODEL}.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="checkpoint directory, hub id (owner/name) or known short name")
    p.add_argument("--method", default="omp", choices=sorted(METHODS), help="pruning method (default: omp)")
    p.add_argument("--sparsity", help="fraction of targeted weights to remove, in [0, 1)")
    p.add_argument("--pattern", help="N:M pattern: keep at most N of every M weights along the input dim")
    p.add_argument("--scope", default="layer", choices=SCOPES,
                   help="layer: each matrix to the sparsity; global: one magnitude threshold over all targets")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="GLOB",
                   help="2-D block tensors to prune, by name within the block or full name (default: *.weight)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="block tensors to leave untouched")
    p.add_argument("--format", default="dense", choices=["dense", "bitmask", "packed24"],
                   help="how pruned weights are stored: dense (zeros in place, loadable by anything), "
                        "bitmask (values + 1 bit per weight), packed24 (2:4 only: half the values + 2-bit indices)")
    p.add_argument("--out", type=Path, help="output directory (default: ./MODEL-METHOD-SPARSITY[-global])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights (they can run code when loaded; only for trusted sources)")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"llm-prune {__version__}")
    return p


def default_out(model: str, cfg: PruneConfig) -> Path:
    name = Path(model.rstrip("/")).name if Path(model).is_dir() else model.split("/")[-1]
    suffix = "-global" if cfg.scope == "global" else ""
    return Path(f"{name}-{cfg.method}-{cfg.sparsity.label}{suffix}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = PruneConfig(method=args.method, sparsity=Sparsity.parse(args.sparsity, args.pattern),
                          scope=args.scope, targets=tuple(args.targets), exclude=tuple(args.exclude))
        out = args.out or default_out(args.model, cfg)
        src = resolve_model(args.model)
        from .pipeline import prune_checkpoint  # heavy imports after argument checks

        report = prune_checkpoint(src, cfg, out, fmt=args.format, source_name=args.model, overwrite=args.overwrite,
                                  resume=args.resume, allow_pickle=args.allow_pickle, progress=not args.quiet)
    except UserError as e:
        print(f"llm-prune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("llm-prune: interrupted; finished blocks are kept, run again with --resume to continue",
              file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else format_summary(report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
