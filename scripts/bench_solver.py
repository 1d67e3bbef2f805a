"""SparseGPT's solve of one matrix, by part, at the shapes of SmolLM2 and Llama-2-7B.

    python scripts/bench_solver.py --repeat 3 --threads 2 --json out.json
    PYTHONPATH=/path/to/other-tree-pkg python scripts/bench_solver.py ...   # the same on other code

For each (rows, cols): the inverse Hessian factor (``_live_inverse``), the check that the Hessian
is finite (``torch.isfinite(H).all()`` against ``magnitude.all_finite``), the compiled column loop
alone over every block of 128 columns (``kernels.sparsegpt.solve_block_``, the mask given), and
the whole ``sparsegpt_prune`` given the factor (column loops, lazy batch updates, masks, casts);
with ``--updates`` also the lazy batch updates alone, written both ways (``W[:, i2:] -= E @ Hinv``
and ``addmm_`` into W in place), and whether they give the same bits.
Best of ``--repeat``; GFLOP/s against the arithmetic of each part (a multiply-add counts 2):
column loop rows·cols·(B+1), whole solve that plus the lazy updates' rows·cols². Run two trees
alternately (``PYTHONPATH``) for a ratio; the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llm_prune.config import Sparsity
from llm_prune.kernels import sparsegpt as K
from llm_prune.magnitude import all_finite
from llm_prune.methods.sparsegpt import _live_inverse, sparsegpt_prune

SHAPES = {"smollm2 q/o": (576, 576), "smollm2 k/v": (192, 576), "smollm2 gate/up": (1536, 576),
          "smollm2 down": (576, 1536), "7b q/k/v/o": (4096, 4096), "7b gate/up": (11008, 4096),
          "7b down": (4096, 11008)}
BLOCK = 128


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def lazy_updates(W: torch.Tensor, err: torch.Tensor, hinv: torch.Tensor, way: str) -> torch.Tensor:
    """Every block's update of the columns after it, as ``sparsegpt_prune`` does (err given)."""
    W = W.clone()
    cols = W.shape[1]
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        if way == "sub":
            W[:, i2:].sub_(err[:, i1:i2] @ hinv[i1:i2, i2:])
        else:
            W[:, i2:].addmm_(err[:, i1:i2], hinv[i1:i2, i2:], alpha=-1)
    return W


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--updates", action="store_true",
                   help="also time the lazy batch updates alone, as a product then a subtraction and as addmm_ in place")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows_out = []
    for name in args.only:
        rows, cols = SHAPES[name]
        g = torch.Generator().manual_seed(rows + cols)
        # A Hessian of 256 tokens (rank 256: the dampening makes it definite), cheap to make at 11008
        # columns; the factor's and the solve's arithmetic do not depend on its values.
        X = torch.randn(256, cols, generator=g)
        H = 2 * X.t() @ X / X.shape[0]
        del X
        W = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
        t_inv = best(lambda: _live_inverse(H, 0.01), args.repeat)
        all_finite(H)  # numba's kernel loaded before it is timed
        finite = {"finite_isfinite_s": round(best(lambda: bool(torch.isfinite(H).all()), args.repeat), 4),
                  "finite_all_finite_s": round(best(lambda: all_finite(H), args.repeat), 4)}
        hinv = _live_inverse(H, 0.01)
        keep = torch.rand(rows, cols, generator=g) > 0.5
        Wf = W.float()

        def loops():
            for i1 in range(0, cols, BLOCK):
                i2 = min(i1 + BLOCK, cols)
                W1, k1 = Wf[:, i1:i2].clone(), keep[:, i1:i2].clone()
                K.solve_block_(W1, hinv[i1:i2, i1:i2], k1, torch.zeros_like(W1))

        t_loop = best(loops, args.repeat)
        t_solve = best(lambda: sparsegpt_prune(W, H, Sparsity(0.5), hinv=hinv), args.repeat)
        updates = {}
        if args.updates:  # the lazy batch updates alone, both ways: product then subtract / in place
            err = torch.randn(rows, cols, generator=g)
            results = {}
            for way in ("sub", "addmm_"):
                t = best(lambda: lazy_updates(Wf, err, hinv, way), args.repeat)
                updates[f"lazy_{way}_s"] = round(t, 4)
                updates[f"lazy_{way}_gflops"] = round(rows * cols * cols / t / 1e9, 1)
                results[way] = lazy_updates(Wf, err, hinv, way)
            same = torch.equal(results["sub"].view(torch.int32), results["addmm_"].view(torch.int32))
            updates["lazy_same_bits"] = same
        loop_flop = rows * cols * (BLOCK + 1)
        row = {"shape": name, "rows": rows, "cols": cols, "inverse_s": round(t_inv, 4),
               "column_loop_s": round(t_loop, 4), "column_loop_gflops": round(loop_flop / t_loop / 1e9, 2),
               "solve_given_inverse_s": round(t_solve, 4),
               "solve_gflops": round((loop_flop + rows * cols * cols) / t_solve / 1e9, 1)} | finite | updates
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeat": args.repeat, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
