"""How the weights' magnitudes are spread (the paper's Fig. 7): |w| histograms, exact zeros, near-zeros.

    llm-prune distributions MODEL [MODEL2] [--eps 1e-3] [--bins 80]

Per module type (over all blocks), per block and over all targets, for one checkpoint or two of
the same architecture side by side. Every count is exact and memory stays at about one tensor:
each target is streamed once and leaves behind its exact zero and near-zero counts and the
sparse histogram of its magnitude keys (``magnitude.key_table``), from which the log-binned
histograms and the quantiles are read at the end, on bin edges shared by both checkpoints.
Where an export or load of a 16-bit checkpoint left those key tables in the cache, no weight is
read at all: the counts come from the tables.

Key histograms are exact per value for fp16/bf16, and per bucket of 2^16 keys (the high half
of the bits, 2^-7 relative width) for fp32. So the log-spaced edges are snapped down to bf16
values, which are fp32 bucket boundaries: no bucket straddles an edge, and every weight lands in
the bin its exact value belongs to. fp32 quantiles are the lower end of their bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import arch_for
from ..config import PruneConfig
from ..errors import UserError
from ..magnitude import LOW_BITS, KeyTable, NonFinite, bucket_table, key_table, layout, merge, select
from ..reader import CheckpointReader
from ..targets import select_targets, target_order
from .inspect import module_type, type_order

NEAR_ZERO = "|w| < eps, exact zeros included"
NORMALISATION = ("each bin holds the fraction of the group's weights (all of them, zeros included) whose |w| lies in "
                 "[edge, next edge); exact zeros are in no bin (a log axis has no 0) but in zero_fraction, so the "
                 "bins plus zero_fraction sum to 1")
SPACING = ("log-spaced over [smallest nonzero |w|, largest |w|] of all checkpoints, each edge snapped down to a "
           "bf16 value so that no fp32 key bucket straddles an edge (every count is exact)")
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
QUANTILE_RULE = "the k-th smallest |w| with k = floor(q·(n-1)) + 1, zeros included"


# -- one tensor -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Census:
    """What one tensor (or a group of them) contributes: exact counts and the table of its |w| keys."""

    numel: int
    zeros: int
    near_zeros: int
    table: KeyTable


def check_eps(eps: float) -> None:
    if not (eps > 0 and math.isfinite(eps)):
        raise UserError(f"--eps must be a positive number, got {eps}")


def eps_key(eps: float, dtype: torch.dtype) -> int:
    """The smallest magnitude key whose value is >= eps: |w| < eps exactly when key(w) < this."""
    check_eps(eps)
    near = torch.tensor([eps], dtype=torch.float64).to(dtype)  # rounds to nearest, maybe below eps
    key = int(near.view(layout(dtype).int_dtype)[0]) & layout(dtype).sign_clear
    return key + 1 if float(near[0]) < eps else key


def census(w: torch.Tensor, key_eps: int) -> Census:
    """Exact zeros, exact |w| < eps (``key_eps`` from ``eps_key``) and the key table of one tensor;
    raises ``NonFinite`` for inf/nan."""
    table = key_table(w, checked=True)
    zeros = w.numel() - int(torch.count_nonzero(w))
    high = key_eps >> LOW_BITS if table.wide else key_eps
    near = int(table.counts[table.keys < high].sum())
    low = key_eps & ((1 << LOW_BITS) - 1)
    if table.wide and low and table.count_at(high):  # eps inside an occupied fp32 bucket: count its low halves
        lows = bucket_table(w, high)
        near += int(lows.counts[lows.keys < low].sum())
    return Census(w.numel(), zeros, near, table)


def combine(parts: list[Census]) -> Census:
    return Census(sum(p.numel for p in parts), sum(p.zeros for p in parts), sum(p.near_zeros for p in parts),
                  merge([p.table for p in parts]))


# -- checkpoints ------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """An opened checkpoint and its targets (headers only; nothing read yet)."""

    path: Path
    label: str
    source: object  # loading.decode.DenseSource
    arch: object  # arch.Arch
    order: list[str]  # targets in visiting order
    dtype: torch.dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.source.infos[n].shape) for n in self.order}


def open_checkpoint(path: Path, cfg: PruneConfig, label: str) -> Checkpoint:
    from ..loading.decode import DenseSource

    source = DenseSource(CheckpointReader(path))
    arch = arch_for(source.reader.config)
    units = source.units(arch)
    select_targets(units, source.infos, arch, cfg)
    order = target_order(units)
    dtypes = {source.infos[n].dtype for n in order}
    if len(dtypes) > 1:  # keys of different dtypes do not compare: one table per checkpoint needs one dtype
        raise UserError(f"{path}: the targets mix dtypes ({', '.join(sorted(map(str, dtypes)))}); "
                        "select targets of one dtype with --targets/--exclude")
    return Checkpoint(Path(path), label, source, arch, order, dtypes.pop())


def check_same_layout(a: Checkpoint, b: Checkpoint) -> None:
    """One line when two checkpoints are not the same architecture with the same targets."""
    if a.arch.family != b.arch.family:
        raise UserError(f"{b.path} is a model of family {b.arch.family}, {a.path} of family {a.arch.family}: "
                        "compare checkpoints of one architecture")
    sa, sb = a.shapes(), b.shapes()
    if sa != sb:
        diff = sorted(set(sa) ^ set(sb)) or sorted(n for n in sa if sa[n] != sb[n])
        raise UserError(f"{b.path} and {a.path} differ in their targets ({len(sb)} vs {len(sa)} tensors; "
                        f"first difference: {diff[0]}): compare checkpoints of one architecture and size")


def damaged(ckpt: Checkpoint, name: str) -> UserError:
    return UserError(f"{name} (in {ckpt.source.file_of(name)}) has inf or nan values: the checkpoint is damaged")


def table_census(table: KeyTable, key_eps: int) -> Census:
    """``census`` from a tensor's 16-bit key table alone: its exact zeros are its count at key 0
    (+0 and -0), its near-zeros the counts below ``key_eps``."""
    near = int(table.counts[table.keys < key_eps].sum())
    return Census(table.numel, table.count_at(0), near, table)


def cached_tables(ckpt: Checkpoint) -> dict[str, KeyTable] | None:
    """The targets' key tables from the cache an export or load of this checkpoint left (16-bit
    weights, hashes known), else None: then every target is read."""
    if layout(ckpt.dtype).wide or ckpt.source.decoded:
        return None
    from ..loading.keytables import TableCache
    from ..methods import get_method

    return TableCache(ckpt.source, get_method("omp")).cached(ckpt.order)  # OMP's key tables: of |w| itself


def read_census(ckpt: Checkpoint, eps: float, progress: bool) -> dict[str, Census]:
    """Every target of a checkpoint, streamed once (or none read, from cached key tables): name -> Census."""
    key = eps_key(eps, ckpt.dtype)
    tables = cached_tables(ckpt)
    if tables is not None:
        inf = layout(ckpt.dtype).inf_key
        bad = next((n for n in ckpt.order if len(tables[n].keys) and int(tables[n].keys[-1]) >= inf), None)
        if bad is not None:
            raise damaged(ckpt, bad)
        return {n: table_census(tables[n], key) for n in ckpt.order}
    found = {}
    for name, w in tqdm(ckpt.source.read(ckpt.order, mapped=ckpt.order), total=len(ckpt.order),
                        desc=f"reading {ckpt.label}", disable=not progress, leave=False):
        try:
            found[name] = census(w, key)
        except NonFinite:
            raise damaged(ckpt, name) from None
    return found


def groups(ckpt: Checkpoint, found: dict[str, Census]) -> dict[str, dict[str, Census]]:
    """The tensors' counts summed per module type, per block and over all targets."""
    by_type: dict[str, list[Census]] = {}
    by_block: dict[int, list[Census]] = {}
    for name in ckpt.order:
        block, rel = ckpt.arch.block_of(name)
        by_type.setdefault(module_type(rel), []).append(found[name])
        by_block.setdefault(block, []).append(found[name])
    return {
        "overall": {"all targets": combine(list(found.values()))},
        "by_type": {t: combine(by_type[t]) for t in sorted(by_type, key=type_order)},
        "by_block": {str(b): combine(by_block[b]) for b in sorted(by_block)},
    }


