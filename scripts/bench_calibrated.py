"""Calibrated pruning benchmarks (issue 3): quality on real SmolLM2-135M, memory, 7B-shape speed.

    python scripts/bench_calibrated.py quality --nsamples 16 --seqlen 512 --ppl-seqlen 512 --ppl-windows 24
    python scripts/bench_calibrated.py speed7b --nsamples 4 --seqlen 512
    python scripts/bench_calibrated.py compare --nsamples 8 --seqlen 512 --json benchmarks/calibrated-vs-llmc.json
    python scripts/bench_calibrated.py compare --patterns 0.5 0.6 0.7 --allocation owl --json benchmarks/owl-vs-llmc.json
    python scripts/bench_calibrated.py compare --patterns 0.5 0.6 0.7 --allocation owl-unclipped --tools llm-prune

``compare`` loads llm-compressor's model in the precision of our block forwards (``--llmc-dtype
auto``: bfloat16 beside our bf16-mixed, float32 beside float32), so that the times compare like for
like; before session 17 it was always float32, which flattered our bf16-mixed runs.

``--allocation owl-unclipped`` gives ours ``--allocation-unclipped`` (OWL's reference shift, which
may leave the band, as llm-compressor's OWL does); llm-compressor runs its OWL either way.

``quality`` prunes SmolLM2-135M (the embedded model) with omp, wanda and sparsegpt at 50%, 4:8
and 2:4, calibrating on the embedded Wikipedia passages (calib split), each run in its own
process so its peak RSS is its own; then measures token perplexity (llm_prune.eval.perplexity:
exp(mean NLL), non-overlapping windows) on the *held-out* split of the same passages, which
calibration never sees. ``speed7b`` times SparseGPT on a synthetic one-block checkpoint with
Llama-2-7B block shapes (hidden 4096, MLP 11008, 32 heads), random bf16 weights.
Pruning goes through llm_prune.pipeline.prune_checkpoint (which runs prune_sequential for calibration methods).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

OWL_LAMBDA, OWL_M = 0.08, 5.0  # OWL's band and outlier multiple: the paper's LLaMA settings, both tools


def pattern_arg(text: str) -> str:
    """A sparsity ("0.6") or an N:M pattern ("2:4"), as both tools take it."""
    if ":" in text or 0 < float(text) < 1:
        return text
    raise argparse.ArgumentTypeError(f"a sparsity in (0, 1) or N:M, got {text!r}")


def split_pattern(pattern: str) -> tuple[float | None, str | None]:
    return (None, pattern) if ":" in pattern else (float(pattern), None)


def run_pruning(src: Path, method: str, pattern: str, out: Path, calib, fmt: str = "dense",
                allocation: str = "uniform") -> dict:
    from llm_prune.config import PruneConfig, Sparsity
    from llm_prune.pipeline import prune_checkpoint

    ratio, nm = split_pattern(pattern)
    owl = ({"allocation": "owl", "band": OWL_LAMBDA, "owl_m": OWL_M, "clip": allocation == "owl"}
           if allocation.startswith("owl") else {})
    cfg = PruneConfig(method=method, sparsity=Sparsity.parse(ratio, nm), **owl)
    return prune_checkpoint(src, cfg, out, fmt=fmt, calib=calib, overwrite=True, progress=False)


def vm_hwm() -> int:
    """Peak RSS of this process. Not ru_maxrss: Linux carries that across exec from the parent
    (which here holds a model for perplexity), while VmHWM starts fresh with the new program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cmd_prune(args) -> None:
    from llm_prune.calibration import CalibConfig

    torch.set_num_threads(args.threads)
    calib = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        true_sequential=args.true_sequential, dtype=args.act_dtype)
    rss0 = vm_hwm()  # after imports
    report = run_pruning(Path(args.src), args.method, args.pattern, Path(args.out), calib, allocation=args.allocation)
    print(json.dumps({"time_s": report["run"]["time_s"], "peak_rss_bytes": vm_hwm(),
                      "rss_after_imports": rss0, "targeted": report["achieved"]["targeted"],
                      "calibration": report.get("calibration")}))


