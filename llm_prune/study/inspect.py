"""Where the zeros are (the paper's Fig. 1): the fraction pruned per block and module type.

    llm-prune inspect MODEL --sparsity 0.4 --scope global      what OMP at 0.4 would prune, not written
    llm-prune inspect PRUNED_DIR                                 the zeros an export holds (any method, any format)

For a sparsity, every target is streamed from the checkpoint and pruned into a scratch buffer
exactly as the exporter prunes it (a global threshold from the cached key tables, dealt out in
visiting order), and its zeros are counted: the fractions equal those in the ``sparsity.json`` of
an export at the same settings, with nothing written and memory bounded by one tensor. Without
a sparsity, the zeros already in a checkpoint are counted (compressed formats decoded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import arch_for
from ..config import PruneConfig
from ..errors import UserError
from ..magnitude import NonFinite
from ..methods import get_method, prune_
from ..reader import CheckpointReader
from ..targets import select_targets, target_order


@dataclass(frozen=True)
class Counts:
    numel: int
    zeros: int

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def inspect(path: Path, cfg: PruneConfig, *, stored: bool = False, progress: bool = True,
            allow_pickle: bool = False) -> dict:
    """Per-tensor zero counts as pruning with ``cfg`` would leave them (or, ``stored``, as the
    checkpoint holds them), grouped by block and module type; returns inspect.json's payload."""
    from ..loading.decode import DenseSource

    source = DenseSource(CheckpointReader(path, allow_pickle=allow_pickle))
    arch = arch_for(source.reader.config)
    units = source.units(arch)
    select_targets(units, source.infos, arch, cfg)
    order = target_order(units)
    if stored:
        listed = _listed_targets(path)
        order = [n for n in order if listed is None or n in listed]
    counts = _count_stored(source, order, progress) if stored else _count_pruned(source, order, cfg, arch, progress)
    return _payload(path, None if stored else cfg, counts, arch)


def _count_stored(source, order: list[str], progress: bool) -> dict[str, Counts]:
    counts = {}
    for name, w in tqdm(source.read(order, mapped=order), total=len(order), desc="counting zeros", disable=not progress,
                        leave=False):
        counts[name] = Counts(w.numel(), w.numel() - int(torch.count_nonzero(w)))
    return counts


def _count_pruned(source, order: list[str], cfg: PruneConfig, arch, progress: bool) -> dict[str, Counts]:
    from ..loading.keytables import TableCache, global_thresholds

    method = get_method(cfg.method)
    if method.needs_calibration:
        raise UserError(f"{cfg.method} chooses its masks from calibration data: prune with it, then run "
                        "`llm-prune inspect` on the export")
    method.check(cfg)
    thresholds = {}
    if cfg.scope == "global":
        thresholds, _ = global_thresholds(TableCache(source, method), order, cfg.sparsity.ratio, progress)
    counts, buf = {}, None
    for name, w in tqdm(source.read(order, mapped=order), total=len(order), desc=f"{cfg.method} {cfg.sparsity}",
                        disable=not progress, leave=False):
        if buf is None or buf.numel() < w.numel() or buf.dtype != w.dtype:
            buf = torch.empty(w.numel(), dtype=w.dtype)
        out = buf[:w.numel()].view(w.shape)
        try:
            zeros, _ = prune_(method, w, cfg.sparsity, arch.weight_in_first, threshold=thresholds.get(name), out=out)
        except NonFinite:
            raise UserError(f"{name} (in {source.file_of(name)}) has inf or nan values: the checkpoint is damaged") from None
        counts[name] = Counts(w.numel(), zeros)
    return counts


def _listed_targets(path: Path) -> set[str] | None:
    """The targets an llm-prune export names in its sparsity.json (None: any checkpoint, default targets)."""
    import json

    try:
        return set(json.loads((Path(path) / "sparsity.json").read_text())["achieved"]["tensors"])
    except (OSError, ValueError, KeyError):
        return None


def module_type(rel: str) -> str:
    """A target's name inside its block, without ``.weight``: what sparsity.json's ``by_type`` uses."""
    return rel.removesuffix(".weight")


def _payload(path: Path, cfg: PruneConfig | None, counts: dict[str, Counts], arch) -> dict:
    blocks: dict[int, dict[str, list[int]]] = {}
    types: dict[str, list[int]] = {}
    for name, c in counts.items():
        block, rel = arch.block_of(name)
        for acc in (blocks.setdefault(block, {}).setdefault(module_type(rel), [0, 0]), types.setdefault(module_type(rel), [0, 0])):
            acc[0] += c.numel
            acc[1] += c.zeros
    n, z = sum(c.numel for c in counts.values()), sum(c.zeros for c in counts.values())
    return {
        "checkpoint": str(path),
        "what": "zeros stored in the checkpoint" if cfg is None else
                f"{cfg.method} {cfg.sparsity} ({cfg.scope} scope), not written",
        "settings": cfg.to_json() if cfg is not None else None,
        "overall": {"params": n, "zeros": z, "fraction": z / n if n else 0.0},
        "by_type": {t: {"params": v[0], "fraction": v[1] / v[0]} for t, v in types.items()},
        "by_block": {str(b): {t: v[1] / v[0] for t, v in per.items()} for b, per in sorted(blocks.items())},
        "tensors": {name: c.fraction for name, c in counts.items()},
    }


# Module types are shown attention first, then the MLP, each in the order the forward uses them.
_ORDER = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv", "c_attn", "o_proj", "out_proj",
          "attention.output", "c_proj", "gate_proj", "up_proj", "fc1", "intermediate", "c_fc", "down_proj", "fc2",
          "output")


def type_order(kind: str) -> tuple[int, str]:
    rank = next((i for i, token in enumerate(_ORDER) if token in kind), len(_ORDER))
    return rank, kind


def grid(payload: dict) -> tuple[list[str], list[str], list[list[float]]]:
    """(block labels, module types, fractions [block][type]) for the table and the heatmap."""
    types = sorted(payload["by_type"], key=type_order)
    blocks = list(payload["by_block"])
    return blocks, types, [[payload["by_block"][b].get(t, float("nan")) for t in types] for b in blocks]


def markdown(payload: dict) -> list[str]:
    """inspect.json as a report section: fraction pruned per block and module type."""
    from .report import md_table

    blocks, types, values = grid(payload)
    rows = [[b, *[f"{v:.3f}" for v in row]] for b, row in zip(blocks, values)]
    rows.append(["**all**", *[f"**{payload['by_type'][t]['fraction']:.3f}**" for t in types]])
    o = payload["overall"]
    return [f"## Where the zeros are: {payload['what']}", "", f"Checkpoint `{payload['checkpoint']}`: "
            f"{o['fraction']:.4f} of {o['params']:,} targeted weights are zero.", "",
            *md_table(["block", *types], rows)]