# -- bins, histograms, quantiles ------------------------------------------------------------------
def _values(keys: torch.Tensor, dtype: torch.dtype, wide: bool) -> torch.Tensor:
    """The magnitude at the lower end of each key bucket (each key, for 16-bit weights), as float64."""
    return (keys << (LOW_BITS if wide else 0)).to(layout(dtype).int_dtype).view(dtype).double()


def _nonzero_buckets(c: Census, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower value, count) of the buckets holding nonzero magnitudes."""
    values, counts = _values(c.table.keys, dtype, c.table.wide), c.table.counts.clone()
    if len(counts) and int(c.table.keys[0]) == 0:
        counts[0] -= c.zeros
        # An fp32 bucket 0 also holds magnitudes below 2^-133 (subnormals; real checkpoints have
        # none): they are counted at the bucket's upper end, 2^-133, the smallest value a bin edge takes.
        values[0] = _values(torch.tensor([1]), dtype, c.table.wide)[0]
    keep = counts > 0
    return values[keep], counts[keep]


def _bf16_floor(x: torch.Tensor) -> torch.Tensor:
    """Each value rounded down to a bf16 value (a boundary of every fp32 key bucket)."""
    return (x.float().view(torch.int32) & ~((1 << LOW_BITS) - 1)).view(torch.float32).double()


def bin_edges(bucket_values: list[torch.Tensor], bins: int) -> list[float]:
    """Log-spaced edges from the smallest to past the largest nonzero magnitude, snapped to bf16 values."""
    if bins < 1:
        raise UserError(f"--bins must be at least 1, got {bins}")
    values = torch.cat(bucket_values)
    if not len(values):
        raise UserError("every targeted weight is zero: there are no magnitudes to histogram")
    lo = _bf16_floor(values.min().reshape(1))
    top = values.max().reshape(1).float().view(torch.int32) | ((1 << LOW_BITS) - 1)  # last key of its bucket ...
    hi = (top + 1).view(torch.float32).double()  # ... and the next bucket boundary: above every |w|
    inner = _bf16_floor(torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64))[1:-1]
    return torch.unique(torch.cat([lo, inner, hi])).tolist()  # snapping can merge edges where the range is narrow


def histogram(values: torch.Tensor, counts: torch.Tensor, edges: list[float]) -> list[int]:
    """Exact counts per bin: every bucket lies inside one bin (its lower value decides which)."""
    e = torch.tensor(edges, dtype=torch.float64)
    idx = torch.searchsorted(e, values, right=True) - 1
    assert not len(idx) or (int(idx.min()) >= 0 and int(idx.max()) < len(edges) - 1), "a magnitude outside the edges"
    return torch.zeros(len(edges) - 1, dtype=torch.int64).index_add_(0, idx, counts).tolist()


def quantiles(c: Census, dtype: torch.dtype) -> dict[str, float]:
    out = {}
    for q in QUANTILES:
        key, _ = select(c.table.counts, math.floor(q * (c.numel - 1)) + 1, c.table.keys)
        out[f"{q:g}"] = float(_values(torch.tensor([key]), dtype, c.table.wide)[0])
    return out


def stats(c: Census, dtype: torch.dtype, edges: list[float]) -> dict:
    counts = histogram(*_nonzero_buckets(c, dtype), edges)
    assert sum(counts) + c.zeros == c.numel, "every weight is in one bin or a zero"
    return {
        "params": c.numel,
        "zeros": c.zeros,
        "zero_fraction": c.zeros / c.numel,
        "near_zeros": c.near_zeros,
        "near_zero_fraction": c.near_zeros / c.numel,
        "quantiles": quantiles(c, dtype),
        "counts": counts,
        "fractions": [n / c.numel for n in counts],
    }


# -- the study --------------------------------------------------------------------------------------
def distributions(ckpts: list[Checkpoint], eps: float, bins: int, progress: bool = True) -> dict:
    """distributions.json's payload for one checkpoint, or two of one layout (``check_same_layout``)."""
    grouped = [groups(c, read_census(c, eps, progress)) for c in ckpts]
    edges = bin_edges([_nonzero_buckets(g["overall"]["all targets"], c.dtype)[0] for c, g in zip(ckpts, grouped)],
                      bins)
    sections = {}
    for section in ("overall", "by_type", "by_block"):
        sections[section] = {name: {c.label: stats(g[section][name], c.dtype, edges) for c, g in zip(ckpts, grouped)}
                             for name in grouped[0][section]}
    return {
        "what": "magnitudes |w| of the targeted weights",
        "checkpoints": [{"label": c.label, "path": str(c.path), "family": c.arch.family, "dtype": str(c.dtype),
                         "targets": len(c.order),
                         "quantile_resolution": "within 2^-7 relative (lower end of an fp32 key bucket)"
                         if layout(c.dtype).wide else "exact"} for c in ckpts],
        "eps": eps,
        "near_zero": NEAR_ZERO,
        "bins": {"count": len(edges) - 1, "requested": bins, "range": [edges[0], edges[-1]], "spacing": SPACING,
                 "normalisation": NORMALISATION, "edges": edges},
        "quantiles": {"levels": list(QUANTILES), "rule": QUANTILE_RULE},
        "overall": sections["overall"]["all targets"],
        "by_type": sections["by_type"],
        "by_block": sections["by_block"],
    }


