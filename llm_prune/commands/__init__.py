"""The CLI's verbs besides pruning, one module each: ``add_arguments(parser)`` and ``run(args) -> exit code``.

``llm_prune.cli`` dispatches ``llm-prune VERB ...`` to ``llm_prune.commands.VERB`` (``eval`` to
``llm_prune.eval.cli``); ``llm-prune MODEL ...`` stays the prune verb. A verb turns its arguments
into the library's configs and calls one function; nothing below it sees argv.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pkgutil
import sys
from pathlib import Path

from ..errors import UserError


def add_output_arguments(p: argparse.ArgumentParser, *, resumable: bool = False) -> None:
    p.add_argument("--out", type=Path, help="output directory (default: named after the input and the command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    if resumable:
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run, or extend a finished one, reusing what it finished")
    p.add_argument("--report", action="store_true", help="also write report.md (tables and pictures, renders on GitHub)")
    p.add_argument("--json", action="store_true", help="print the JSON payload instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_TARGETS

    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="GLOB",
                   help="2-D block tensors to consider, by name within the block or full name (default: *.weight)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="block tensors to leave out")


def default_out(model: str, suffix: str) -> Path:
    name = Path(model.rstrip("/")).name if Path(model).is_dir() else model.split("/")[-1]
    return Path(f"{name}-{suffix}")


def finish(out, payload: dict, name: str, text: str, args: argparse.Namespace) -> int:
    """Write ``name`` (the JSON payload), report.md when asked, publish; print the table or the JSON."""
    payload = {**payload, "pictures": out.pictures, "no_pictures": out.no_pictures}
    out.write_json(name, payload)
    if args.report:
        from ..study.report import write_report

        write_report(out.tmp, title=out.final.name)
    final = out.publish()
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print(text)
        if out.no_pictures:
            print(f"no pictures: {out.no_pictures}")
        print(f"wrote {final} ({name}{', ' + ', '.join(out.pictures) if out.pictures else ''})")
    return 0


def levels_from(sparsities: str | None, patterns: str | None) -> list:
    """``--sparsities 0.1:0.7:0.05`` (or a list) and/or ``--pattern 2:4,4:8`` as Sparsity levels."""
    from ..config import Sparsity
    from ..study.knee import parse_levels

    levels = []
    if sparsities:
        try:
            levels += [Sparsity.parse(s) for s in parse_levels(sparsities)]
        except ValueError as e:
            raise UserError(f"--sparsities {sparsities}: {e}") from None
    if patterns:
        levels += [Sparsity.parse(pattern=p) for p in patterns.split(",") if p.strip()]
    if not levels:
        raise UserError("give --sparsities (e.g. 0.1:0.7:0.05) and/or --pattern N:M[,N:M...]")
    return levels


def method_names() -> list[str]:
    """The methods --method accepts: the built-in ones, one file each in llm_prune/methods named
    like the method it registers (tested), listed without importing the package (which imports
    torch); and, where the caller's code has imported it, whatever that code registered."""
    spec = importlib.util.find_spec("..methods", __package__)
    names = {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    registry = sys.modules.get(spec.name)
    return sorted(names | set(registry.METHODS if registry is not None else ()))
