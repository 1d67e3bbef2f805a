"""What the trust features cost: verify beside reading the files once, a resume beside an uninterrupted run,
and the CPU evaluation batch size.

    python scripts/bench_trust.py verify CKPT_OR_NAME [--format bitmask] --rounds 3
    python scripts/bench_trust.py resume CKPT --kill-at 2 4 6
    python scripts/bench_trust.py eval-batch --sizes 1 4 8 16 32 --limit 40

verify: exports CKPT (OMP 0.5), then alternates ``llm-prune verify EXPORT`` with ``cat`` of the
export's and the source's files to /dev/null (verify hashes both), fresh processes, medians.
resume: an uninterrupted export, then for each k an export killed (SIGKILL) right after its k-th
block is logged, and the ``--resume`` that finishes it: the resume's time beside the whole run's.
eval-batch: ``llm-prune eval smollm2-135m --tasks arc_easy`` at each fixed batch size, alternating
order over rounds, model seconds per request from each run's results.json.
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

EXE = [sys.executable, "-m", "llm_prune"]
KILL_AFTER_COMMIT = r"""
import os, signal, sys
import llm_prune.writer as W
from llm_prune.cli import main
k, real, n = int(sys.argv[1]), W.ShardWriter.commit, [0]
def commit(self, *a, **kw):
    real(self, *a, **kw)
    n[0] += 1
    if n[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
W.ShardWriter.commit = commit
main(sys.argv[2:])
"""


def run(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def verify(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="llm-prune-verify-"))
    try:
        out = work / "export"
        run([*EXE, args.checkpoint, "--sparsity", "0.5", "--format", args.format, "--out", str(out), "--quiet"])
        source = Path(json.loads((out / "sparsity.json").read_text())["source"]["path"])
        files = [str(f) for d in (out, source) for f in sorted(d.iterdir()) if f.is_file()]
        v, c = [], []
        for r in range(args.rounds):
            for side in (("verify", "cat") if r % 2 == 0 else ("cat", "verify")):
                if side == "verify":
                    v.append(run([*EXE, "verify", str(out), "--quiet"]))
                else:
                    c.append(run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]))
        bytes_read = sum(Path(f).stat().st_size for f in files)
        return {"checkpoint": args.checkpoint, "format": args.format, "bytes": bytes_read, "verify_s": v, "cat_s": c,
                "ratio": statistics.median(v) / statistics.median(c)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resume(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="llm-prune-resume-"))
    try:
        base = [args.checkpoint, "--sparsity", "0.5", "--quiet"]
        whole = run([*EXE, *base, "--out", str(work / "whole")])
        rows = []
        for k in args.kill_at:
            out = work / f"k{k}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", KILL_AFTER_COMMIT, str(k), *base, "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            killed = time.perf_counter() - t0
            resumed = run([*EXE, *base, "--out", str(out), "--resume"])
            rows.append({"killed_after_units": k, "killed_run_s": killed, "resume_s": resumed,
                         "resume_over_whole": resumed / whole})
        return {"checkpoint": args.checkpoint, "whole_s": whole, "kills": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def eval_batch(args) -> dict:
    times: dict[int, list[float]] = {b: [] for b in args.sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for b in (args.sizes if r % 2 == 0 else list(reversed(args.sizes))):
                out = Path(tmp) / f"b{b}"
                run([*EXE, "eval", "smollm2-135m", "--tasks", "arc_easy", "--limit", str(args.limit), "--batch-size",
                     str(b), "--data", "local", "--out", str(out), "--quiet"])
                entry = json.loads((out / "results.json").read_text())["evaluated"]["tasks"]["arc_easy"]
                times[b].append(entry["throughput"]["model_seconds"])
    return {"limit": args.limit, "model_seconds": times,
            "median": {b: statistics.median(t) for b, t in times.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("verify")
    v.add_argument("checkpoint")
    v.add_argument("--format", default="dense")
    v.add_argument("--rounds", type=int, default=3)
    r = sub.add_parser("resume")
    r.add_argument("checkpoint")
    r.add_argument("--kill-at", type=int, nargs="+", default=[2])
    e = sub.add_parser("eval-batch")
    e.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    e.add_argument("--limit", type=int, default=40)
    e.add_argument("--rounds", type=int, default=2)
    for q in (v, r, e):
        q.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"verify": verify, "resume": resume, "eval-batch": eval_batch}[args.what](args)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
