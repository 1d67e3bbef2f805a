"""Sparsity emerging over training (the paper's Fig. 8): exact zeros and near-zeros per checkpoint, jumps flagged.

    llm-prune trace RUN_DIR                       a folder of checkpoint-N subdirectories
    llm-prune trace CKPT_A CKPT_B CKPT_C ...      checkpoint directories

Each checkpoint is streamed once, one tensor at a time, and its targets' exact zeros and
near-zeros (|w| < eps) are counted exactly per module type (``distributions.census``). The
checkpoints are put in training order and a checkpoint where the overall near-zero fraction
moved much faster than it usually does is flagged (``JUMP_RULE``).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from ..config import PruneConfig
from ..errors import UserError
from .distributions import NEAR_ZERO, check_same_layout, combine, open_checkpoint, read_census
from .inspect import module_type, type_order

CHECKPOINT_N = re.compile(r"checkpoint-(\d+)")

# The jump rule. A change is judged by its rate (per step), so that checkpoints saved at
# unequal intervals compare fairly; against the median rate of the *other* intervals, so that a
# jump does not raise its own bar and a few jumps do not hide each other; and never below a
# floor, so that in a run that barely moves (a median rate near 0) noise-level wiggles are not
# flagged: half a percentage point is about the smallest change a reader sees on the plot.
JUMP_FLOOR = 0.005
JUMP_FACTOR = 3.0
JUMP_RULE = ("a checkpoint is flagged when the overall near-zero fraction moved since the previous checkpoint by "
             f"more than max({JUMP_FLOOR * 100:g} percentage points, {JUMP_FACTOR:g} × the median |change| per step "
             "of the other intervals × this interval's steps); with only two checkpoints, the floor alone")


# -- which checkpoints, in which order -------------------------------------------------------------
def find_checkpoints(inputs: list[Path]) -> tuple[list[tuple[int, Path]], str]:
    """(step, directory) in training order, and how the order was found.

    An input is a checkpoint directory (it has config.json) or a folder of ``checkpoint-*``
    subdirectories. Steps are the N of ``checkpoint-N`` when every directory is so named, else
    trainer_state.json's global_step when every directory has one, else positions in the order given.
    """
    dirs = [d for p in map(Path, inputs) for d in _expand(p)]
    if len(dirs) < 2:
        raise UserError(f"a trace needs at least two checkpoints, found {len(dirs)} in {' '.join(map(str, inputs))}")
    if len(set(map(Path.resolve, dirs))) < len(dirs):
        raise UserError("a checkpoint is given twice")
    named = [CHECKPOINT_N.fullmatch(d.name) for d in dirs]
    states = [_global_step(d) for d in dirs]
    if all(named):
        steps, how = [int(m.group(1)) for m in named], "the number in checkpoint-N"
    elif None not in states:
        steps, how = states, "trainer_state.json's global_step"
    else:
        steps, how = list(range(len(dirs))), "the order given (no checkpoint-N names or trainer_state.json steps)"
    if len(set(steps)) < len(steps):
        twice = next(s for s in steps if steps.count(s) > 1)
        raise UserError(f"two checkpoints are at step {twice} (by {how}): give each step once")
    return sorted(zip(steps, dirs), key=lambda sd: sd[0]), how


def _expand(p: Path) -> list[Path]:
    if (p / "config.json").is_file():
        return [p]
    subs = sorted(d for d in p.glob("checkpoint-*") if d.is_dir()) if p.is_dir() else []
    if not subs:
        raise UserError(f"{p} is neither a checkpoint directory (no config.json) nor a folder of checkpoint-* "
                        "subdirectories")
    return subs


def _global_step(d: Path) -> int | None:
    try:
        step = json.loads((d / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


# -- abrupt changes ---------------------------------------------------------------------------------
def flag_jumps(steps: list[int], values: list[float], floor: float = JUMP_FLOOR,
               factor: float = JUMP_FACTOR) -> list[dict]:
    """The checkpoints whose value moved abruptly since the previous one, by ``JUMP_RULE``."""
    spans = [steps[i] - steps[i - 1] for i in range(1, len(steps))]
    changes = [values[i] - values[i - 1] for i in range(1, len(values))]
    rates = [abs(c) / s for c, s in zip(changes, spans)]
    jumps = []
    for i, (change, span) in enumerate(zip(changes, spans)):
        others = rates[:i] + rates[i + 1:]
        baseline = statistics.median(others) if others else None
        bar = floor if baseline is None else max(floor, factor * baseline * span)
        if abs(change) > bar:
            jumps.append({"step": steps[i + 1], "previous_step": steps[i], "change": change, "threshold": bar,
                          "baseline_rate_per_step": baseline})
    return jumps


# -- the study --------------------------------------------------------------------------------------
def _fractions(c) -> dict:
    return {"params": c.numel, "zeros": c.zeros, "zero_fraction": c.zeros / c.numel, "near_zeros": c.near_zeros,
            "near_zero_fraction": c.near_zeros / c.numel}


def measure(ckpt, eps: float, progress: bool) -> dict:
    """One checkpoint's exact zeros and near-zeros, overall and per module type."""
    found = read_census(ckpt, eps, progress)
    by_type: dict[str, list] = {}
    for name in ckpt.order:
        by_type.setdefault(module_type(ckpt.arch.block_of(name)[1]), []).append(found[name])
    return {"overall": _fractions(combine(list(found.values()))),
            "by_type": {t: _fractions(combine(by_type[t])) for t in sorted(by_type, key=type_order)}}


def open_all(located: list[tuple[int, Path]], cfg: PruneConfig) -> list:
    """Every checkpoint opened (headers only) and checked to be one layout, before any work."""
    ckpts = [open_checkpoint(d, cfg, d.name) for _, d in located]
    for other in ckpts[1:]:
        check_same_layout(ckpts[0], other)
    return ckpts