def labels(payload: dict) -> list[str]:
    return [c["label"] for c in payload["checkpoints"]]


def summary_rows(payload: dict, group: str = "by_type") -> list[list[str]]:
    """Per module type (or block) and overall: params, zeros, near-zeros and median |w| of each checkpoint."""
    names = [*payload[group].items(), ("all targets", payload["overall"])]
    rows = []
    for name, per in names:
        first = next(iter(per.values()))
        row = [name, f"{first['params']:,}"]
        for key in ("zero_fraction", "near_zero_fraction"):
            row += [f"{per[label][key]:.2%}" for label in labels(payload)]
        row += [f"{per[label]['quantiles']['0.5']:.3g}" for label in labels(payload)]
        rows.append(row)
    return rows


def summary_header(payload: dict, first: str = "module") -> list[str]:
    names = labels(payload)
    tag = (lambda label: f" {label}") if len(names) > 1 else (lambda label: "")
    return [first, "params", *[f"zeros{tag(x)}" for x in names], *[f"|w|<eps{tag(x)}" for x in names],
            *[f"median |w|{tag(x)}" for x in names]]


def caption(payload: dict) -> str:
    b = payload["bins"]
    return (f"near-zero: {payload['near_zero']} with eps = {payload['eps']:g}; {b['count']} log bins over "
            f"[{b['range'][0]:.3g}, {b['range'][1]:.3g}]; histograms are fractions of each group's weights per bin "
            "(bins + exact zeros = 1)")


