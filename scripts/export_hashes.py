"""Hash what llm-prune produces, to prove a refactor changed no byte.

    python scripts/export_hashes.py --out before.json        # on the old code
    python scripts/export_hashes.py --out after.json --compare before.json

Exports the packaged SmolLM2 (bf16) at layer, global and 2:4 OMP in every format, Wanda and
SparseGPT (small calibration), MiniLM (fp32) at layer and global, and a tiny GPT-2 (Conv1D,
weights stored [in, out]) at 2:4; then prunes the same at load time, loads the exports back and
raises a loaded model's sparsity. Every weight file is hashed; ``sparsity.json`` is hashed
without the fields that change from run to run (time, peak memory, paths), without its
manifest of the other files' hashes (each of those files is compared on its own) and without the
source's digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# SparseGPT's bytes depend on the BLAS thread counts: torch's (Hessians, updates) and the
# OpenBLAS of scipy's triangular inverse. Pinned, so that a difference means a code change; the
# reference files were written with these (set before numpy, scipy or torch is imported).
TORCH_THREADS, OPENBLAS_THREADS = 2, 1
os.environ["OPENBLAS_NUM_THREADS"] = str(OPENBLAS_THREADS)


def _digest_state(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _digest_dir(path: Path) -> dict[str, str]:
    out = {}
    for f in sorted(path.iterdir()):
        if f.name == "sparsity.json":
            report = json.loads(f.read_text())
            report.pop("run", None)
            report.pop("output", None)  # the manifest: hashes of the other files, compared one by one here
            # The source's digests describe the input, not the export (and changed algorithm once)
            for key in ("path", "files", "fingerprint"):
                report.get("source", {}).pop(key, None)
            report.get("calibration", {}).pop("seconds_per_block", None)
            report.get("calibration", {}).pop("block_seconds", None)
            out[f.name] = hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
        elif f.is_file():
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _tiny_gpt2(root: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = root / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).to(
        torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="a JSON written before: exit 1 on any difference")
    args = ap.parse_args()

    import torch

    import llm_prune
    from llm_prune.calibration import CalibConfig
    from llm_prune.config import PruneConfig, Sparsity
    from llm_prune.models import resolve_model

    torch.set_num_threads(TORCH_THREADS)
    smol, minilm = resolve_model("smollm2-135m"), resolve_model("minilm-l6")
    calib = CalibConfig(nsamples=4, seqlen=128, seed=0)
    exports = {
        "smol-omp-0.5": (smol, PruneConfig("omp", Sparsity(0.5)), "dense", None),
        "smol-omp-0.5-bitmask": (smol, PruneConfig("omp", Sparsity(0.5)), "bitmask", None),
        "smol-omp-0.4-global": (smol, PruneConfig("omp", Sparsity(0.4), "global"), "dense", None),
        "smol-omp-0.4-global-bitmask": (smol, PruneConfig("omp", Sparsity(0.4), "global"), "bitmask", None),
        "smol-omp-2:4": (smol, PruneConfig("omp", Sparsity.parse(pattern="2:4")), "dense", None),
        "smol-omp-2:4-packed24": (smol, PruneConfig("omp", Sparsity.parse(pattern="2:4")), "packed24", None),
        "smol-wanda-0.5": (smol, PruneConfig("wanda", Sparsity(0.5)), "dense", calib),
        "smol-wanda-2:4-packed24": (smol, PruneConfig("wanda", Sparsity.parse(pattern="2:4")), "packed24", calib),
        "smol-sparsegpt-0.5": (smol, PruneConfig("sparsegpt", Sparsity(0.5)), "dense", calib),
        "minilm-omp-0.5": (minilm, PruneConfig("omp", Sparsity(0.5)), "dense", None),
        "minilm-omp-0.3-global": (minilm, PruneConfig("omp", Sparsity(0.3), "global"), "dense", None),
    }
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exports["gpt2-omp-2:4"] = (_tiny_gpt2(tmp), PruneConfig("omp", Sparsity.parse(pattern="2:4")), "dense", None)
        exports["gpt2-omp-0.5-global"] = (tmp / "tiny-gpt2", PruneConfig("omp", Sparsity(0.5), "global"), "dense", None)
        for name, (src, cfg, fmt, cal) in exports.items():
            out = tmp / name.replace(":", "of")
            llm_prune.prune_checkpoint(src, cfg, out, fmt=fmt, calib=cal, source_name=name, progress=False)
            results[f"export/{name}"] = _digest_dir(out)
            if fmt != "dense":
                results[f"load/{name}"] = _digest_state(llm_prune.load(out, progress=False))
            print(name, "ok", file=sys.stderr)
        for name, src, kw in [("smol-0.5", smol, dict(sparsity=0.5)),
                              ("smol-0.4-global", smol, dict(sparsity=0.4, scope="global")),
                              ("smol-2:4", smol, dict(pattern="2:4")),
                              ("minilm-0.5", minilm, dict(sparsity=0.5)),
                              ("minilm-0.3-global", minilm, dict(sparsity=0.3, scope="global")),
                              ("smol-0.4-global-fp32", smol, dict(sparsity=0.4, scope="global", dtype="float32"))]:
            model = llm_prune.from_pretrained(src, progress=False, **kw)
            results[f"from_pretrained/{name}"] = _digest_state(model)
            if "pattern" not in kw:
                llm_prune.set_sparsity(model, kw["sparsity"] + 0.1)
                results[f"set_sparsity/{name}+0.1"] = _digest_state(model)
            print(name, "loaded", file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        diff = sorted(k for k in before.keys() | results.keys() if before.get(k) != results.get(k))
        for k in diff:
            print(f"DIFFERS: {k}", file=sys.stderr)
        print(f"{len(results)} results, {len(diff)} differ", file=sys.stderr)
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
