"""Keep-mask similarity of pruned models (the paper's Fig. 10): cosine and IoU per tensor, block and overall.

    llm-prune masks compare OMP_DIR WANDA_DIR [SPARSEGPT_DIR ...] [--labels omp,wanda,sparsegpt]

An input is either

* a **checkpoint**: a directory with a ``config.json`` (any llm-prune export, dense, bitmask or
  packed24, or any Hugging Face checkpoint). A target's keep-mask is ``weight != 0`` taken
  bitwise: an element is kept when its bit pattern is non-zero, so -0.0 counts as kept, as in
  the sparse formats (pruning writes +0.0). Compressed formats are decoded first. The targets
  are those its ``sparsity.json`` lists (``achieved.tensors``) when there is one, else the
  default targets (every 2-D ``*.weight`` inside the blocks), chosen as the pruner chooses them;
* a **mask file** written by ``save_masks`` or ``MaskWriter`` (``--save-mask``): the
  ``.safetensors`` file itself, or a directory that holds ``masks.safetensors`` and no
  ``config.json``. A directory with a model is read as a checkpoint even when a
  ``masks.safetensors`` lies beside it: name the file to compare that.

Every input must name the same targets with the same shapes. Each pair of inputs (A-B, A-C,
B-C, ...) gets exact counts per tensor (``MaskCounts``); blocks and the whole model are compared
from the summed counts, never from averaged ratios. Memory: one tensor's mask per input at a
time, whatever the model's size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .similarity import MaskCounts, MaskReader, aggregate, block_of, total

RULE = ("cosine of 0/1 masks = |a∧b|/sqrt(|a|·|b|) (the paper's measure); IoU = |a∧b|/|a∨b|; "
        "blocks and overall from summed counts")
KEEP_RULE = "kept = bitwise non-zero weight (-0.0 counts as kept), compressed formats decoded"
MASK_FILE = "masks.safetensors"
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- sources ------------------------------------------------------------------------------------
class CheckpointMasks:
    """A checkpoint's targets as keep-masks: ``shapes`` from the headers, ``keep(name)`` reads one."""

    kind = "checkpoint"

    def __init__(self, path: Path):
        from ..loading.decode import DenseSource
        from ..reader import CheckpointReader

        self.path = path
        self.source = DenseSource(CheckpointReader(path))
        report = _read_json(path / "sparsity.json")
        listed = (report.get("achieved") or {}).get("tensors")
        names = list(listed) if isinstance(listed, dict) else self._default_targets()
        missing = [n for n in names if n not in self.source.infos]
        if missing:
            raise UserError(f"{path}/sparsity.json lists {missing[0]}, which the checkpoint does not hold: "
                            "the export is incomplete")
        self.shapes = {n: tuple(self.source.infos[n].shape) for n in names}
        self.info = {"format": report.get("format"), "method": report.get("method"),
                     "sparsity": report.get("target_sparsity"), "pattern": report.get("pattern"),
                     "scope": report.get("scope")}

    def _default_targets(self) -> list[str]:
        from ..arch import arch_for
        from ..config import PruneConfig, Sparsity
        from ..targets import select_targets, target_order

        arch = arch_for(self.source.reader.config)
        units = self.source.units(arch)
        select_targets(units, self.source.infos, arch, PruneConfig(sparsity=Sparsity(0.0)))
        return target_order(units)

    def keep(self, name: str) -> torch.Tensor:
        (_, w), = self.source.read([name], mapped=[name])
        bits = w.view(_INT[w.element_size()]) if w.is_floating_point() else w
        return bits != 0

    def close(self) -> None:
        pass


class FileMasks:
    """A mask file's masks: ``shapes`` from its header, ``keep(name)`` unpacks one."""

    kind = "mask file"

    def __init__(self, path: Path):
        try:
            self.reader = MaskReader(path)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.path = path
        self.shapes = dict(self.reader.shapes)
        meta = self.reader.metadata
        self.info = {"format": None, **{key: meta.get(key) for key in ("method", "sparsity", "pattern", "scope")}}

    def keep(self, name: str) -> torch.Tensor:
        try:
            return self.reader.read(name)
        except ValueError as e:
            raise UserError(str(e)) from None

    def close(self) -> None:
        self.reader.close()


