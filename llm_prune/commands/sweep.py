"""``llm-prune sweep MODEL``: the essential-sparsity curve of a method, and its knee per metric.

    llm-prune sweep smollm2-135m --method omp --sparsities 0.1:0.7:0.05 --eval ppl,arc_easy --eval-limit 500
    llm-prune sweep MODEL --method wanda --pattern 2:4,4:8 --eval ppl
    llm-prune sweep MODEL --method omp --sparsities 0.4:0.7:0.1 --allocation alpha   the knee, moved by allocation
    llm-prune sweep MODEL --sparsities 0.75,0.8 --out DIR --resume      extend a finished sweep
    llm-prune sweep minilm-l6 --finetune sst2 --method lth --rounds 1 --sparsities 0.2:0.6:0.2
        lottery tickets: one chain of rounds per seed, dense -> 0.2 -> 0.4 -> 0.6, each level a point
"""

from __future__ import annotations

import argparse

from . import add_output_arguments, add_selection_arguments, default_out, finish, levels_from, method_names
from .finetune import add_training_arguments, config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..calibration import add_calibration_arguments
    from ..cli import add_allocation_arguments
    from ..config import SCOPES
    from ..eval import cli as eval_cli
    from ..models import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint directory, hub id or known short name")
    p.add_argument("--method", default="omp", choices=sorted({"lth", *method_names()}),
                   help="pruning method (default: omp; lth needs --finetune)")
    p.add_argument("--sparsities", default=None,
                   help="levels: START:STOP:STEP (inclusive) or a comma list (default: 0.1:0.7:0.05 unless --pattern)")
    p.add_argument("--pattern", help="N:M levels, comma-separated (e.g. 2:4,4:8), each at its own sparsity 1-N/M")
    p.add_argument("--permute", action="store_true",
                   help="N:M levels with ria or wanda: choose the groups after reordering the input channels the "
                        "block absorbs (as the prune command's --permute)")
    p.add_argument("--scope", default="layer", choices=SCOPES, help="layer, or global (one threshold, data-free methods)")
    add_allocation_arguments(p)
    add_selection_arguments(p)
    p.add_argument("--eval", default="ppl", metavar="TASKS",
                   help="comma-separated: ppl, arc_easy, piqa, hellaswag, mmlu or lm-eval task names (default: ppl)")
    p.add_argument("--epsilon", type=float, default=1.0,
                   help="knee: an accuracy level fails when it drops more than this many points (default 1)")
    p.add_argument("--ppl-epsilon", type=float, default=0.05,
                   help="knee: a perplexity level fails when it is more than this fraction above dense (default 0.05)")
    p.add_argument("--save-mask", action="store_true", help="keep each level's keep-masks (bit-packed) under masks/")
    add_output_arguments(p, resumable=True)
    eval_cli.add_settings_arguments(p.add_argument_group("evaluation"), prefix="eval-")
    add_calibration_arguments(p)
    g = p.add_argument_group("fine-tuning each level instead (encoders: BERT, ViT)")
    g.add_argument("--finetune", metavar="TASK",
                   help="fine-tune dense and every level on TASK (sst2, rte, mrpc, digits, a file or folder) and "
                        "measure there, instead of --eval")
    add_training_arguments(g)