def markdown(payload: dict) -> list[str]:
    """distributions.json as a report section: the summary per module type and per block."""
    from .report import md_table

    series = ", ".join(f"`{c['label']}` ({c['path']}, {c['dtype']})" for c in payload["checkpoints"])
    cells = lambda first: [h.replace("|", "\\|") for h in summary_header(payload, first)]  # a bare | splits a cell
    return [f"## Weight magnitudes: {series}", "", caption(payload) + ".", "",
            *md_table(cells("module"), summary_rows(payload)),
            "Per block:", "", *md_table(cells("block"), summary_rows(payload, "by_block"))]


def draw(path, payload: dict) -> Path:
    """Small multiples, one panel per module type and one for all targets: the fraction of weights
    per log bin of |w|, one outline per checkpoint, eps as a dotted line, zeros in the legend."""
    from .plots import _new_figure, _save

    panels = [*payload["by_type"].items(), ("all targets", payload["overall"])]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = _new_figure((3.5 * ncols, 2.7 * nrows + 0.5))
    edges, eps = payload["bins"]["edges"], payload["eps"]
    for i, (title, per) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, (label, s) in enumerate(per.items()):
            name = f"{label}: " if len(per) > 1 else ""
            ax.stairs(s["fractions"], edges, color=f"C{j}", linewidth=1.3,
                      label=f"{name}zeros {s['zero_fraction']:.2%}, <eps {s['near_zero_fraction']:.2%}")
        ax.axvline(eps, color="0.35", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.get_major_locator().set_params(numticks=7)  # a tick per decade over 30 decades: unreadable, slow
        ax.xaxis.get_minor_locator().set_params(numticks=7)
        if any(f > 0 for s in per.values() for f in s["fractions"]):
            ax.set_yscale("log")
            ax.yaxis.get_major_locator().set_params(numticks=6)
            ax.yaxis.get_minor_locator().set_params(numticks=6)
        first = next(iter(per.values()))
        ax.set_title(f"{title} ({first['params']:,} weights)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=6.5, loc="upper left", handlelength=1.2)
    fig.supxlabel(f"|w| (log-spaced bins); dotted line: eps = {eps:g}", fontsize=9)
    fig.supylabel("fraction of the panel's weights per bin", fontsize=9)
    fig.suptitle(f"|w| of the targeted weights: {' vs '.join(labels(payload))}  "
                 "(legend: exact zeros, |w| < eps; bins + zeros = 1)", fontsize=10)
    return _save(fig, path)
