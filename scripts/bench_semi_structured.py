"""Latency of dense vs 2:4 semi-structured nn.Linear at Llama-2-7B shapes, and the crossover.

    python scripts/bench_semi_structured.py --out semi.json                # fp16 + bf16, both backends
    python scripts/bench_semi_structured.py --dtypes fp16 --tokens 1 16 256 4096

Needs a CUDA GPU with sparse tensor cores (Ampere or newer) and a CUDA build of torch; on any
other machine it says so and exits with status 2. For each weight shape [out, in] (4096x4096,
11008x4096, 4096x11008), dtype and token count it times ``F.linear(x, W)`` with the dense weight
and with the same 2:4-pruned weight converted by ``llm_prune.kernels.semi_structured`` (CUTLASS
built straight from packed24, and cuSPARSELt when torch has it), with CUDA events over many
repetitions after warm-up, checks the outputs agree, and reports the speed-up and the smallest
token count from which 2:4 stays faster (the crossover; "never" when it does not).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def time_ms(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench_shape(out_f: int, in_f: int, dtype, tokens: list[int], backends: list[str], reps: int) -> dict:
    from llm_prune.kernels import formats as F
    from llm_prune.kernels.semi_structured import to_semi_structured
    from llm_prune.magnitude import nm_keep

    torch.manual_seed(0)
    w = torch.randn(out_f, in_f, dtype=dtype)
    w = torch.where(nm_keep(w, 2, 4), w, torch.zeros((), dtype=dtype))
    stored, _ = F.encode("weight", w, "packed24")
    dense = nn.Linear(in_f, out_f, bias=False, dtype=dtype, device="cuda")
    with torch.no_grad():
        dense.weight.copy_(w.cuda())
    sparse = {}
    for backend in backends:
        lin = nn.Linear(in_f, out_f, bias=False, dtype=dtype, device="cuda")
        with torch.no_grad():
            lin.weight.copy_(w.cuda())
        # CUTLASS is built straight from the packed24 parts (module "0" of the Sequential).
        packed = {"0.weight": (stored["weight.values"], stored["weight.meta"])} if backend == "cutlass" else None
        report = to_semi_structured(nn.Sequential(lin), packed24=packed, backend=backend)
        if not report.converted:
            raise SystemExit(f"{out_f}x{in_f} {dtype} was not converted: {report.skipped}")
        sparse[backend] = lin
    rows = []
    for n in tokens:
        x = torch.randn(n, in_f, dtype=dtype, device="cuda")
        ref = dense(x)
        row = {"tokens": n, "dense_ms": time_ms(lambda: dense(x), reps)}
        for backend, lin in sparse.items():
            y = lin(x)
            err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
            row[f"{backend}_ms"] = time_ms(lambda: lin(x), reps)
            row[f"{backend}_speedup"] = row["dense_ms"] / row[f"{backend}_ms"]
            row[f"{backend}_max_rel_err"] = err
        rows.append(row)
        print(f"{out_f}x{in_f} {str(dtype)[6:]} tokens={n}: dense {row['dense_ms']:.4f} ms  " +
              "  ".join(f"{b} {row[f'{b}_ms']:.4f} ms ({row[f'{b}_speedup']:.2f}x)" for b in sparse), flush=True)
    crossover = {b: _crossover(rows, b) for b in sparse}
    return {"shape": [out_f, in_f], "dtype": str(dtype)[6:], "rows": rows, "crossover_tokens": crossover}


def _crossover(rows, backend):
    """Smallest token count from which 2:4 is faster at every larger count measured."""
    faster = [r[f"{backend}_speedup"] > 1.0 for r in rows]
    for i in range(len(rows)):
        if all(faster[i:]):
            return rows[i]["tokens"]
    return "never"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_semi_structured: no CUDA GPU here (torch "
              f"{torch.__version__}); 2:4 sparse tensor cores need an Ampere-or-newer NVIDIA GPU and a CUDA "
              "build of torch. Nothing was measured.", file=sys.stderr)
        sys.exit(2)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"bench_semi_structured: {torch.cuda.get_device_name()} (sm_{major}{minor}) has no 2:4 sparse "
              "tensor cores (needs sm_80 or newer). Nothing was measured.", file=sys.stderr)
        sys.exit(2)
    backends = ["cutlass"] + (["cusparselt"] if torch.backends.cusparselt.is_available() else [])
    result = {"gpu": torch.cuda.get_device_name(), "capability": f"sm_{major}{minor}", "torch": torch.__version__,
              "backends": backends, "results": []}
    print(f"{result['gpu']} ({result['capability']}), torch {torch.__version__}, backends {backends}")
    with torch.no_grad():
        for name in args.dtypes:
            for out_f, in_f in SHAPES:
                result["results"].append(bench_shape(out_f, in_f, DTYPES[name], args.tokens, backends, args.reps))
    for r in result["results"]:
        print(f"crossover {r['shape'][0]}x{r['shape'][1]} {r['dtype']}: {r['crossover_tokens']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