def heldout_ids(tokenizer) -> torch.Tensor:
    from llm_prune.calibration import embedded_passages

    return tokenizer("\n\n".join(embedded_passages("heldout")), return_tensors="pt").input_ids[0]


def perplexity(model_dir: Path, ids, seqlen: int, windows: int) -> float:
    from transformers import AutoModelForCausalLM

    from llm_prune.eval.perplexity import token_perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return token_perplexity(model, ids, seqlen, max_windows=windows)["ppl"]


def cmd_quality(args) -> None:
    from transformers import AutoTokenizer

    from llm_prune.models import resolve_model

    torch.set_num_threads(args.threads)
    src = resolve_model("smollm2-135m")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = heldout_ids(AutoTokenizer.from_pretrained(src))
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = [{"method": "dense", "pattern": "-", "ppl": perplexity(src, ids, args.ppl_seqlen, args.ppl_windows)}]
    print(json.dumps(rows[-1]), flush=True)
    for pattern in args.patterns:
        for method in args.methods:
            out = work / f"{method}-{pattern.replace(':', 'of')}"
            cmd = [sys.executable, __file__, "prune", "--src", str(src), "--method", method, "--pattern", pattern,
                   "--out", str(out), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--seed", str(args.seed), "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            ppl = perplexity(out, ids, args.ppl_seqlen, args.ppl_windows)
            rows.append({"method": method, "pattern": pattern, "ppl": ppl, "prune_s": res["time_s"],
                         "peak_rss_mib": res["peak_rss_bytes"] / 2**20,
                         "rss_after_imports_mib": res["rss_after_imports"] / 2**20, "targeted": res["targeted"]})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out)
    protocol = {"model": "SmolLM2-135M-Instruct (embedded, bf16)", "model_bytes": model_bytes,
                "calibration": f"embedded BoolQ Wikipedia passages, calib split, {args.nsamples} x {args.seqlen} tokens, seed {args.seed}",
                "perplexity": f"held-out split (every 10th unique passage), {int(ids.numel())} tokens, "
                              f"non-overlapping windows of {args.ppl_seqlen}, first {args.ppl_windows} windows, fp32",
                "threads": args.threads}
    print(json.dumps({"protocol": protocol, "rows": rows}, indent=1))


def flops_7b_block(tokens: int, seqlen: int, h: int = 4096, f: int = 11008, blocksize: int = 128) -> dict[str, float]:
    """FLOPs of SparseGPT's work on one Llama-2-7B block, by part (multiply-adds count 2)."""
    params = 4 * h * h + 3 * h * f
    targets = [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]  # (rows, cols) of q, k, v, o, gate, up, down
    inputs = [h, h, h, f]  # the distinct inputs: q/k/v, o, gate/up, down
    return {
        "observe forward (to the down projection's input)": 2 * tokens * (params - h * f),
        "propagate forward (pruned block)": 2 * tokens * params,
        "attention scores and values, both passes": 2 * 2 * 2 * tokens * seqlen * h,
        "Hessians 2XXᵀ": 2 * tokens * sum(n * n for n in inputs),
        # a Cholesky (n³/3) and a triangular inverse (n³/3) each (``inverse_cholesky``)
        "factorisations (~2n³/3 each)": sum(2 * n**3 / 3 for n in inputs),
        "column loops (rows·cols·blocksize)": sum(2 * r * c * blocksize / 2 for r, c in targets),
        "lazy batch updates (rows·cols²)": sum(r * c * c for r, c in targets),
    }


