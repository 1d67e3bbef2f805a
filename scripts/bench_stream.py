"""Streaming OMP vs `cp` vs the naive in-memory way, on 7B-shaped checkpoints and the real SmolLM2.

    python scripts/bench_stream.py --blocks 4 8 16 --work /tmp/llm-prune-bench [--repeat 3]

Builds a synthetic checkpoint with Llama-2-7B block shapes (random fp16, hidden 4096, MLP 11008,
vocab 32000, ~2 GB shards so blocks straddle files as on the hub) for each block count, then times
in fresh subprocesses, side by side: `cp -r` of the checkpoint; the runtime's floor (``FLOOR``:
llm-prune's imports and numba's start-up, then the same `cp`, no pruning); `llm-prune --method
omp`; and the naive way (from_pretrained -> sort-threshold every Linear as the reference
implementations do -> save_pretrained). Each is also timed until its output is on disk (``sync``
after it). Peak RSS comes from wait4() of each child. Linux carries a parent's RSS high-water
mark into forked children, so this parent never imports torch: checkpoints are built and models
resolved in subprocesses. Writes JSON (--json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
BLOCK_SHAPES = {  # name within block -> shape, Llama-2-7B
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (MLP, HIDDEN), "mlp.up_proj.weight": (MLP, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, MLP),
    "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
}
BLOCK_BYTES = sum(2 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in BLOCK_SHAPES.values())

NAIVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
src, dst, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
with torch.no_grad():
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                thresh = torch.sort(w.abs().flatten())[0][int(w.numel() * ratio)]
                w[w.abs() <= thresh] = 0
model.save_pretrained(dst)
"""


# The least a pruner in this runtime can take: llm-prune's imports and one cached kernel call
# (numba's start-up), then cp's own copy, no pruning at all; gc.freeze as the CLI does.
FLOOR = r"""
import gc, subprocess, sys, torch
import llm_prune.cli
from llm_prune.kernels import magnitude
magnitude.max_key(torch.zeros(8, dtype=torch.float16))
gc.freeze()
subprocess.run(["cp", "-r", sys.argv[1], sys.argv[2]], check=True)
"""


def make_synthetic(path: Path, n_blocks: int, shard_bytes: int = 2 * 10**9) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=n_blocks, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=VOCAB, torch_dtype="float16").to_json_file(tmp / "config.json")
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    names += [(f"model.layers.{i}.{n}", s) for i in range(n_blocks) for n, s in BLOCK_SHAPES.items()]
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in names:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.float16)
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
            _flush(tmp, shards, save_file)
    if current:
        shards.append(current)
    _flush(tmp, shards, save_file, final=True)
    os.replace(tmp, path)
    return path


