"""Diagnosis of the OWL perplexity gap with llm-compressor: our Wanda/SparseGPT with *its* per-block sparsities.

    /tmp/llmc/bin/python scripts/diag_owl_allocation.py theirs --windows WORK/windows.pt --levels 0.5 0.7 --json theirs.json
    python scripts/diag_owl_allocation.py ours --alloc theirs.json --level 0.7 --method wanda --out DIR
    python scripts/bench_calibrated.py ppl --dir DIR --ppl-windows 24

``theirs`` runs llm-compressor's own ``_infer_owl_layer_sparsity`` on the compare's calibration
windows (``bench_calibrated.py compare`` writes them) and saves its per-block list per level.
``ours`` prunes with llm-prune on the same windows (same seed and sizes), but with the blocks'
sparsities taken from that list instead of our outlier ratios: counts are still exact to the
weight (the list's shift replaces ``allocation.balance``; this is a diagnostic, not a feature).
If ours at their allocation matches or beats their perplexity, the gap is the allocation alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def theirs(args) -> None:
    import torch
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_calibrated import _llmc_owl_sparsities

    saved = torch.load(args.windows)
    model = AutoModelForCausalLM.from_pretrained(saved["src"], dtype=torch.float32)
    out = {str(s): _llmc_owl_sparsities(model, WandaPruningModifier, s, saved["windows"])["sparsity"]
           for s in args.levels}
    Path(args.json).write_text(json.dumps(out))


def ours(args) -> None:
    import llm_prune.allocation as A
    from llm_prune.calibration import CalibConfig
    from llm_prune.config import PruneConfig, Sparsity
    from llm_prune.models import resolve_model
    from llm_prune.pipeline import prune_checkpoint

    given = json.loads(Path(args.alloc).read_text())[str(args.level)]
    A.balance = lambda raw, sizes, s, edges: list(given)  # their sparsities in place of our shifted spread
    cfg = PruneConfig(method=args.method, sparsity=Sparsity(args.level), allocation="owl", band=0.08, clip=False)
    calib = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    report = prune_checkpoint(resolve_model("smollm2-135m"), cfg, Path(args.out), calib=calib, overwrite=True,
                              progress=False)
    got = [v["sparsity"] for _, v in sorted(report["allocation"]["blocks"].items(), key=lambda kv: int(kv[0]))]
    print(json.dumps({"max_abs_diff_to_given": max(abs(a - b) for a, b in zip(got, given))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("theirs")
    t.add_argument("--windows", required=True)
    t.add_argument("--levels", nargs="+", type=float, default=[0.5, 0.7])
    t.add_argument("--json", required=True)
    o = sub.add_parser("ours")
    o.add_argument("--alloc", required=True)
    o.add_argument("--level", type=float, required=True)
    o.add_argument("--method", default="wanda")
    o.add_argument("--out", required=True)
    o.add_argument("--nsamples", type=int, default=16)
    o.add_argument("--seqlen", type=int, default=512)
    o.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    theirs(args) if args.cmd == "theirs" else ours(args)


if __name__ == "__main__":
    main()