def cmd_speed7b(args) -> None:
    """Seconds per block for SparseGPT with Llama-2-7B block shapes on this CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_prune.calibration import CalibConfig
    from llm_prune.methods.sparsegpt import sparsegpt_prune
    from llm_prune.config import Sparsity
    from llm_prune.models import resolve_model

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    src = work / "llama7b-shapes-1block"
    smol = resolve_model("smollm2-135m")
    if not (src / "config.json").is_file():
        # vocab of the SmolLM2 tokenizer (copied in) so the calibration text tokenizes for real
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.blocks,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(src, max_shard_size="2GB")
        del model
        for f in smol.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, src / f.name)
    calib = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    report = run_pruning(src, "sparsegpt", "0.5", work / "out7b", calib)
    shutil.rmtree(work / "out7b")
    # The solve alone (fixed cost per block, independent of the number of calibration tokens).
    g = torch.Generator().manual_seed(0)
    solve = {}
    for name, rows, cols, copies in [("q/k/v/o", 4096, 4096, 4), ("gate/up", 11008, 4096, 2), ("down", 4096, 11008, 1)]:
        X = torch.randn(4096, cols, generator=g)
        H = 2 * X.t() @ X / X.shape[0]
        W = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
        t = time.perf_counter()
        sparsegpt_prune(W, H, Sparsity(0.5))
        solve[name] = {"seconds_each": round(time.perf_counter() - t, 2), "count": copies}
    flops = flops_7b_block(args.nsamples * args.seqlen, args.seqlen)
    a = torch.randn(4096, 4096)
    a @ a
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    gemm = 3 * 2 * 4096**3 / (time.perf_counter() - t) / 1e9
    per_block = report["calibration"]["seconds_per_block"]
    print(json.dumps({"blocks": args.blocks, "calibration_tokens": args.nsamples * args.seqlen,
                      "gflop_per_block": {k: round(v / 1e9, 1) for k, v in flops.items()},
                      "fp32_gemm_gflops": round(gemm, 1),
                      "seconds_at_gemm_speed": round(sum(flops.values()) / 1e9 / gemm, 2),
                      "seconds_per_block": per_block, "time_s": report["run"]["time_s"],
                      "peak_rss_mib": vm_hwm() / 2**20,
                      "checkpoint_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
                      "solve_only": solve, "solve_only_total_s": round(sum(v["seconds_each"] * v["count"] for v in solve.values()), 1),
                      "threads": args.threads}, indent=1))


def cmd_llmc_windows(args) -> None:
    """Write our calibration windows to a file, so llm-compressor calibrates on the same tokens.
    Through llm-prune's window cache: the timed llm-prune runs then start from these tokens too,
    as llm-compressor does (neither tool's time includes tokenizing the text)."""
    from llm_prune.calib_cache import cached_windows
    from llm_prune.calibration import CalibConfig
    from llm_prune.models import resolve_model

    src = resolve_model("smollm2-135m")
    windows, _ = cached_windows(CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed), src,
                                args.seqlen)
    torch.save({"src": str(src), "windows": windows}, args.out)


def cmd_llmc(args) -> None:
    """Run llm-compressor's SparseGPT / Wanda on the same model and windows. Runs ONLY in the
    separate venv that has llmcompressor (never a dependency of llm-prune):
        /tmp/llmc/bin/python scripts/bench_calibrated.py llmc --windows W.pt --method sparsegpt --pattern 2:4 --out DIR"""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    saved = torch.load(args.windows)
    windows = saved["windows"]
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    ratio, nm = split_pattern(args.pattern)
    common = {"sparsity": ratio or 0.5, "mask_structure": nm or "0:0", "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    make = ((lambda **kw: SparseGPTModifier(block_size=128, dampening_frac=0.01, **kw)) if args.method == "sparsegpt"
            else WandaPruningModifier)
    model = AutoModelForCausalLM.from_pretrained(saved["src"], dtype=getattr(torch, args.llmc_dtype))
    t0 = time.perf_counter()
    if args.allocation.startswith("owl"):  # its OWL has one way, the reference's shift
        common.update(_llmc_owl_sparsities(model, make, common["sparsity"], windows))
    modifier = make(**common)
    oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.to(torch.bfloat16).save_pretrained(args.out)
    print(json.dumps({"method": args.method, "pattern": args.pattern, "allocation": args.allocation,
                      "oneshot_s": round(seconds, 2),
                      "peak_rss_bytes": vm_hwm()}))


