"""Checkpoint bytes per sparse format, and pack/unpack throughput against plain disk writes.

    python scripts/bench_formats.py --out /tmp/bench_formats.json          # SmolLM2 + 2 7B-shaped blocks
    python scripts/bench_formats.py --blocks 1 --skip-smollm2               # quicker

SmolLM2-135M (the embedded real model) is pruned with ``prune_checkpoint`` (OMP, layer scope) at
0.4, 0.5 and 2:4; every shard of the dense export is then re-encoded with the block targets in
each format, written with ``save_file`` and measured on disk, next to ``size_formula``. The
7B-shaped part builds Llama-2-7B blocks (hidden 4096, MLP 11008, fp16, random normal weights),
prunes each matrix the same way, and times encode, decode and the write of each format's shard
(with fsync), plus a plain write of the dense bytes: if encoding is faster than that write, export
is bound by the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llm_prune import PruneConfig, Sparsity, prune_checkpoint, resolve_model
from llm_prune.kernels import formats as F
from llm_prune.magnitude import nm_keep, unstructured_keep

LEVELS = {"0.4": Sparsity(0.4), "0.5": Sparsity(0.5), "2:4": Sparsity(0.5, 2, 4)}
LLAMA7B_BLOCK = {  # name -> [out, in]
    "self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (4096, 4096),
    "self_attn.v_proj.weight": (4096, 4096), "self_attn.o_proj.weight": (4096, 4096),
    "mlp.gate_proj.weight": (11008, 4096), "mlp.up_proj.weight": (11008, 4096),
    "mlp.down_proj.weight": (4096, 11008),
}


def formats_for(level: str) -> list[str]:
    return ["dense", "bitmask", "packed24"] if level == "2:4" else ["dense", "bitmask"]


def write_synced(tensors, path: Path, metadata) -> float:
    t = time.perf_counter()
    save_file(tensors, str(path), metadata=metadata)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


def smollm2(tmp: Path) -> dict:
    src = resolve_model("smollm2-135m")
    out = {}
    for level, sp in LEVELS.items():
        dst = tmp / f"smollm2-{level.replace(':', 'of')}"
        report = prune_checkpoint(src, PruneConfig(sparsity=sp), dst, progress=False)
        targets = set(report["achieved"]["tensors"])
        row = {}
        for fmt in formats_for(level):
            file_bytes = formula = 0
            for shard in sorted(dst.glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                stored, meta = F.encode_all(tensors, {n: fmt for n in tensors if n in targets})
                path = tmp / "enc.safetensors"
                save_file(stored, str(path), metadata={"format": "pt", **meta})
                file_bytes += path.stat().st_size
                for n, t in tensors.items():
                    formula += F.size_formula(t.shape, t.dtype, sp.ratio if n in targets else 0.0,
                                              fmt if n in targets else "dense")
                decoded = F.decode_all(stored, meta)
                assert all(torch.equal(decoded[n].view(torch.int16), t.view(torch.int16)) for n, t in tensors.items())
            row[fmt] = {"file_bytes": file_bytes, "formula_bytes": formula}
        dense = row["dense"]["file_bytes"]
        for fmt in row:
            row[fmt]["vs_dense"] = row[fmt]["file_bytes"] / dense
        out[level] = {"achieved_sparsity": report["achieved"]["targeted"], "targeted_params": report["achieved"]["targeted_params"],
                      "all_params": report["achieved"]["all_params"], "formats": row}
        print(f"smollm2 {level}: " + ", ".join(f"{f} {v['file_bytes'] / 1e6:.1f} MB (formula {v['formula_bytes'] / 1e6:.1f})"
                                              for f, v in row.items()), flush=True)
    return out


def synthetic_block(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{seed}.{n}": torch.randn(s, generator=g, dtype=torch.float32).half()
            for n, s in LLAMA7B_BLOCK.items()}


def prune(t: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    keep = nm_keep(t, sp.n, sp.m) if sp.is_nm else unstructured_keep(t, sp.ratio)
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype))


def seven_b(tmp: Path, n_blocks: int) -> dict:
    out = {level: {f: {"file_bytes": 0, "formula_bytes": 0, "encode_s": 0.0, "decode_s": 0.0, "write_s": 0.0}
                   for f in formats_for(level)} for level in LEVELS}
    dense_bytes, plain_write_s = 0, 0.0
    for b in range(n_blocks):
        block = synthetic_block(b)
        raw = torch.cat([t.view(-1).view(torch.uint8) for t in block.values()])
        dense_bytes += raw.numel()
        plain_write_s += _plain_write(raw, tmp / "plain.bin")
        del raw
        for level, sp in LEVELS.items():
            pruned = {n: prune(t, sp) for n, t in block.items()}
            for fmt in formats_for(level):
                acc = out[level][fmt]
                t0 = time.perf_counter()
                stored, meta = F.encode_all(pruned, {n: fmt for n in pruned})
                acc["encode_s"] += time.perf_counter() - t0
                path = tmp / "enc.safetensors"
                acc["write_s"] += write_synced(stored, path, {"format": "pt", **meta})
                acc["file_bytes"] += path.stat().st_size
                acc["formula_bytes"] += sum(F.size_formula(t.shape, t.dtype, sp.ratio, fmt) for t in pruned.values())
                t0 = time.perf_counter()
                decoded = F.decode_all(stored, meta)
                acc["decode_s"] += time.perf_counter() - t0
                assert all(torch.equal(decoded[n].view(torch.int16), t.view(torch.int16)) for n, t in pruned.items())
                del stored, decoded
                path.unlink()
            print(f"7b block {b} {level}: done", flush=True)
    for level in out:
        for fmt, acc in out[level].items():
            acc["vs_dense"] = acc["file_bytes"] / out[level]["dense"]["file_bytes"]
            # Throughput in dense bytes (the checkpoint's logical size) per second.
            for k in ("encode", "decode", "write"):
                acc[f"{k}_GBps"] = dense_bytes / acc[f"{k}_s"] / 1e9 if acc[f"{k}_s"] > 0 else None
    return {"blocks": n_blocks, "dense_bytes": dense_bytes,
            "plain_write_GBps": dense_bytes / plain_write_s / 1e9, "levels": out}


def _plain_write(raw: torch.Tensor, path: Path) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(raw.numpy()))
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2, help="7B-shaped blocks to synthesise")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if not args.skip_smollm2:
            result["smollm2"] = smollm2(Path(tmp))
        result["llama7b_blocks"] = seven_b(Path(tmp), args.blocks)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
