"""``llm-prune``: argv -> frozen config -> one call per stage. Nothing below this file sees argv.

    llm-prune MODEL --method omp --sparsity 0.4 [--scope global] [--pattern 2:4] [--out DIR] [--eval mmlu]
    llm-prune eval PATH --tasks mmlu,ppl,arc_easy
    llm-prune sweep MODEL --sparsities 0.1:0.7:0.05 --eval ppl       the essential-sparsity curve and its knee
    llm-prune inspect MODEL --sparsity 0.4 --scope global            where the zeros are
    llm-prune distributions MODEL [MODEL2]                           |w| histograms, zeros and near-zeros
    llm-prune masks compare A B [C ...]                              keep-mask similarity (cosine, IoU)
    llm-prune trace CHECKPOINT_DIRS...                               sparsity emerging over training
    llm-prune report DIR                                             one markdown page of a study's results
    llm-prune finetune minilm-l6 --task sst2 --method omp|lth        prune, fine-tune with the mask held, vs dense
    llm-prune verify EXPORT [--source DIR]                           an export checked against its sparsity.json

``llm-prune MODEL ...`` (or ``llm-prune prune MODEL ...``) prunes; every other verb is a module
of ``llm_prune.commands`` (``eval``: ``llm_prune.eval.cli``) with ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import importlib
import json
import os
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import UserError

# verb -> the module that defines it (add_arguments(parser), run(args) -> exit code)
VERBS = {
    "eval": "llm_prune.eval.cli",
    "sweep": "llm_prune.commands.sweep",
    "inspect": "llm_prune.commands.inspect",
    "distributions": "llm_prune.commands.distributions",
    "masks": "llm_prune.commands.masks",
    "trace": "llm_prune.commands.trace",
    "finetune": "llm_prune.commands.finetune",
    "verify": "llm_prune.commands.verify",
    "report": "llm_prune.commands.report",
}
NO_TORCH = {"report"}  # verbs whose run never imports torch


class Parser(argparse.ArgumentParser):
    """argparse, with a bad argument as one line (like every other error) instead of the usage
    block followed by the message; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The prune verb's parser, built without importing torch: --help, --version and a bad
    argument answer before the heavy imports (BENCHMARKS.md, session 21)."""
    from .calibration import add_calibration_arguments
    from .commands import method_names
    from .config import DEFAULT_TARGETS, SCOPES
    from .eval import cli as eval_cli
    from .models import ALIASES, DEFAULT_MODEL, EMBEDDED

    p = Parser(
        prog="llm-prune",
        description="One-shot pruning of pre-trained transformers, streamed one block at a time. Other verbs: "
                    + ", ".join(f"`llm-prune {v}`" for v in VERBS) + " (each with its own --help).",
        epilog=f"Known names: {', '.join(sorted([*ALIASES, *EMBEDDED]))}. Default model: {DEFAULT_MODEL}.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="checkpoint directory, hub id (owner/name) or known short name")
    p.add_argument("--method", default="omp", choices=method_names(), help="pruning method (default: omp)")
    p.add_argument("--sparsity", help="fraction of targeted weights to remove, in [0, 1)")
    p.add_argument("--pattern", help="N:M pattern: keep at most N of every M weights along the input dim")
    p.add_argument("--permute", action="store_true",
                   help="with --pattern and ria or wanda: choose the N:M groups after reordering input channels "
                        "(RIA's channel permutation), only where the block absorbs it (the MLP's down projection "
                        "with gate/up, the attention output with the value heads): same function, N:M in storage order")
    p.add_argument("--scope", default="layer", choices=SCOPES,
                   help="layer: each matrix to the sparsity; global: one magnitude threshold over all targets")
    add_allocation_arguments(p)
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="GLOB",
                   help="2-D block tensors to prune, by name within the block or full name (default: *.weight)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="block tensors to leave untouched")
    p.add_argument("--format", default="dense", choices=["dense", "bitmask", "packed24"],
                   help="how pruned weights are stored: dense (zeros in place, loadable by anything), "
                        "bitmask (values + 1 bit per weight), packed24 (2:4 only: half the values + 2-bit indices)")
    p.add_argument("--out", type=Path, help="output directory (default: ./MODEL-METHOD-SPARSITY[-global])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights (they can run code when loaded; only for trusted sources)")
    p.add_argument("--save-mask", action="store_true",
                   help="also write the keep-masks, bit-packed, as masks.safetensors (for `llm-prune masks compare`)")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"llm-prune {__version__}")
    add_calibration_arguments(p)
    g = p.add_argument_group("evaluation (after pruning)")
    g.add_argument("--eval", metavar="TASKS",
                   help="evaluate the pruned model beside the dense baseline: mmlu, ppl, arc_easy, piqa, hellaswag, ...")
    g.add_argument("--no-dense-baseline", action="store_true", help="with --eval: skip the dense model")
    g.add_argument("--runtime", default="dense", choices=["dense", "semi-structured"],
                   help="with --eval: run eligible 2:4 Linear layers on sparse tensor cores (CUDA only)")
    g.add_argument("--no-save", action="store_true",
                   help="with --eval: prune on the fly while loading and write no checkpoint (results go to --out)")
    eval_cli.add_settings_arguments(g, prefix="eval-")
    return p


def add_allocation_arguments(p: argparse.ArgumentParser) -> None:
    """--allocation and its settings (the prune verb and the sweep)."""
    from .config import ALLOCATIONS, DEFAULT_BAND

    bands = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_BAND.items())
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="how the sparsity is shared between blocks: uniform (every matrix at it; default); "
                        "owl (blocks with more activation outliers pruned less; calibrated methods); alpha "
                        "(blocks with lighter-tailed weight spectra pruned more; data-free, any method). "
                        "The average over all targets stays the requested sparsity exactly. Not with "
                        "--scope global or --pattern, which fix each matrix's share themselves")
    p.add_argument("--allocation-band", type=float, metavar="LAMBDA",
                   help=f"owl/alpha: every block's sparsity stays within ±LAMBDA of the requested one "
                        f"(default: {bands})")
    p.add_argument("--allocation-unclipped", action="store_true",
                   help="owl/alpha: shift the spread of sparsities to the requested mean as OWL's reference code "
                        "does, without clipping blocks to the band (a lopsided spread then leaves ±LAMBDA); "
                        "for comparing with other tools' OWL")
    p.add_argument("--owl-m", type=float, default=5.0, metavar="M",
                   help="owl: a score above M × its block's mean is an outlier (default 5, as the paper)")


def allocation_kwargs(args: argparse.Namespace) -> dict:
    return {"allocation": args.allocation, "band": args.allocation_band, "owl_m": args.owl_m,
            "clip": not args.allocation_unclipped}


def default_out(model: str, cfg) -> Path:
    name = Path(model.rstrip("/")).name if Path(model).is_dir() else model.split("/")[-1]
    suffix = ("-global" if cfg.scope == "global" else "") + ("" if cfg.allocation == "uniform" else f"-{cfg.allocation}")
    return Path(f"{name}-{cfg.method}-{cfg.sparsity.label}{suffix}")


def _fixed_mmap_threshold(nbytes: int = 4 << 20) -> None:
    """Make glibc return every freed block above ``nbytes`` to the OS.

    By default glibc raises its mmap threshold (up to 32 MiB) after large frees, so per-tensor
    temporaries of a few MiB then stay in its heaps between blocks (BENCHMARKS.md has the peak
    RSS with and without). Process-wide, so only the program sets it (``main`` without argv).
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> int:
    own = argv is None  # run as the program: the process is ours to tune, and to end
    code = _run(sys.argv[1:] if own else list(argv), own)
    if own:
        _exit_now(code)  # returns only while another thread still works
    return code