def _llmc_owl_sparsities(model, make, sparsity: float, windows: torch.Tensor) -> dict:
    """llm-compressor's own OWL layer sparsities, as modifier settings (per-layer ``sparsity`` and
    layer ``targets``). ``sparsity_profile="owl"`` itself cannot run in llm-compressor 0.14.0.1:
    (1) its activation pass calls ``run_calibration`` from inside the modifier's initialisation,
    which raises "Cannot invoke event before initializing"; (2) with Linear targets it compares 30
    sparsities to 210 Linear modules and refuses; (3) with layer targets, the dict its OWL returns
    is never indexed per layer (only a list is). So its ``_infer_owl_layer_sparsity`` runs here
    unchanged, on the activation sums its ``_get_activations`` takes (1/128 · Σ over calibration
    batches of each Linear input's per-feature L2 norm, here with plain forward pre-hooks), and the
    result goes to its SparseGPT/Wanda as the per-layer list they support."""
    import re
    from collections import defaultdict
    from functools import partial

    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

    def activations(self, model, dataloader, nsamples=128):
        acts = defaultdict(int)

        def save(_module, inputs, name):
            x = inputs[0] if isinstance(inputs, tuple) else inputs
            acts[name] += 1.0 / nsamples * x.pow(2).sum(dim=(0, 1)).sqrt()

        hooks = [mod.register_forward_pre_hook(partial(save, name=name)) for name, mod in model.named_modules()
                 if isinstance(mod, torch.nn.Linear) and "lm_head" not in name]
        try:
            with torch.no_grad():
                for batch in dataloader:
                    model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        finally:
            for h in hooks:
                h.remove()
        return acts

    SparsityModifierBase._get_activations = activations
    layers = {n: m for n, m in model.named_modules() if re.fullmatch(r"model\.layers\.\d+", n)}
    batches = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    probe = make(sparsity=sparsity, sparsity_profile="owl", owl_m=OWL_M, owl_lmbda=OWL_LAMBDA, targets=["Linear"])
    owl = probe._infer_owl_layer_sparsity(model, layers, batches)
    return {"sparsity": [float(owl[n]) for n in layers], "targets": [r"re:model\.layers\.\d+$"]}


def achieved_sparsity(model_dir: Path) -> float:
    """Zeros stored over the default targets (every Linear in the blocks) of a saved checkpoint:
    the two tools round per-row and per-layer counts differently, so the same requested
    sparsity need not remove the same number of weights."""
    from llm_prune.config import PruneConfig
    from llm_prune.study.inspect import inspect

    return inspect(model_dir, PruneConfig(), stored=True, progress=False)["overall"]["fraction"]


