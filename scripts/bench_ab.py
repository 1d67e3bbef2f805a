"""Time the same llm-prune commands on two versions of the code, side by side, alternating.

    git worktree add /tmp/llm-prune-base <commit>       # the "before" code, anywhere on disk
    python scripts/bench_ab.py --base /tmp/llm-prune-base --rounds 5 --json benchmarks/ab.json

Each round runs every case once with the base code and once with this checkout, in alternating
order (base first on even rounds), each in a fresh process, so drift on a noisy machine hits both
sides alike. Reports the median wall time of each side and their ratio (this / base). The base
code and this checkout are each put on PYTHONPATH through a small tree of links (``kernels/`` and
``eval/`` mapped under the package, as setuptools installs them), so nothing needs installing.

Cases: ``import`` (``import llm_prune``), ``startup`` (``llm-prune --version``: the CLI with its
imports), ``export tiny`` (OMP 0.5 of a 2-block Llama of 40 kB: the whole process is the
start-up up to the first block, plus nothing), SmolLM2 exports (OMP layer 0.5, global 0.4,
2:4) into a scratch directory, and a small calibrated run (Wanda, 4 windows of 128 tokens: mostly
start-up), with the calibration windows cached by an earlier run and with them removed first.

``--synthetic-7b N`` adds exports of a Llama-2-7B-shaped checkpoint of N blocks (random fp16, as
``bench_stream.py`` builds them; OMP layer and global 0.5, 2:4, bitmask), where the exporter's own
work outweighs start-up; ``--settle`` removes the previous output, syncs and rests 3 s before
every timed run, so that one run's write-back does not land in the next (session 18's protocol):

    python scripts/bench_ab.py --base /tmp/llm-prune-base --rounds 4 --synthetic-7b 16 --settle \
        --only "7B-shaped omp 0.5" "7B-shaped 2:4"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


TINY = """
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64)
transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
"""


def synthetic_cases(out: Path, ckpt: Path) -> dict[str, list[str]]:
    export = [sys.executable, "-m", "llm_prune", str(ckpt), "--quiet", "--overwrite", "--out", str(out / "x7b")]
    return {"7B-shaped omp 0.5": [*export, "--sparsity", "0.5"],
            "7B-shaped omp 0.5 global": [*export, "--sparsity", "0.5", "--scope", "global"],
            "7B-shaped 2:4": [*export, "--pattern", "2:4"],
            "7B-shaped bitmask": [*export, "--sparsity", "0.5", "--format", "bitmask"]}


def cases(out: Path) -> dict[str, list[str]]:
    from llm_prune.paths import cache_dir

    export = [sys.executable, "-m", "llm_prune", "smollm2-135m", "--quiet", "--overwrite", "--out", str(out / "x")]
    wanda = ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "128"]
    # "no cached windows": a fresh cache folder per run that shares only the converted SmolLM2 and
    # the hash memo with the user's cache (which keeps the windows the other case finds)
    real = cache_dir()
    fresh = (f'd=$(mktemp -d -p "{out}"); ln -s "{real}/models" "$d/models"; cp "{real}/hashes.json" "$d/" 2>/dev/null; '
             'LLM_PRUNE_CACHE="$d" exec "$0" "$@"')
    if not (out / "tiny").is_dir():
        subprocess.run([sys.executable, "-c", TINY, str(out / "tiny")], check=True)
    return {
        "import": [sys.executable, "-c", "import llm_prune"],
        "startup": [sys.executable, "-m", "llm_prune", "--version"],
        "export tiny omp 0.5": [sys.executable, "-m", "llm_prune", str(out / "tiny"), "--quiet", "--overwrite",
                                "--out", str(out / "t"), "--sparsity", "0.5"],
        "export omp 0.5": [*export, "--method", "omp", "--sparsity", "0.5"],
        "export omp 0.4 global": [*export, "--method", "omp", "--sparsity", "0.4", "--scope", "global"],
        "export omp 2:4": [*export, "--method", "omp", "--pattern", "2:4"],
        "wanda 4x128": [*export, *wanda],
        "wanda 4x128 no cached windows": ["sh", "-c", fresh, *export, *wanda],
    }


def linked_tree(base: Path, root: Path) -> Path:
    """``root/llm_prune`` holding links to the base checkout's package, kernels and eval."""
    pkg = root / "llm_prune"
    pkg.mkdir(parents=True)
    for f in (base / "llm_prune").iterdir():
        (pkg / f.name).symlink_to(f)
    (pkg / "kernels").symlink_to(base / "kernels")
    (pkg / "eval").symlink_to(base / "eval")
    return root


def timed(cmd: list[str], env: dict, settle: Path | None = None) -> float:
    if settle is not None:  # the last run's output gone and written back, then a pause
        shutil.rmtree(settle, ignore_errors=True)
        os.sync()
        time.sleep(3)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="a checkout of the code to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", nargs="+", help="case names to run (default: all)")
    p.add_argument("--synthetic-7b", type=int, metavar="BLOCKS",
                   help="add exports of a Llama-2-7B-shaped checkpoint of this many blocks")
    p.add_argument("--synthetic-dir", type=Path, default=Path("/tmp/llm-prune-bench"),
                   help="where that checkpoint is kept (built once)")
    p.add_argument("--settle", action="store_true",
                   help="remove the last output, sync and rest 3 s before every timed run")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-prune-ab-"))
    try:
        sides = {"base": {**os.environ, "PYTHONPATH": str(linked_tree(args.base.resolve(), work / "base"))},
                 "this": {**os.environ, "PYTHONPATH": str(linked_tree(HERE, work / "this"))}}
        available = cases(work)
        if args.synthetic_7b:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_stream import make_synthetic

            ckpt = make_synthetic(args.synthetic_dir / f"synthetic-{args.synthetic_7b}", args.synthetic_7b)
            available |= synthetic_cases(work, ckpt)
        todo = {k: v for k, v in available.items() if not args.only or k in args.only}
        settle = work / "x7b" if args.settle else None
        for name, cmd in todo.items():  # warm-up: numba caches, page cache, the converted SmolLM2
            for env in sides.values():
                timed(cmd, env, settle)
        times: dict[str, dict[str, list[float]]] = {k: {"base": [], "this": []} for k in todo}
        for r in range(args.rounds):
            for name, cmd in todo.items():
                for side in (["base", "this"] if r % 2 == 0 else ["this", "base"]):
                    times[name][side].append(timed(cmd, sides[side], settle))
        rows = {}
        print(f"{'case':<24}{'base s':>9}{'this s':>9}{'ratio':>8}   (median of {args.rounds}, alternating)")
        for name, t in times.items():
            b, n = statistics.median(t["base"]), statistics.median(t["this"])
            rows[name] = {"base_s": b, "this_s": n, "ratio": n / b, "base_all": t["base"], "this_all": t["this"]}
            print(f"{name:<24}{b:9.2f}{n:9.2f}{n / b:8.2f}")
        if args.json:
            args.json.write_text(json.dumps({"base": str(args.base), "rounds": args.rounds, "cases": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