def trace(located: list[tuple[int, Path]], ordered_by: str, ckpts: list, eps: float, progress: bool = True) -> dict:
    """trace.json's payload: per checkpoint (in step order) and module type, the fractions; the jumps."""
    from tqdm.auto import tqdm

    points = []
    for (step, d), ckpt in tqdm(list(zip(located, ckpts)), desc="checkpoints", disable=not progress):
        points.append({"step": step, "path": str(d), **measure(ckpt, eps, progress)})
    steps = [p["step"] for p in points]
    types = list(points[0]["by_type"])
    series = lambda get: [get(p)["near_zero_fraction"] for p in points]
    return {
        "what": "exact zeros and near-zeros of the targeted weights over training",
        "eps": eps,
        "near_zero": NEAR_ZERO,
        "ordered_by": ordered_by,
        "steps_are": "positions in the order given" if ordered_by.startswith("the order given") else "training steps",
        "family": ckpts[0].arch.family,
        "targets": len(ckpts[0].order),
        "jump_rule": JUMP_RULE,
        "jump_rule_by_type": "the same rule on each module type's own near-zero fraction",
        "jump_floor": JUMP_FLOOR,
        "jump_factor": JUMP_FACTOR,
        "jumps": {"overall": flag_jumps(steps, series(lambda p: p["overall"])),
                  "by_type": {t: flag_jumps(steps, series(lambda p: p["by_type"][t])) for t in types}},
        "checkpoints": points,
    }


# -- tables and pictures ----------------------------------------------------------------------------
def summary(payload: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per checkpoint the overall zeros and near-zeros, near-zeros per module type, flags."""
    flagged = {j["step"]: j for j in payload["jumps"]["overall"]}
    types = list(payload["checkpoints"][0]["by_type"])
    rows = []
    for p in payload["checkpoints"]:
        j = flagged.get(p["step"])
        o = p["overall"]
        rows.append([str(p["step"]), f"{o['zero_fraction']:.2%}", f"{o['near_zero_fraction']:.2%}",
                     *[f"{p['by_type'][t]['near_zero_fraction']:.2%}" for t in types],
                     f"JUMP {j['change'] * 100:+.2f} pp" if j else ""])
    return ["step", "zeros", "<eps all", *types, "flag"], rows


def verdict(payload: dict) -> str:
    jumps = payload["jumps"]["overall"]
    typed = {t: j for t, j in payload["jumps"]["by_type"].items() if j}
    text = ("abrupt changes at step " + ", ".join(f"{j['step']} ({j['change'] * 100:+.2f} pp)" for j in jumps)
            if jumps else "no abrupt change in the overall near-zero fraction")
    if typed:
        text += "; per module type: " + "; ".join(f"{t} at {', '.join(str(j['step']) for j in js)}"
                                                for t, js in typed.items())
    return f"{text} (rule: {payload['jump_rule']})"


def caption(payload: dict) -> str:
    return (f"{len(payload['checkpoints'])} checkpoints ({payload['family']}, {payload['targets']} targets) ordered by "
            f"{payload['ordered_by']}; near-zero: {payload['near_zero']} with eps = {payload['eps']:g}; the module "
            "columns are near-zero fractions")


def markdown(payload: dict) -> list[str]:
    """trace.json as a report section: the fractions per checkpoint and the flagged steps."""
    from .report import md_table

    header, rows = summary(payload)
    return ["## Sparsity over training", "", caption(payload) + ".", "", verdict(payload) + ".", "",
            *md_table(header, rows)]


def draw(path, payload: dict) -> Path:
    """The near-zero fraction over steps: one thin line per module type, all targets thick and
    black (exact zeros dashed, when there are any), flagged checkpoints as red lines."""
    from .plots import _new_figure, _save

    points = payload["checkpoints"]
    steps = [p["step"] for p in points]
    fig = _new_figure((8.6, 4.4))
    ax = fig.add_subplot()
    for i, t in enumerate(points[0]["by_type"]):
        ax.plot(steps, [p["by_type"][t]["near_zero_fraction"] for p in points], marker=".", markersize=4,
                linewidth=1, color=f"C{i}", label=t)
    ax.plot(steps, [p["overall"]["near_zero_fraction"] for p in points], marker="o", markersize=3.5, linewidth=2.4,
            color="black", label="all targets")
    if any(p["overall"]["zeros"] for p in points):
        ax.plot(steps, [p["overall"]["zero_fraction"] for p in points], linestyle="--", linewidth=1.5, color="0.4",
                label="all targets: exact zeros")
    for j, jump in enumerate(payload["jumps"]["overall"]):
        ax.axvline(jump["step"], color="red", linestyle="--", linewidth=1, label="abrupt jump" if j == 0 else None)
        ax.annotate(f"{jump['change'] * 100:+.1f} pp", xy=(jump["step"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", color="red", fontsize=8)
    low, high = ax.get_ylim()
    decimals = 0 if high - low >= 0.05 else 1 if high - low >= 0.005 else 2  # enough that ticks differ
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.{decimals}%}")
    ax.set_xlabel("training step" if payload["steps_are"] == "training steps" else "checkpoint (order given)")
    ax.set_ylabel(f"weights with |w| < {payload['eps']:g}")
    flags = ", ".join(str(j["step"]) for j in payload["jumps"]["overall"]) or "none"
    ax.set_title(f"near-zero weights over training ({payload['family']}); abrupt jumps at: {flags}\n"
                 f"jump: |change| > max({payload['jump_floor'] * 100:g} pp, {payload['jump_factor']:g} × median rate "
                 "of the other intervals × steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)
