"""The magnitude kernels on one 7B-shaped weight, as the exporter calls them.

    python scripts/bench_kernels.py [--repeat 5] [--json FILE]

For an 11008x4096 weight (Llama-2-7B's MLP shape) in fp16, bf16 and fp32: the layer-scope
threshold (``methods.omp.plan``: key histogram plus the finiteness check),
applying it into a 4 MiB buffer piece by piece as the exporter does (ties included), 2:4 the
same way, and the key histogram alone. Prints G weights/s, the best of ``--repeat``
rounds. To compare two versions, run this file from each checkout alternately on the same
machine (PYTHONPATH=CHECKOUT); BENCHMARKS.md lists the pairs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llm_prune.config import Sparsity
from llm_prune.kernels import magnitude as K
from llm_prune.methods.omp import Plan, plan as layer_plan

PIECE_BYTES = 4 << 20


def _apply(plan_of, w: torch.Tensor, buf: torch.Tensor) -> int:
    plan, flat, zeros = plan_of(), w.reshape(-1), 0
    step = buf.numel() // plan.align * plan.align
    for at in range(0, flat.numel(), step):
        piece = flat[at:at + step]
        zeros += plan.apply(piece, buf[:piece.numel()])
    return zeros


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    half = Sparsity(0.5)
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w = (torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
        buf = torch.empty(PIECE_BYTES // w.element_size(), dtype=dtype)
        plan = layer_plan(w, half)
        cases = {
            "threshold (layer_plan 0.5)": lambda: layer_plan(w, half),
            "apply 0.5 into pieces": lambda: _apply(lambda: Plan(key=plan.key, ties=plan.ties), w, buf),
            "apply 2:4 into pieces": lambda: _apply(lambda: Plan(nm=(2, 4)), w, buf),
            "key histogram": lambda: K.key_histogram(w),
        }
        best = {}
        for name, fn in cases.items():
            fn()  # compiled / loaded from numba's cache
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            best[name] = round(w.numel() / min(times) / 1e9, 2)
        row = {"dtype": str(dtype).removeprefix("torch."), "g_weights_per_s": best}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