def _flush(tmp: Path, shards: list, save_file, final: bool = False):
    """Write finished shards (names fixed once the count is known, renamed at the end)."""
    for i, shard in enumerate(shards):
        if isinstance(shard, dict) and shard:
            save_file(shard, tmp / f"part-{i}.safetensors", metadata={"format": "pt"})
            shards[i] = list(shard)
    if final:
        n = len(shards)
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"part-{i}.safetensors", tmp / file)
            weight_map.update({name: file for name in names})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure(cmd: list[str], env=None) -> dict:
    """Wall time and peak RSS of one child process (wait4 gives the child's own ru_maxrss).

    Dirty pages left by the previous command are flushed first (``sync``), so no command pays
    for the writeback of another's output."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()[-2000:]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err}")
    os.sync()  # the same flush the next command would start with, timed: until the output is on disk
    return {"wall_s": round(wall, 2), "to_disk_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def llm_prune_cmd(src, out, *args):
    return [sys.executable, "-m", "llm_prune", str(src), *args, "--out", str(out), "--quiet", "--overwrite"]


def _median(runs: list[dict]) -> dict:
    """The run of median wall time (its own peak RSS with it)."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def bench_synthetic(work: Path, blocks: list[int], naive: bool, repeat: int = 1) -> list[dict]:
    rows = []
    start = measure([sys.executable, "-c", "import llm_prune.pipeline, llm_prune.cli"])
    overhead = start["peak_rss_mb"]
    for n in blocks:
        src = work / f"synthetic-7b-{n}"
        subprocess.run([sys.executable, __file__, "--make", str(src), str(n)], check=True)
        size = du(src)
        subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL)  # warm cache
        row = {"blocks": n, "checkpoint_gb": round(size / 1e9, 2), "block_mb": round(BLOCK_BYTES / 2**20, 1),
               "import_overhead_rss_mb": overhead, "import_s": start["wall_s"]}
        cps, omps, floors = [], [], []
        for _ in range(repeat):  # interleaved, so all see the same machine; cp alone varies 2-4x
            shutil.rmtree(work / "copy", ignore_errors=True)
            cps.append(measure(["cp", "-r", str(src), str(work / "copy")]))
            shutil.rmtree(work / "copy", ignore_errors=True)
            floors.append(measure([sys.executable, "-c", FLOOR, str(src), str(work / "copy")]))
            shutil.rmtree(work / "copy", ignore_errors=True)
            omps.append(measure(llm_prune_cmd(src, work / "out", "--method", "omp", "--sparsity", "0.5")))
            shutil.rmtree(work / "out", ignore_errors=True)
        row["cp"], row["omp"], row["floor"] = _median(cps), _median(omps), _median(floors)
        row["floor_over_cp_per_pair"] = [round(f["wall_s"] / c["wall_s"], 2) for c, f in zip(cps, floors)]
        row["cp_runs_s"], row["omp_runs_s"] = [r["wall_s"] for r in cps], [r["wall_s"] for r in omps]
        row["omp_over_cp_per_pair"] = [round(o["wall_s"] / c["wall_s"], 2) for c, o in zip(cps, omps)]
        # Until the bytes are on disk (each command followed by sync): what a run longer than the
        # page cache can absorb is bound by, and what a 13 GB 7B output always is here.
        row["omp_over_cp_to_disk_per_pair"] = [round(o["to_disk_s"] / c["to_disk_s"], 2) for c, o in zip(cps, omps)]
        if naive:
            row["naive"] = measure([sys.executable, "-c", NAIVE, str(src), str(work / "naive"), "0.5"])
            shutil.rmtree(work / "naive", ignore_errors=True)
            row["naive_over_omp_time"] = round(row["naive"]["wall_s"] / row["omp"]["wall_s"], 2)
            row["naive_over_omp_rss"] = round(row["naive"]["peak_rss_mb"] / row["omp"]["peak_rss_mb"], 2)
        row["omp_over_cp_time"] = round(row["omp"]["wall_s"] / row["cp"]["wall_s"], 2)
        row["omp_rss_over_block"] = round((row["omp"]["peak_rss_mb"] - overhead) / row["block_mb"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_smollm2(work: Path) -> list[dict]:
    src = subprocess.run([sys.executable, "-c", "from llm_prune.models import resolve_model as r; print(r('smollm2-135m'))"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    for label, args in [("0.5 layer", ["--sparsity", "0.5"]), ("0.5 global", ["--sparsity", "0.5", "--scope", "global"]),
                        ("2:4", ["--pattern", "2:4"])]:
        r = measure(llm_prune_cmd(src, work / "smol", "--method", "omp", *args))
        r["setting"] = label
        print(json.dumps(r), flush=True)
        rows.append(r)
        shutil.rmtree(work / "smol", ignore_errors=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--work", type=Path, default=Path("/tmp/llm-prune-bench"))
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="cp and llm-prune runs per size, interleaved (median reported)")
    p.add_argument("--json", type=Path, default=Path("bench-out/stream.json"))
    p.add_argument("--make", nargs=2, metavar=("DIR", "BLOCKS"), help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.make:
        make_synthetic(Path(args.make[0]), int(args.make[1]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "synthetic": bench_synthetic(args.work, args.blocks, not args.no_naive, args.repeat),
              "smollm2": bench_smollm2(args.work)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print("\n| blocks | GB | cp s | omp s | omp/cp | per pair | floor/cp per pair | to disk: cp s | omp s | per pair "
          "| omp RSS MB | (RSS-import)/block | naive s | naive RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["synthetic"]:
        nv = r.get("naive", {})
        pairs, floor_pairs, disk_pairs = (", ".join(map(str, r[k])) for k in (
            "omp_over_cp_per_pair", "floor_over_cp_per_pair", "omp_over_cp_to_disk_per_pair"))
        print(f"| {r['blocks']} | {r['checkpoint_gb']} | {r['cp']['wall_s']} | {r['omp']['wall_s']} | "
              f"{r['omp_over_cp_time']} | {pairs} | {floor_pairs} | {r['cp']['to_disk_s']} | {r['omp']['to_disk_s']} | "
              f"{disk_pairs} | "
              f"{r['omp']['peak_rss_mb']} | {r['omp_rss_over_block']} | {nv.get('wall_s', '-')} | {nv.get('peak_rss_mb', '-')} |")
    print(f"\nstart-up alone (python -c 'import llm_prune.cli'): {result['synthetic'][0]['import_s']} s")
    for r in result["smollm2"]:
        print(f"| SmolLM2 {r['setting']} | {r['wall_s']} s | {r['peak_rss_mb']} MB |")


if __name__ == "__main__":
    main()