def _timed(cmd: list[str]) -> tuple[dict, float]:
    """Run one pruning process; its last stdout line is JSON. Returns (that JSON, wall seconds)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1]), wall


def cmd_compare(args) -> None:
    """llm-prune vs llm-compressor, side by side in one run: same model, same calibration windows
    (ours, written to a file and fed to llm-compressor as input_ids), same sparsity settings,
    each pruning in its own process (wall time includes imports, load and save for both), then
    the same perplexity protocol on both outputs."""
    from transformers import AutoTokenizer

    from llm_prune.models import resolve_model

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model("smollm2-135m")
    windows = work / "windows.pt"
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
              "--threads", str(args.threads)]
    subprocess.run([sys.executable, __file__, "llmc_windows", *common, "--out", str(windows)], check=True)
    ids = heldout_ids(AutoTokenizer.from_pretrained(src))
    rows = [{"tool": "-", "method": "dense", "pattern": "-",
             "ppl": perplexity(src, ids, args.ppl_seqlen, args.ppl_windows)}]
    print(json.dumps(rows[-1]), flush=True)
    if args.llmc_dtype == "auto":  # llm-compressor in the precision of our forwards: a like-for-like time
        from llm_prune.calibration import CalibConfig

        ours = {CalibConfig(dtype=dt).dtype for dt in args.act_dtypes}
        args.llmc_dtype = "float32" if ours == {"float32"} else "bfloat16"
    runs = [(tool, dt) for tool in args.tools for dt in (args.act_dtypes if tool == "llm-prune" else [args.llmc_dtype])]
    for pattern in args.patterns:
        for method in args.methods:
            for tool, asked in runs:
                out = work / f"{tool}-{method}-{pattern.replace(':', 'of')}"
                if tool == "llm-prune":
                    res, wall = _timed([sys.executable, __file__, "prune", "--src", str(src), "--method", method,
                                        "--pattern", pattern, "--out", str(out), *common, "--allocation", args.allocation,
                                        "--act-dtype", asked,
                                        *(["--true-sequential"] if args.true_sequential else [])])
                    core, act_dtype = res["time_s"], res["calibration"]["activation_dtype"]  # "auto" resolved
                else:
                    res, wall = _timed([args.llmc_python, __file__, "llmc", "--windows", str(windows),
                                        "--method", method, "--pattern", pattern, "--out", str(out), *common,
                                        "--allocation", args.allocation, "--llmc-dtype", args.llmc_dtype])
                    core, act_dtype = res["oneshot_s"], asked
                rows.append({"tool": tool, "method": method, "pattern": pattern, "allocation": args.allocation,
                             "act_dtype": act_dtype,
                             "ppl": perplexity(out, ids, args.ppl_seqlen, args.ppl_windows),
                             "achieved_sparsity": achieved_sparsity(out),
                             "process_wall_s": round(wall, 2), "prune_s": round(core, 2),
                             "peak_rss_mib": round(res["peak_rss_bytes"] / 2**20, 1)})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
    protocol = {"model": "SmolLM2-135M-Instruct (embedded, bf16 checkpoint)",
                "calibration": f"embedded BoolQ Wikipedia passages, calib split, {args.nsamples} x {args.seqlen} "
                               f"tokens, seed {args.seed}; the same token windows for both tools",
                "perplexity": f"held-out split, {int(ids.numel())} tokens, non-overlapping windows of "
                              f"{args.ppl_seqlen}, first {args.ppl_windows} windows, fp32",
                "settings": "layer scope, every Linear in the blocks (lm_head and embeddings kept), damp 0.01, "
                            f"blocksize 128; llm-compressor's model in {args.llmc_dtype}, llm-prune's forwards in each row's "
                            "act_dtype" + ("; llm-prune --true-sequential" if args.true_sequential else "")
                            + (f"; OWL allocation, lambda {OWL_LAMBDA}, M {OWL_M} (llm-compressor: sparsity_profile="
                               "'owl', owl_lmbda, owl_m)" if args.allocation.startswith("owl") else "")
                            + ("; llm-prune --allocation-unclipped" if args.allocation == "owl-unclipped" else ""),
                "threads": args.threads}
    result = {"protocol": protocol, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def cmd_summarize(args) -> None:
    """Merge compare runs made with different calibration seeds: perplexity per seed, the mean,
    and llm-prune / llm-compressor ratios of the means (one seed's gap is within the noise that
    a few changed masks cause; see BENCHMARKS.md)."""
    runs = [json.loads(Path(f).read_text()) for f in args.files]  # later files win for the same cell
    table: dict[tuple, dict] = {}
    for run in runs:
        seed = run["protocol"]["calibration"].split("seed ")[1].split(";")[0]
        for r in run["rows"]:
            if r["method"] == "dense":
                continue
            dt = r.get("act_dtype", "float32")
            tool = r["tool"] if dt == "float32" else f"{r['tool']} {dt}"
            cell = table.setdefault((r["method"], r["pattern"], tool), {"ppl": {}})
            cell["ppl"][seed] = r["ppl"]
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    # Wall times are left out: they only compare within one run (one machine state), see compare.
    lines = ["| method | pattern | tool | ppl per seed | mean ppl | ppl ratio of means |", "|---|---|---|---|---:|---:|"]
    summary = []
    for (method, pattern, tool), cell in sorted(table.items()):
        other = table.get((method, pattern, "llm-compressor"))
        both = other is not None and tool.startswith("llm-prune") and other["ppl"].keys() == cell["ppl"].keys()
        ppl_ratio = mean(cell["ppl"]) / mean(other["ppl"]) if both else None
        seeds = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(cell["ppl"].items()))
        lines.append(f"| {method} | {pattern} | {tool} | {seeds} | {mean(cell['ppl']):.2f} | "
                     f"{'' if ppl_ratio is None else f'{ppl_ratio:.3f}'} |")
        summary.append({"method": method, "pattern": pattern, "tool": tool, "ppl": cell["ppl"],
                        "mean_ppl": mean(cell["ppl"]), "ppl_ratio_of_means": ppl_ratio})
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.files, "summary": summary}, indent=1))


def cmd_ppl(args) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    ids = heldout_ids(AutoTokenizer.from_pretrained(args.dir))
    print(json.dumps({"dir": args.dir, "ppl": perplexity(Path(args.dir), ids, args.ppl_seqlen, args.ppl_windows)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("quality", "prune", "speed7b", "llmc_windows", "llmc", "ppl", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--nsamples", type=int, default=16)
        s.add_argument("--seqlen", type=int, default=512)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--work", default="/tmp/bench_calibrated")
        s.add_argument("--allocation", default="uniform", choices=["uniform", "owl", "owl-unclipped"],
                       help=f"owl: both tools with OWL's layer-wise sparsity (lambda {OWL_LAMBDA}, M {OWL_M}); "
                            "owl-unclipped: ours with --allocation-unclipped")
    q = sub.choices["quality"]
    q.add_argument("--methods", nargs="+", default=["omp", "wanda", "sparsegpt"])
    q.add_argument("--patterns", nargs="+", default=["0.5", "4:8", "2:4"])
    q.add_argument("--ppl-seqlen", type=int, default=512)
    q.add_argument("--ppl-windows", type=int, default=24)
    pr = sub.choices["prune"]
    pr.add_argument("--src", required=True)
    pr.add_argument("--method", required=True)
    pr.add_argument("--pattern", required=True, type=pattern_arg)
    pr.add_argument("--out", required=True)
    pr.add_argument("--true-sequential", action="store_true")
    pr.add_argument("--act-dtype", default="auto")
    sub.choices["speed7b"].add_argument("--blocks", type=int, default=1)
    sub.choices["llmc_windows"].add_argument("--out", required=True)
    lc = sub.choices["llmc"]
    lc.add_argument("--windows", required=True)
    lc.add_argument("--method", required=True, choices=["sparsegpt", "wanda"])
    lc.add_argument("--pattern", required=True, type=pattern_arg)
    lc.add_argument("--out", required=True)
    lc.add_argument("--llmc-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype llm-compressor's model is loaded in")
    cp = sub.choices["compare"]
    cp.add_argument("--llmc-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the dtype llm-compressor's model is loaded in (default: auto, bfloat16 when any of "
                         "llm-prune's --act-dtypes resolves to a bf16 kind, else float32: like for like)")
    cp.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"])
    cp.add_argument("--patterns", nargs="+", default=["0.5", "4:8", "2:4"], type=pattern_arg)
    cp.add_argument("--tools", nargs="+", default=["llm-prune", "llm-compressor"])
    cp.add_argument("--llmc-python", default="/tmp/llmc/bin/python",
                    help="python of a separate venv with llmcompressor installed")
    cp.add_argument("--ppl-seqlen", type=int, default=512)
    cp.add_argument("--ppl-windows", type=int, default=6)
    cp.add_argument("--json", help="also write the result here")
    cp.add_argument("--true-sequential", action="store_true", help="llm-prune solves group by group in a block")
    cp.add_argument("--act-dtypes", nargs="+", default=["auto"],
                    help="llm-prune's --act-dtype, one run each (default: auto; llm-compressor's dtype: --llmc-dtype)")
    pp = sub.choices["ppl"]
    pp.add_argument("--dir", required=True)
    pp.add_argument("--ppl-seqlen", type=int, default=512)
    pp.add_argument("--ppl-windows", type=int, default=6)
    sm = sub.add_parser("summarize")
    sm.add_argument("files", nargs="+", help="JSON files written by compare --json")
    sm.add_argument("--json", help="also write the summary here")
    args = p.parse_args()
    {"summarize": cmd_summarize, "quality": cmd_quality, "prune": cmd_prune, "speed7b": cmd_speed7b, "llmc_windows": cmd_llmc_windows,
     "llmc": cmd_llmc, "ppl": cmd_ppl, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