def open_masks(path: str | Path) -> CheckpointMasks | FileMasks:
    """The source an input path names (see the module docstring); one line when it names none."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return CheckpointMasks(path)
        if (path / MASK_FILE).is_file():
            return FileMasks(path / MASK_FILE)
        raise UserError(f"{path} holds neither a checkpoint (config.json) nor a {MASK_FILE}")
    if path.is_file():
        return FileMasks(path)
    raise UserError(f"no checkpoint or mask file at {path}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- labels and checks ----------------------------------------------------------------------------
def default_labels(paths: list[str | Path]) -> list[str]:
    """Each input's directory or file name (a mask file inside a directory: the directory's),
    made unique with -2, -3, ... when two inputs share a name."""
    names = []
    for p in paths:
        p = Path(os.path.abspath(p))  # "." and ".." get their directory's name; links stay as given
        names.append(p.parent.name if p.name == MASK_FILE and p.parent.name else p.name.removesuffix(".safetensors"))
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if names.count(name) == 1 else f"{name}-{seen[name]}")
    return labels


def check_labels(labels: list[str], n: int) -> list[str]:
    labels = [label.strip() for label in labels]
    if len(labels) != n:
        raise UserError(f"--labels gives {len(labels)} label(s) for {n} inputs")
    if not all(labels) or len(set(labels)) != n:
        raise UserError(f"--labels must be {n} distinct non-empty names, got {','.join(labels)}")
    return labels


class _Renamed:
    """A source seen under another input's tensor names (a base-model prefix added or dropped)."""

    def __init__(self, src, names: dict[str, str]):
        self.src, self.names = src, names
        self.kind, self.path, self.info = src.kind, src.path, src.info
        self.shapes = {ours: src.shapes[theirs] for ours, theirs in names.items()}

    def keep(self, name: str) -> torch.Tensor:
        return self.src.keep(self.names[name])

    def close(self) -> None:
        self.src.close()


def align(first: dict, src):
    """``src`` under ``first``'s names when they differ only by one leading component on one side
    (``encoder.layer.0...`` in a BertModel export, ``bert.encoder.layer.0...`` in a classifier's):
    the same tensors, saved from a bare model and from a model with a head."""
    theirs = set(src.shapes)
    if set(first) == theirs:
        return src
    for mapping in (_without_prefix(first), _with_prefix(first, theirs)):
        if mapping is not None and set(mapping.values()) == theirs:
            return _Renamed(src, mapping)
    return src


def _without_prefix(names) -> dict | None:
    if len({n.split(".", 1)[0] for n in names}) != 1 or any("." not in n for n in names):
        return None
    return {n: n.split(".", 1)[1] for n in names}


def _with_prefix(names, theirs: set) -> dict | None:
    prefixes = {n.split(".", 1)[0] for n in theirs}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    return {n: f"{prefix}.{n}" for n in names}


def check_same_targets(sources: list, labels: list[str]) -> None:
    """One line naming the first tensor that an input lacks, or whose shape differs, against the first input."""
    first = sources[0].shapes
    for src, label in zip(sources[1:], labels[1:]):
        for a, b, sa, sb in ((labels[0], label, first, src.shapes), (label, labels[0], src.shapes, first)):
            only = [n for n in sa if n not in sb]
            if only:
                raise UserError(f"{a} and {b} do not mask the same tensors: {only[0]} is in {a} but not in {b}"
                                f"{f' ({len(only) - 1} more)' if len(only) > 1 else ''}")
        for name, shape in first.items():
            if src.shapes[name] != shape:
                raise UserError(f"{name} has shape {shape} in {labels[0]} but {src.shapes[name]} in {label}")


# -- comparing ------------------------------------------------------------------------------------
def compare_sources(paths: list[str | Path], labels: list[str] | None = None, progress: bool = True) -> dict:
    """Keep-mask similarity of every pair of inputs; returns masks.json's payload.

    ``payload["pairs"][k]`` holds ``a``, ``b`` (labels), ``overall``, ``blocks`` ({block: ...})
    and ``tensors`` ({name: ...}), each value the counts (n, a, b, both, either) with their
    ``cosine`` and ``iou``.
    """
    if len(paths) < 2:
        raise UserError(f"comparing masks needs at least two inputs, got {len(paths)}")
    labels = check_labels(labels, len(paths)) if labels is not None else default_labels(paths)
    sources = []
    try:
        for p in paths:
            src = open_masks(p)
            sources.append(src if not sources else align(sources[0].shapes, src))
        check_same_targets(sources, labels)
        order = sorted(sources[0].shapes, key=_visit_key)
        counts, kept = _count(sources, order, progress)
    finally:
        for src in sources:
            src.close()
    return _payload(sources, labels, order, counts, kept)


