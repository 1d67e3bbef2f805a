"""``llm-prune verify PATH``: check an export against its sparsity.json (hashes, sparsity, N:M, formats, model).

    llm-prune verify smollm2-135m-omp-0.5
    llm-prune verify EXPORT --source ORIGINAL_DIR --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a directory llm-prune exported")
    p.add_argument("--source", type=Path, help="the checkpoint it was pruned from (default: the path recorded, if present)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..verify import verify

    v = verify(args.path, args.source, progress=not args.quiet)
    if args.json:
        print(json.dumps(v.to_json(), indent=1))
    else:
        for check, what in v.checks.items():
            print(f"{check:<8} {what}")
        for problem in v.problems:
            print(f"PROBLEM  {problem}")
        print(f"{args.path}: {'verified' if v.ok else f'{len(v.problems)} problem(s)'}")
    return 0 if v.ok else 1
