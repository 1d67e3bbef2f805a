"""``llm-prune report DIR``: one markdown page (renders on GitHub) from the results in a directory.

    llm-prune report smollm2-135m-sweep-omp
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, help="a directory written by sweep, inspect, distributions, masks or trace")


def run(args: argparse.Namespace) -> int:
    from ..study.report import write_report

    print(f"wrote {write_report(args.directory)}")
    return 0