def _count(sources: list, order: list[str], progress: bool) -> tuple[dict, list[int]]:
    pairs = list(itertools.combinations(range(len(sources)), 2))
    counts: dict[tuple[int, int], dict[str, MaskCounts]] = {pair: {} for pair in pairs}
    kept = [0] * len(sources)
    for name in tqdm(order, desc="comparing masks", disable=not progress, leave=False):
        masks = [src.keep(name) for src in sources]  # one tensor per input at a time
        for i, m in enumerate(masks):
            kept[i] += int(torch.count_nonzero(m))
        for i, j in pairs:
            counts[(i, j)][name] = MaskCounts.of(masks[i], masks[j])
    return counts, kept


def _visit_key(name: str) -> tuple:
    """Blocks in index order, names sorted within a block, tensors outside blocks last."""
    prefix = block_of(name)
    return (0, prefix.rsplit(".", 1)[0], int(prefix.rsplit(".", 1)[1]), name) if prefix != "other" else (1, "", 0, name)


def block_labels(names: list[str]) -> dict[str, str]:
    """Each name's block: its index ("3") when the targets live in one stack of blocks, else the
    whole prefix ("encoder.layers.3"), so that two stacks never share a label. The block is read
    from the name (``similarity.block_of``): a mask file carries no config, and the rule agrees
    with every family entry of ``llm_prune.arch``."""
    prefixes = {n: block_of(n) for n in names}
    stems = {re.sub(r"\.\d+$", "", p) for p in prefixes.values() if p != "other"}
    if len(stems) > 1:
        return prefixes
    return {n: p.rsplit(".", 1)[1] if p != "other" else p for n, p in prefixes.items()}


def as_json(c: MaskCounts) -> dict:
    return {"cosine": c.cosine, "iou": c.iou, "n": c.n, "a": c.a, "b": c.b, "both": c.both, "either": c.either}


def _payload(sources: list, labels: list[str], order: list[str], counts: dict, kept: list[int]) -> dict:
    shapes = sources[0].shapes
    params = sum(math.prod(shapes[n]) for n in order)
    blocks = block_labels(order)
    pairs = []
    for (i, j), per_tensor in counts.items():
        pairs.append({"a": labels[i], "b": labels[j], "overall": as_json(total(per_tensor)),
                      "blocks": {b: as_json(c) for b, c in aggregate(per_tensor, blocks.__getitem__).items()},
                      "tensors": {n: as_json(c) for n, c in per_tensor.items()}})
    inputs = [{"label": label, "path": str(src.path), "kind": src.kind, **src.info, "kept": k,
               "achieved": 1 - k / params if params else 0.0}
              for src, label, k in zip(sources, labels, kept)]
    return {"what": "keep-mask similarity", "rule": RULE, "keep": KEEP_RULE, "inputs": inputs,
            "tensors": len(order), "params": params, "blocks": list(dict.fromkeys(blocks.values())), "pairs": pairs}


# -- presenting -----------------------------------------------------------------------------------
def pair_name(pair: dict) -> str:
    return f"{pair['a']} vs {pair['b']}"


def describe(inp: dict) -> str:
    """'omp 0.5 (layer scope), dense checkpoint' from what an input says about itself."""
    how = " ".join(str(inp[k]) for k in ("method", "pattern") if inp.get(k))
    if inp.get("sparsity") is not None and not inp.get("pattern"):
        how = f"{how} {inp['sparsity']}".strip()
    if inp.get("scope"):
        how += f" ({inp['scope']} scope)"
    kind = f"{inp['format']} {inp['kind']}" if inp.get("format") else inp["kind"]
    return f"{how}, {kind}" if how else kind


def per_block_series(payload: dict) -> dict[str, list[float]]:
    """Cosine similarity per block (in ``payload['blocks']`` order), one series per pair."""
    return {pair_name(p): [p["blocks"][b]["cosine"] for b in payload["blocks"]] for p in payload["pairs"]}


def markdown(payload: dict) -> list[str]:
    """masks.json as a report section: the inputs, overall similarity per pair, then per block."""
    from .report import md_table

    inputs = [[f"`{i['label']}`", describe(i), f"{i['achieved']:.4f}", f"`{i['path']}`"] for i in payload["inputs"]]
    overall = [[pair_name(p), f"{p['overall']['cosine']:.4f}", f"{p['overall']['iou']:.4f}"] for p in payload["pairs"]]
    series = per_block_series(payload)
    blocks = [[b, *[f"{s[k]:.4f}" for s in series.values()]] for k, b in enumerate(payload["blocks"])]
    return ["## Mask similarity", "", f"{payload['tensors']} targets, {payload['params']:,} weights. "
            f"Measure: {payload['rule']}. Masks: {payload['keep']}.", "",
            *md_table(["input", "what", "sparsity", "path"], inputs),
            *md_table(["pair", "cosine", "IoU"], overall),
            "Cosine similarity per block:", "",
            *md_table(["block", *series], blocks)]