def run(args: argparse.Namespace) -> int:
    from ..calibration import calib_config_from_args
    from ..cli import allocation_kwargs
    from ..errors import UserError
    from ..eval import cli as eval_cli
    from ..methods import get_method
    from ..models import resolve_model
    from ..study.output import Output
    from ..study.sweep import SweepConfig, run_sweep

    sparsities = args.sparsities if args.sparsities is not None or args.pattern else "0.1:0.7:0.05"
    levels = tuple(levels_from(sparsities, args.pattern))
    if args.method == "lth" and not args.finetune:
        raise UserError("lottery tickets are found by fine-tuning: give --finetune TASK")
    if args.finetune and args.permute:
        raise UserError("--permute chooses N:M groups for --eval sweeps of ria or wanda; --finetune prunes by magnitude")
    if args.finetune and args.allocation != "uniform":
        raise UserError("--allocation shares sparsity out for --eval sweeps; --finetune prunes uniformly (drop one)")
    finetune = config_from_args(args, task=args.finetune, sparsity=levels[0]) if args.finetune else None
    # fine-tuning sweeps (lth among them) prune by magnitude: no calibration
    calib = calib_config_from_args(args, needed=not finetune and get_method(args.method).needs_calibration)
    tasks = (finetune.task.rstrip("/").split("/")[-1],) if finetune else tuple(eval_cli.parse_tasks(args.eval))
    cfg = SweepConfig(method=args.method, scope=args.scope, levels=levels, targets=tuple(args.targets),
                      exclude=tuple(args.exclude), tasks=tasks, epsilon_points=args.epsilon,
                      ppl_epsilon=args.ppl_epsilon, save_masks=args.save_mask, permute=args.permute,
                      **allocation_kwargs(args))
    settings = eval_cli.settings_from_args(args, prefix="eval-", progress=not args.quiet)
    src = resolve_model(args.model)
    what = (f"{args.method}{'-global' if args.scope == 'global' else ''}{'-' + tasks[0] if finetune else ''}"
            f"{'' if args.allocation == 'uniform' else '-' + args.allocation}{'-permute' if args.permute else ''}")
    out = Output(args.out or default_out(args.model, f"sweep-{what}"),
                 overwrite=args.overwrite, resume=args.resume)
    try:
        payload, knees = run_sweep(src, cfg, settings, out, calib=calib, finetune=finetune,
                                   progress=not args.quiet, source_name=args.model)
        draw(out, payload, knees)
        out.write_text("sweep.csv", to_csv(payload))
    except BaseException:
        out.abort(keep=any((out / "levels").glob("*.json")))  # finished levels stay for --resume
        raise
    return finish(out, payload, "sweep.json", to_table(payload, knees), args)


def draw(out, payload: dict, knees: dict) -> None:
    from ..study.plots import knee_plot

    levels = [lv["sparsity"] for lv in payload["levels"]]
    for name, curve in payload["curves"].items():
        if "/" in curve["task"]:  # MMLU categories: in the table and the JSON, not one picture each
            continue
        stderr = curve["stderr"] if all(e is not None for e in curve["stderr"]) else None
        out.picture(knee_plot, f"knee-{name.replace('/', '-')}.png", f"{name} ({payload['method']}, {payload['scope']})",
                    levels, curve["values"], curve["dense"], knees[name], stderr=stderr)


def _fmt(value: float, lower: bool) -> str:
    return f"{value:.3f}" if lower else f"{100 * value:.2f}"


def to_table(payload: dict, knees: dict) -> str:
    from ..report import table
    from ..study.sweep import allocation_label

    curves = payload["curves"]
    header = ["level", "achieved", *[n + ("" if c["lower_is_better"] else " %") for n, c in curves.items()], "prune s", "eval s"]
    rows = [["dense", "-", *[_fmt(c["dense"], c["lower_is_better"]) for c in curves.values()], "-", "-"]]
    for i, lv in enumerate(payload["levels"]):
        rows.append([lv["pattern"] or f"{lv['sparsity']:g}", f"{lv['achieved']:.4f}",
                     *[_fmt(c["values"][i], c["lower_is_better"]) for c in curves.values()],
                     f"{lv['prune_s']:.1f}", f"{lv['eval_s']:.1f}"])
    lines = [f"sweep of {payload['model']}: {payload['method']} ({payload['scope']} scope{allocation_label(payload)})",
             table(rows, header), ""]
    lines += [k.summary() for k in knees.values()]
    lines += ["", *payload["protocol"],
              f"time: pruning {payload['time']['prune_s']:.1f} s, evaluation {payload['time']['eval_s']:.1f} s"]
    return "\n".join(lines)


def to_csv(payload: dict) -> str:
    curves = payload["curves"]
    head = ["label", "sparsity", "achieved"] + [x for n in curves for x in (n, f"{n} stderr")]
    lines = [",".join(head), ",".join(["dense", "0", "0"] + [x for c in curves.values()
                                                             for x in (repr(c["dense"]), _csv(c["dense_stderr"]))])]
    for i, lv in enumerate(payload["levels"]):
        lines.append(",".join([lv["label"], repr(lv["sparsity"]), repr(lv["achieved"])]
                              + [x for c in curves.values() for x in (repr(c["values"][i]), _csv(c["stderr"][i]))]))
    return "\n".join(lines) + "\n"


def _csv(v) -> str:
    return "" if v is None else repr(v)
