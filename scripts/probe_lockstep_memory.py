"""What a --true-sequential (lockstep) run holds at each wait of SmolLM2's first block.

    python scripts/probe_lockstep_memory.py --nsamples 16 --seqlen 2048 --method wanda

At each target of block 0, when every sample waits there and the target is about to be solved,
prints the bytes of the live tensors (unique storages, from the garbage collector's view: the
block inputs and the block's weights included) and the process's RSS, beside
``lockstep.held_bytes``'s estimate of what the samples add.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import llm_prune.sequential as sequential
from llm_prune.calibration import CalibConfig
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.lockstep import held_bytes
from llm_prune.models import resolve_model
from llm_prune.pipeline import prune_checkpoint


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def live_tensor_bytes() -> int:
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = resolve_model("smollm2-135m")
    config = json.loads((src / "config.json").read_text())
    rows, solve_one = [], sequential._solve_one

    def probe(run, p, block, tensors, name, rel, stat, stats):
        if ".layers.0." in name:
            rows.append({"target": rel, "live_tensor_mb": round(live_tensor_bytes() / 1e6, 1),
                         "rss_mb": round(rss() / 1e6, 1)})
        return solve_one(run, p, block, tensors, name, rel, stat, stats)

    sequential._solve_one = probe
    calib = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, true_sequential=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = prune_checkpoint(src, PruneConfig(method=args.method, sparsity=Sparsity(0.5)), f"{tmp}/out",
                                  calib=calib, progress=False)
    act, matmul = (4, 2) if report["calibration"]["activation_dtype"] == "bf16-mixed" else (4, 4)
    estimate = held_bytes(config, args.nsamples, args.seqlen, config["hidden_size"], act, matmul)
    print(json.dumps({"forwards": report["calibration"]["true_sequential_forwards"],
                      "estimate_mb": round(estimate / 1e6, 1),
                      "block_inputs_mb": round(args.nsamples * args.seqlen * config["hidden_size"] * 4 / 1e6, 1),
                      "waits": rows}, indent=1))


if __name__ == "__main__":
    main()