def _run(argv: list[str], own: bool) -> int:
    try:
        if own:
            _fixed_mmap_threshold()
        if argv[:1] and argv[0] in VERBS:
            return _verb(argv[0], argv[1:], own)
        return _prune(_parse(build_parser(), argv[1:] if argv[:1] == ["prune"] else argv), own)
    except UserError as e:
        print(f"llm-prune: error: {e}", file=sys.stderr)
        return e.exit_code
    except _Exit as e:
        return e.code
    except KeyboardInterrupt:
        print("llm-prune: interrupted; finished blocks are kept, run again with --resume to continue",
              file=sys.stderr)
        return 130


def _exit_now(code: int) -> None:
    """End the program without the interpreter's teardown, as mypy does.

    Freeing the objects that torch, transformers and numba made is a good part of a short
    command's time (BENCHMARKS.md, session 18), for a process that is ending anyway. What of
    the teardown matters is done here: the atexit handlers (log handlers flushed, temporary
    directories removed), then Python's and C's output buffers flushed. Not while another
    non-daemon thread is alive (an executor left open): the normal exit waits for it."""
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what native code printed through C's stdio
    except (OSError, AttributeError):
        pass
    os._exit(code)


def _preload(name: str, own: bool) -> None:
    """As the program (``own``): import module ``name``, the command's heavy imports, with the
    cyclic GC paused, a process-wide setting only the program itself may make. A library call
    of ``main`` leaves the command to import what it uses, as it would anyway.

    torch, transformers and numba create ~10^6 long-lived objects on import: with the cyclic GC
    paused they are walked once instead of again and again while they load, and frozen after,
    out of the collector's sight for the rest of the run (its full collections then skip them,
    and exit is shorter)."""
    if not own:
        return
    gc.disable()
    try:
        importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()


