"""The two parts of a calibrated block pass that issue 19 changed, each beside the way before.

    python scripts/bench_calibration_pass.py --rounds 5 --threads 2 --json benchmarks/calibration-pass.json

``hessian``: one Hessian update (SmolLM2-135M's and Llama-2-7B's input widths, one sample of 512
or 2,048 tokens) as ``torch.addmm`` of the whole matrix (the reference code's way, and ours
before) against ``Hessian.add`` (BLAS's symmetric rank-k update of one triangle, mirrored on
read); the two matrices must agree to fp32 rounding.

``forward``: every calibration sample through one real SmolLM2-135M block (block 5, fp32), one
sample per forward (the reference code's way, and ours before) against
``llm_prune.blocks.samples_per_forward`` samples per forward; the outputs must agree.

Both alternate the two sides, median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llm_prune import blocks
from llm_prune.methods.sparsegpt import Hessian

WIDTHS = {"smollm2 attn/mlp in": 576, "smollm2 down in": 1536, "7b attn/mlp in": 4096, "7b down in": 11008}


def addmm_hessian(H: torch.Tensor, count: int, x: torch.Tensor) -> int:
    """The running mean as before: scale, then add 2/n · xᵀx over the whole matrix."""
    total = count + x.shape[0]
    H.mul_(count / total)
    H.addmm_(x.t(), x, alpha=2.0 / total)
    return total


def alternate(rounds: int, sides: dict) -> dict[str, float]:
    times = {k: [] for k in sides}
    for r in range(rounds):
        order = list(sides.items())
        for label, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_hessian(args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, width in WIDTHS.items():
        for tokens in args.tokens:
            if width > args.max_width:
                continue
            xs = [torch.randn(tokens, width, generator=g) for _ in range(args.updates)]
            ref, new = torch.zeros(width, width), Hessian(width)

            def before():
                ref.zero_()
                count = 0
                for x in xs:
                    count = addmm_hessian(ref, count, x)

            def after():
                new.__init__(width)
                for x in xs:
                    new.add(x)
                new.H  # the mirror is part of the cost

            before(), after()  # warm-up
            t = alternate(args.rounds, {"addmm": before, "syrk": after})
            diff = float((new.H - ref).abs().max() / ref.abs().max())
            rows.append({"part": "hessian", "shape": name, "width": width, "tokens": tokens, "updates": args.updates,
                         "threads": args.threads, "addmm_s": t["addmm"], "syrk_s": t["syrk"],
                         "ratio": t["syrk"] / t["addmm"], "max_rel_diff": diff})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_forward(args) -> list[dict]:
    from llm_prune.arch import arch_for
    from llm_prune.models import resolve_model
    from llm_prune.reader import CheckpointReader

    src = resolve_model("smollm2-135m")
    reader = CheckpointReader(src)
    arch = arch_for(reader.config)
    skeleton = blocks.build_skeleton(src)
    layers = skeleton.get_submodule(arch.blocks_attr)
    cpu = torch.device("cpu")
    rows = []
    for seqlen in args.seqlens:
        nsamples = args.forward_tokens // seqlen
        windows = torch.randint(0, reader.config["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        x, kwargs = blocks.capture_block_inputs(skeleton, reader, arch, layers[0], windows, cpu, torch.float32, cpu)
        unit = next(u for u in reader.units(arch) if u.block == 5)
        block = blocks.load_block(layers[5], reader.read(unit.names), arch, cpu, torch.float32)
        outs = {}

        def run(label: str, tokens: int):
            def fn():
                saved = blocks.FORWARD_TOKENS
                blocks.FORWARD_TOKENS = tokens
                try:
                    with torch.no_grad():
                        outs[label] = blocks.run_block(block, x.clone(), kwargs, cpu, torch.float32, collect=True)
                finally:
                    blocks.FORWARD_TOKENS = saved
            return fn

        sides = {"one": run("one", seqlen), "batched": run("batched", blocks.FORWARD_TOKENS)}
        for fn in sides.values():
            fn()  # warm-up
        t = alternate(args.rounds, sides)
        rows.append({"part": "forward", "seqlen": seqlen, "nsamples": nsamples, "threads": args.threads,
                     "samples_per_forward": blocks.samples_per_forward(x), "one_s": t["one"],
                     "batched_s": t["batched"], "ratio": t["batched"] / t["one"],
                     "outputs_equal": bool(torch.equal(outs["one"], outs["batched"])),
                     "max_abs_diff": float((outs["one"] - outs["batched"]).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["hessian", "forward"], choices=["hessian", "forward"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="tokens per Hessian update")
    p.add_argument("--updates", type=int, default=4, help="Hessian updates per timed side")
    p.add_argument("--max-width", type=int, default=4096, help="skip wider Hessians (11008: 485 MB each, slow)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[128, 512], help="calibration window lengths")
    p.add_argument("--forward-tokens", type=int, default=16384, help="calibration tokens per forward side")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if "hessian" in args.parts:
        rows += bench_hessian(args)
    if "forward" in args.parts:
        rows += bench_forward(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python scripts/bench_calibration_pass.py " + " ".join(__import__("sys").argv[1:]),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
