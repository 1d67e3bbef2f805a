"""Figures of a study, one PNG per function; each returns the path it wrote.

matplotlib is an optional extra (``llm-prune[plot]``) and is imported only inside these
functions. They draw on a bare ``Figure`` with the Agg canvas rather than through pyplot, so no
global backend is switched, no figure registry grows, and nothing can pop up a window. Without
matplotlib they raise ``MissingExtra``; callers print its one-line message and still write their
tables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from ..errors import UserError
from ..paths import temp_file
from .knee import KNEE_AT_FIRST_LEVEL, Knee

DPI = 120


class MissingExtra(ImportError, UserError):
    """An optional dependency is not installed; the message is one line saying what to install."""


class Series(NamedTuple):
    """One curve of a knee plot; ``knee``, when given, is marked in the curve's colour."""

    levels: Sequence[float]
    values: Sequence[float]
    stderr: Sequence[float] | None = None
    knee: Knee | None = None


def _new_figure(figsize: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra("plots need matplotlib: pip install 'llm-prune[plot]'") from None
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the PNG atomically, so an interrupted run never leaves half a figure behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fd, tmp = temp_file(path, ".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _percent_axis(axis) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def knee_plot(path, metric_name: str, levels: Sequence[float], values: Sequence[float], dense: float,
              knee: Knee, stderr: Sequence[float] | None = None, series_label: str | None = None,
              extra_series: Mapping[str, Series | tuple] | None = None, log_y: bool | None = None) -> Path:
    """The metric vs sparsity, as the paper draws it: a dense line, the band within ε of dense
    (the levels that count as dense), and the essential sparsity as a labelled vertical line.

    ``extra_series`` maps a label to ``Series(levels, values, stderr=None, knee=None)`` (or a
    plain tuple in that order), e.g. OMP-layer vs OMP-global vs Wanda vs SparseGPT on one axes.
    ``log_y`` (default: when a lower-is-better metric spans more than 10x) puts y on a log scale.
    """
    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    curves = {series_label or metric_name: Series(levels, values, stderr, knee)}
    curves.update({label: Series(*s) for label, s in (extra_series or {}).items()})
    ax.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.4g})")
    ax.axhspan(min(dense, knee.threshold), max(dense, knee.threshold), color="0.85", zorder=0,
               label=f"within ε of dense: {knee.epsilon_text}")
    several = len(curves) > 1
    for i, (label, s) in enumerate(curves.items()):
        color = f"C{i}"
        if several and s.knee is not None:  # one title cannot hold every curve's knee: each legend entry says its own
            label = f"{label}: {_knee_title(s.knee)}"
        ax.errorbar(list(s.levels), list(s.values), yerr=None if s.stderr is None else list(s.stderr),
                    marker="o", markersize=4, capsize=3, color=color, label=label)
        if s.knee is not None:
            _mark_knee(ax, s.knee, color, linestyle="--" if i == 0 else ":")
    everything = [dense, *[v for c in curves.values() for v in c.values]]
    if log_y is None:  # perplexity that explodes past the knee reads on a log axis
        log_y = not knee.higher_is_better and min(everything) > 0 and max(everything) / min(everything) > 10
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(metric_name + ("  (higher is better)" if knee.higher_is_better else "  (lower is better)"))
    _percent_axis(ax.xaxis)
    ax.set_title(f"{metric_name} vs sparsity\n" + ("knee of each curve in the legend" if several else _knee_title(knee)),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _mark_knee(ax, knee: Knee, color: str, linestyle: str) -> None:
    if knee.essential_sparsity is None:  # knee at the first level: nothing passes to mark
        return
    ax.axvline(knee.essential_sparsity, color=color, linestyle=linestyle, linewidth=1)
    label = ("≥ " if knee.lower_bound else "") + f"{knee.essential_sparsity:.0%}"
    ax.annotate(label, xy=(knee.essential_sparsity, 1.0), xycoords=("data", "axes fraction"),
                xytext=(3, -12), textcoords="offset points", color=color, fontsize=8)


def _knee_title(knee: Knee) -> str:
    if knee.status == KNEE_AT_FIRST_LEVEL:
        text = f"knee at the first level ({knee.first_failing:.0%} fails)"
    elif knee.lower_bound:
        text = f"no knee: essential sparsity ≥ {knee.essential_sparsity:.0%}"
    else:
        text = f"essential sparsity {knee.essential_sparsity:.0%}"
    if knee.in_noise:
        text += " (inside the noise)"
    return text


def heatmap(path, rows_labels: Sequence[str], col_labels: Sequence[str], values_2d, title: str,
            cbar_label: str) -> Path:
    """A rows × columns grid of values (e.g. blocks × module types, pruned fraction)."""
    data = [[float(v) for v in row] for row in values_2d]
    if len(data) != len(rows_labels) or any(len(r) != len(col_labels) for r in data):
        raise ValueError(f"heatmap values must be {len(rows_labels)} rows × {len(col_labels)} columns")
    fig = _new_figure((1.2 + 0.9 * len(col_labels), 1.2 + 0.28 * max(len(rows_labels), 8)))
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows_labels)), labels=list(rows_labels), fontsize=7)
    if len(rows_labels) * len(col_labels) <= 300:  # beyond that the numbers are unreadable
        for r, row in enumerate(data):
            for c, v in enumerate(row):
                light = image.norm(v) > 0.6  # viridis turns yellow at the top: dark text there
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="black" if light else "white")
    fig.colorbar(image, ax=ax, label=cbar_label)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def per_block_lines(path, blocks: Sequence, series: Mapping[str, Sequence[float]], ylabel: str,
                    title: str) -> Path:
    """One line per series over the blocks (e.g. mask similarity per block, sparsity per block)."""
    fig = _new_figure((6.4, 4.0))
    ax = fig.add_subplot()
    x = list(range(len(blocks)))
    for label, ys in series.items():
        ax.plot(x, list(ys), marker="o", markersize=3, label=label)
    step = max(1, len(blocks) // 16)  # at most ~16 tick labels, whatever the depth
    ax.set_xticks(x[::step], labels=[str(b) for b in blocks][::step], fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def histograms(path, panels: Sequence[tuple], xlabel: str, log_y: bool = True) -> Path:
    """Small multiples of histograms; each panel is (title, bin_edges, counts), where counts is one
    array or a mapping label → array (e.g. dense vs kept weights) drawn as outlines on one axes."""
    n = max(1, len(panels))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig = _new_figure((3.4 * ncols, 2.6 * nrows))
    for i, (title, edges, counts) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        labelled = counts if isinstance(counts, Mapping) else {None: counts}
        for label, c in labelled.items():
            ax.stairs(list(map(float, c)), list(map(float, edges)), label=label, fill=label is None)
        if log_y and any(float(v) > 0 for c in labelled.values() for v in c):  # log of all-zero is undefined
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
        if isinstance(counts, Mapping):
            ax.legend(fontsize=7)
    return _save(fig, path)


def lines_over_steps(path, steps: Sequence[float], series: Mapping[str, Sequence[float]], ylabel: str,
                     title: str, marks: Sequence | None = None, xlabel: str = "step", logy: bool = False,
                     spread: Mapping[str, Sequence[float]] | None = None) -> Path:
    """Lines over training steps (or any x: ``xlabel``, e.g. "sparsity"); ``marks`` are steps to flag
    (a step, or (step, label)), drawn as red vertical lines, e.g. where the sparsity of a checkpoint jumps.
    ``logy``: a log y axis (perplexities that grow by orders of magnitude). ``spread``: per series, a
    half-width at each step (e.g. the sd over seeds), drawn as a shaded band around its line, so
    that lines closer than their spread do not read as a ranking."""
    fig = _new_figure((6.4, 4.0))
    ax = fig.add_subplot()
    for label, ys in series.items():
        (line,) = ax.plot(list(steps), list(ys), marker=".", label=label)
        if spread and label in spread:
            ax.fill_between(list(steps), [y - d for y, d in zip(ys, spread[label])],
                            [y + d for y, d in zip(ys, spread[label])], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    for j, mark in enumerate(marks or ()):
        step, label = mark if isinstance(mark, tuple) else (mark, None)
        ax.axvline(step, color="red", linestyle="--", linewidth=1, label="flagged" if j == 0 else None)
        if label:
            ax.annotate(str(label), xy=(step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", color="red", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if series or marks:
        ax.legend(fontsize=8)
    return _save(fig, path)
