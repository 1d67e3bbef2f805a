"""Time and peak RSS of pruning at load time vs a plain transformers load, each in a fresh process.

    python scripts/bench_load.py --model smollm2-135m
    python scripts/bench_load.py --synthetic-7b --blocks 3

Configurations (one subprocess each, run one after another so they never share the CPU):
  hf             AutoModelForCausalLM.from_pretrained(path)         the baseline
  load           llm_prune.load(path)                               no pruning
  layer-0.5      from_pretrained(path, sparsity=0.5)
  2:4            from_pretrained(path, pattern="2:4")
  global-first   from_pretrained(..., scope="global") with an empty llm-prune cache (hashes + tables pass)
  global-cached  the same again: tables from the cache
  global-0.7     another sparsity, same cached tables
  set_sparsity   latency of set_sparsity(model, 0.6) on a model loaded at 0.5 (layer and global)
Prints a markdown table and writes the raw numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers, llm_prune
from llm_prune.loading import from_pretrained, load, set_sparsity
kind, path = sys.argv[1], sys.argv[2]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
t0 = time.perf_counter()
if kind == "hf":
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
elif kind == "load":
    model = load(path, progress=False)
else:
    scope = "global" if kind.startswith(("global", "set-global")) else "layer"
    s = 0.7 if kind == "global-0.7" else 0.5
    kw = dict(pattern="2:4") if kind == "2:4" else dict(sparsity=s)
    model = from_pretrained(path, scope=scope, progress=False, **kw)
out = {"time_s": time.perf_counter() - t0, "peak_rss": rss(), "rss_after_imports": base}
# transformers leaves weights as lazy file mappings: read one byte per page of every weight so
# both loaders are compared holding a usable model.
with torch.no_grad():
    for p in model.parameters():
        p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
out["peak_rss_touched"] = rss()
if kind.startswith("set-"):
    t1 = time.perf_counter()
    set_sparsity(model, 0.6)
    out["set_sparsity_s"] = time.perf_counter() - t1
out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(out))
"""

KINDS = ["hf", "load", "layer-0.5", "2:4", "global-first", "global-cached", "global-0.7", "set-layer", "set-global"]


def synthetic_7b(path: Path, blocks: int, vocab: int = 32000, hidden: int = 4096, mlp: int = 11008) -> Path:
    """A Llama-2-7B-shaped checkpoint with ``blocks`` blocks of random fp16 (one shard per block)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)  # noqa: E731
    weight_map, n_files = {}, blocks + 1
    for i in range(blocks):
        p = f"model.layers.{i}."
        tensors = {p + "self_attn." + k + "_proj.weight": rnd(hidden, hidden) for k in "qkvo"}
        tensors.update({p + "mlp.gate_proj.weight": rnd(mlp, hidden), p + "mlp.up_proj.weight": rnd(mlp, hidden),
                        p + "mlp.down_proj.weight": rnd(hidden, mlp),
                        p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
                        p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16)})
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    rest = {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    file = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(rest, str(path / file), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype="float16").save_pretrained(path)
    return path


def run(kind: str, path: Path, cache: Path) -> dict:
    env = {**os.environ, "LLM_PRUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--synthetic-7b", action="store_true")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "llm-prune-bench-load")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the best time is kept)")
    ap.add_argument("--kinds", nargs="+", default=KINDS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.synthetic_7b:
        path = synthetic_7b(args.dir / f"synthetic-7b-{args.blocks}blocks", args.blocks)
    else:
        from llm_prune.models import resolve_model

        path = resolve_model(args.model)
    ckpt_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    for f in Path(path).glob("*.safetensors"):  # warm the page cache: every configuration reads from RAM
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    cache = Path(tempfile.mkdtemp(prefix="bench-load-cache-"))
    results = {}
    for kind in args.kinds:
        runs = []
        for _ in range(args.repeat if kind != "global-first" else 1):
            runs.append(run(kind, path, cache))
        best = min(runs, key=lambda r: r["time_s"])
        results[kind] = best
        print(f"{kind:14s} {best['time_s']:7.2f} s  peak RSS {best['peak_rss'] / 2**20:8.0f} MiB"
              + (f"  set_sparsity {best['set_sparsity_s']:.2f} s" if "set_sparsity_s" in best else ""), flush=True)
    hf = results.get("hf")
    print(f"\ncheckpoint {path} ({ckpt_bytes / 2**20:.0f} MiB)\n")
    print("| configuration | time (s) | × hf | peak RSS at return (MiB) | peak RSS, weights touched (MiB) | × hf | set_sparsity 0.5→0.6 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        tx = f"{r['time_s'] / hf['time_s']:.2f}" if hf else "-"
        mx = f"{r['peak_rss_touched'] / hf['peak_rss_touched']:.2f}" if hf else "-"
        ss = f"{r['set_sparsity_s']:.2f}" if "set_sparsity_s" in r else ""
        print(f"| {kind} | {r['time_s']:.2f} | {tx} | {r['peak_rss'] / 2**20:.0f} | {r['peak_rss_touched'] / 2**20:.0f} | {mx} | {ss} |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(path), "checkpoint_bytes": ckpt_bytes,
                                         "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
