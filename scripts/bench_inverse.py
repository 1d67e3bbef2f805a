"""SparseGPT's inverse Hessian factor: the reference code's three steps against ours, side by side.

    python scripts/bench_inverse.py --sizes 576 1536 4096 11008 --rounds 3 --threads 2

The reference (IST-DASLab/sparsegpt, llm-compressor): Cholesky of H + λI, ``cholesky_inverse``,
Cholesky of that inverse (upper). Ours (``methods.sparsegpt.inverse_cholesky``): one Cholesky
of the reversed matrix and one triangular inverse. Same factor up to rounding; the maximum
relative difference to an fp64 answer is printed for both (sizes up to 4096; fp64 beyond that
is slow here). Alternating rounds, medians, on Hessians of random badly scaled inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llm_prune.methods.sparsegpt import inverse_cholesky


def three_steps(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    Hd = H.clone()
    Hd.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    L, _ = torch.linalg.cholesky_ex(Hd)
    U, _ = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[576, 1536, 4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        X = torch.randn(2 * n, n, generator=g) * torch.rand(n, generator=g) ** 3
        H = 2 * X.t() @ X / X.shape[0]
        del X
        times = {"three_steps": [], "ours": []}
        three_steps(H), inverse_cholesky(H)  # warm-up: scipy's import, the BLAS threads
        for _ in range(args.rounds):
            for name, f in (("three_steps", three_steps), ("ours", inverse_cholesky)):
                t = time.perf_counter()
                f(H)
                times[name].append(time.perf_counter() - t)
        row = {"n": n, **{f"{k}_s": round(statistics.median(v), 5) for k, v in times.items()}}
        row["ratio"] = round(row["ours_s"] / row["three_steps_s"], 3)
        if n <= 4096:
            Hd = H.double()
            Hd.diagonal().add_(0.01 * float(torch.diagonal(Hd).mean()))
            ref = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
            for name, f in (("three_steps", three_steps), ("ours", inverse_cholesky)):
                row[f"{name}_rel_err"] = float((f(H).double() - ref).abs().max() / ref.abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
