"""Peak memory and time of an export on first contact with a checkpoint, beside a run once its hashes are known.

    python scripts/bench_first_contact.py --blocks 4 8 16 32 --work /tmp/llm-prune-bench --json benchmarks/first-contact.json

For each size, a Llama-2-7B-shaped synthetic checkpoint (random fp16, ~2 GB shards, as
scripts/bench_stream.py builds them) is exported by ``llm-prune CKPT --sparsity 0.5`` under
``/usr/bin/time -v`` (as a user would measure it), twice: first with an empty llm-prune cache
(nothing known: the source's files are hashed during the run), then again with the cache that run
left (hashes remembered). Reports wall time and peak RSS of each, one block's size, and the
peak RSS of a process that only imports what the exporter imports. ``--settle`` syncs and rests
before every timed run (session 18's protocol in ``bench_ab.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import BLOCK_BYTES  # noqa: E402


def timed(cmd: list[str], env: dict, cpu: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd`` as /usr/bin/time -v reports them; ``cpu`` gets its
    user and system seconds (a steadier measure of work than wall time on a noisy VM)."""
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, check=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    h, m, s = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", done.stderr).groups()
    if cpu is not None:
        for kind in ("User", "System"):
            cpu[kind.lower()] = float(re.search(kind + r" time \(seconds\): ([\d.]+)", done.stderr).group(1))
    return int(h or 0) * 3600 + int(m) * 60 + float(s), rss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--work", type=Path, default=Path("/tmp/llm-prune-bench"))
    p.add_argument("--json", type=Path)
    p.add_argument("--cp", action="store_true", help="also time `cp -r` of the checkpoint after the two exports")
    p.add_argument("--repeat", type=int, default=1, help="rounds per size (first, cached, cp each), medians printed")
    p.add_argument("--warm-source", action="store_true",
                   help="read the checkpoint into the page cache before each export: the CPU-bound case, no disk reads")
    p.add_argument("--scope", choices=["layer", "global"], default="layer", help="the exports' --scope")
    p.add_argument("--settle", action="store_true",
                   help="sync and rest 3 s before every timed run, so that one run's write-back does not land in the next")
    args = p.parse_args()
    rows = []
    exe = [sys.executable, "-m", "llm_prune"]
    _, imports = timed([sys.executable, "-c", "import llm_prune.cli, llm_prune.pipeline"], dict(os.environ))
    for n in args.blocks:
        ckpt = args.work / f"synthetic-{n}"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"from bench_stream import make_synthetic; from pathlib import Path; "
                        f"make_synthetic(Path({str(ckpt)!r}), {n})"], check=True)
        for _ in range(args.repeat):
            rows.append(_round(exe, ckpt, args.work / f"out-{n}", n, imports, args.cp, args.settle, args.warm_source,
                               args.scope))
            _print(rows[-1], args.cp)
        if args.repeat > 1:
            _print(_medians([r for r in rows if r["blocks"] == n]), args.cp, "median")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _clear(out: Path, settle: bool) -> None:
    """Remove the last output; with ``settle``, also wait for its write-back and rest."""
    shutil.rmtree(out, ignore_errors=True)
    if settle:
        subprocess.run(["sync"], check=True)
        time.sleep(3)


def _round(exe: list[str], ckpt: Path, out: Path, n: int, imports: float, cp: bool, settle: bool = False,
           warm_source: bool = False, scope: str = "layer") -> dict:
    """One round: the export with an empty llm-prune cache, again with the cache it left, then cp."""
    cache = Path(tempfile.mkdtemp(prefix="llm-prune-cache-"))
    env = {**os.environ, "LLM_PRUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    row = {"blocks": n, "scope": scope, "block_mib": BLOCK_BYTES / 2**20, "imports_mib": imports}
    try:
        for label in ("first", "cached"):
            _clear(out, settle)
            if warm_source:
                subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, sorted(ckpt.iterdir()))], check=True)
            cpu: dict = {}
            row[f"{label}_s"], row[f"{label}_rss_mib"] = timed([*exe, str(ckpt), "--sparsity", "0.5", "--scope", scope,
                                                                "--out", str(out), "--quiet"], env, cpu)
            row[f"{label}_user_s"], row[f"{label}_sys_s"] = cpu["user"], cpu["system"]
        row["first_over_cached_time"] = row["first_s"] / row["cached_s"]
        if cp:  # the copy the export is measured against, right after (page cache as warm)
            _clear(out, settle)
            row["cp_s"], _ = timed(["cp", "-r", str(ckpt), str(out)], env)
            row["first_over_cp"], row["cached_over_cp"] = row["first_s"] / row["cp_s"], row["cached_s"] / row["cp_s"]
        row["first_rss_blocks_above_imports"] = (row["first_rss_mib"] - imports) / row["block_mib"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return row


def _medians(rows: list[dict]) -> dict:
    import statistics

    return {**{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "scope"},
            "blocks": rows[0]["blocks"], "scope": rows[0]["scope"]}


def _print(row: dict, cp: bool, label: str = "") -> None:
    print(f"{row['blocks']} blocks{' ' + label if label else ''}: first {row['first_s']:.1f} s / "
          f"{row['first_rss_mib']:.0f} MiB, cached {row['cached_s']:.1f} s / {row['cached_rss_mib']:.0f} MiB, "
          f"first/cached {row['first_over_cached_time']:.2f} (CPU s, user+sys: {row['first_user_s'] + row['first_sys_s']:.1f} / "
          f"{row['cached_user_s'] + row['cached_sys_s']:.1f}); first-contact peak "
          f"{row['first_rss_blocks_above_imports']:.2f} blocks above the imports ({row['imports_mib']:.0f} MiB)"
          + (f"; cp -r {row['cp_s']:.1f} s: first {row['first_over_cp']:.2f}x, cached {row['cached_over_cp']:.2f}x"
             if cp else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
