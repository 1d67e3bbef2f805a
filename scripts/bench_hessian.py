"""SparseGPT's per-sample and per-block work beside the straightforward torch code, side by side.

    python scripts/bench_hessian.py --rounds 5 --threads 2 --json benchmarks/hessian-s16.json

For each column count (SmolLM2-135M's 576 and 1536, Llama-2-7B's 4096 and 11008):
- the Hessian update of one calibration sample (``--tokens`` rows): one full ``addmm_`` of
  2·xᵀx into an fp32 matrix (the reference code's way) against ``Hessian.add`` (the upper
  triangle, in bands of rows), and the largest difference between the two Hessians;
- the unstructured mask of one block of 128 columns (half pruned) over that many rows:
  ``magnitude.unstructured_keep`` against the compiled selection (``kernels.select.smallest_keep``),
  and whether the masks are equal (they must be).
Rotating order, median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llm_prune.kernels.select import smallest_keep
from llm_prune.magnitude import prune_count, unstructured_keep
from llm_prune.methods.sparsegpt import Hessian


def median_times(fns: dict, rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times = {label: [] for label in fns}
    labels = list(fns)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            t0 = time.perf_counter()
            fns[label]()
            times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v) for label, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 11008])
    p.add_argument("--tokens", type=int, default=512, help="rows of one sample's inputs (its seqlen)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in args.sizes:
        x = torch.randn(args.tokens, n, generator=g)
        full, banded = torch.zeros(n, n), Hessian(n)
        hessian = median_times({"addmm": lambda: full.addmm_(x.t(), x, alpha=2.0 / args.tokens),
                                "bands": lambda: banded.add(x)}, args.rounds)
        reference = torch.zeros(n, n).addmm_(x.t(), x, alpha=2.0 / args.tokens)
        once = Hessian(n)
        once.add(x)
        score = torch.randn(n, 128, generator=g).square()
        k = prune_count(score.numel(), 0.5)
        mask = median_times({"torch": lambda: unstructured_keep(score, 0.5),
                             "compiled": lambda: smallest_keep(score, k)}, args.rounds)
        row = {"columns": n, "tokens": args.tokens, "threads": args.threads,
               "addmm_s": hessian["addmm"], "bands_s": hessian["bands"], "bands_ratio": hessian["bands"] / hessian["addmm"],
               "max_rel_diff": float((once.H - reference).abs().max() / reference.abs().max()),
               "mask_rows": n, "mask_torch_s": mask["torch"], "mask_compiled_s": mask["compiled"],
               "mask_ratio": mask["compiled"] / mask["torch"],
               "masks_equal": bool(torch.equal(unstructured_keep(score, 0.5), smallest_keep(score, k)))}
        rows.append(row)
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    save(args.json, args.rounds, rows)


def save(path: str | None, rounds: int, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"rounds": rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