class _Exit(Exception):
    """argparse finished the command itself (--help, --version, a bad argument): its exit code."""

    def __init__(self, code: int):
        self.code = code


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # main() returns the code instead of ending the caller's process
        raise _Exit(e.code if isinstance(e.code, int) else 2) from None


def _verb(name: str, argv: list[str], own: bool) -> int:
    module = importlib.import_module(VERBS[name])
    p = Parser(prog=f"llm-prune {name}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    args = _parse(p, argv)
    if name not in NO_TORCH:
        _preload("llm_prune.pipeline", own)  # torch and the package's core, with the collector paused
    return module.run(args)


def _prune(args: argparse.Namespace, own: bool = False) -> int:
    from .calibration import calib_config_from_args
    from .config import PruneConfig, Sparsity
    from .eval import cli as eval_cli
    from .models import resolve_model

    cfg = PruneConfig(method=args.method, sparsity=Sparsity.parse(args.sparsity, args.pattern),
                      scope=args.scope, targets=tuple(args.targets), exclude=tuple(args.exclude),
                      permute=args.permute, **allocation_kwargs(args))
    _preload("llm_prune.pipeline", own)  # torch and the rest, once the arguments are known to be sane
    from .methods import get_method
    from .report import format_summary

    method = get_method(cfg.method)
    method.check(cfg)  # a combination the method refuses, before any other work
    calib = calib_config_from_args(args, needed=method.needs_calibration)
    if args.no_save and args.save_mask:
        raise UserError("--save-mask writes the masks beside an export; --no-save writes none (drop one of them)")
    if args.no_save and not args.eval:
        raise UserError("--no-save only makes sense with --eval (otherwise nothing would come out)")
    tasks = eval_cli.parse_tasks(args.eval) if args.eval else []
    if args.runtime != "dense":
        from .kernels.semi_structured import require_cuda

        require_cuda()  # before any pruning work
    settings = eval_cli.settings_from_args(args, prefix="eval-", progress=not args.quiet) if tasks else None
    if tasks:
        from .eval.harness import check_tasks

        check_tasks(tasks, settings)  # an unknown task, or no lm-eval, before any pruning
    out = args.out or default_out(args.model, cfg)
    src = resolve_model(args.model)
    progress = not args.quiet

    if args.no_save:  # prune while loading: nothing written but the evaluation results
        from .loading import from_pretrained

        model = from_pretrained(src, method=cfg.method, sparsity=None if cfg.sparsity.is_nm else cfg.sparsity.ratio,
                                pattern=f"{cfg.sparsity.n}:{cfg.sparsity.m}" if cfg.sparsity.is_nm else None,
                                scope=cfg.scope, targets=cfg.targets, exclude=cfg.exclude,
                                allocation=cfg.allocation, allocation_band=cfg.band, allocation_clip=cfg.clip,
                                allow_pickle=args.allow_pickle, progress=progress, **_placement(settings))
        return _evaluate(src, _runtime(model, args), tasks, settings, out, args, label=f"{cfg.method} {cfg.sparsity}")

    from .pipeline import prune_checkpoint  # heavy imports after argument checks

    report = prune_checkpoint(src, cfg, out, fmt=args.format, calib=calib, source_name=args.model,
                              overwrite=args.overwrite, resume=args.resume, allow_pickle=args.allow_pickle,
                              progress=progress, save_mask=args.save_mask)
    print(json.dumps(report, indent=2) if args.json else format_summary(report, out))
    if not tasks:
        return 0
    if args.format == "dense" and args.runtime == "dense":
        pruned = out  # transformers loads it directly
    else:
        from .loading import load

        pruned = _runtime(load(out, progress=progress, **_placement(settings)), args)
    return _evaluate(src, pruned, tasks, settings, out, args, label=f"{cfg.method} {cfg.sparsity}")


def _runtime(model, args):
    from .kernels.semi_structured import apply_runtime

    return apply_runtime(model, args.runtime)


def _placement(settings) -> dict:
    """dtype and device for a model evaluated in memory, chosen as for a checkpoint path."""
    from .eval.load import pick_device, pick_dtype

    device = pick_device(settings.device)
    return {"dtype": pick_dtype(settings.dtype, device), "device_map": {"": device}}


def _evaluate(src: Path, pruned, tasks, settings, out: Path, args, label: str) -> int:
    from .eval.api import evaluate_pruned

    evaluate_pruned(src, pruned, tasks, settings, out, dense_baseline=not args.no_dense_baseline,
                    label=label, echo=True)
    print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
