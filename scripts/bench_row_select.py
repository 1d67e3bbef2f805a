"""Wanda's and RIA's per-row choice: a stable sort (the reference code's way) against selections.

    python scripts/bench_row_select.py --rounds 5 --threads 2 --json benchmarks/row-select.json

For each shape (SmolLM2-135M's attention, MLP and down projection; Llama-2-7B's), random
Wanda-like scores (|normal| times a per-column norm), half of each row pruned: the time of the
first k of ``torch.sort(stable=True)``, torch's selection ``llm_prune.methods.wanda.smallest_per_row``
and the compiled one ``row_keep`` uses (``llm_prune.kernels.select.row_smallest_keep``), in
rotating order after a warm-up, median of ``--rounds``, and whether the masks are equal (they must be).
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_hessian import median_times, save  # (scripts/ is on the path when run as a script)

from llm_prune.kernels.select import row_smallest_keep
from llm_prune.methods.wanda import smallest_per_row

SHAPES = {"smollm2 q/o": (576, 576), "smollm2 k/v": (192, 576), "smollm2 gate/up": (1536, 576),
          "smollm2 down": (576, 1536), "7b q/k/v/o": (4096, 4096), "7b gate/up": (11008, 4096),
          "7b down": (4096, 11008)}


def by_sort(score: torch.Tensor, k: int) -> torch.Tensor:
    first = torch.sort(score, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, first, True)


def compiled(score: torch.Tensor, k: int) -> torch.Tensor:
    return ~row_smallest_keep(score, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        score = torch.randn(shape, generator=g).abs() * torch.rand(shape[1], generator=g)
        k = shape[1] // 2
        fns = {"sort": by_sort, "select": smallest_per_row, "compiled": compiled}
        times = median_times({label: lambda fn=fn: fn(score, k) for label, fn in fns.items()}, args.rounds)
        masks = [fn(score, k) for fn in fns.values()]
        row = {"shape": name, "rows": shape[0], "cols": shape[1], "threads": args.threads,
               **{f"{label}_s": t for label, t in times.items()},
               "equal": all(torch.equal(masks[0], m) for m in masks[1:])}
        row["ratio"] = row["select_s"] / row["sort_s"]
        row["compiled_ratio"] = row["compiled_s"] / row["select_s"]
        rows.append(row)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    save(args.json, args.rounds, rows)


if __name__ == "__main__":
    main()
