"""``llm-prune verify PATH``: an export checked against its own sparsity.json, file by file and tensor by tensor.

    files     every file's digest against the manifest (``output.files``); none missing, none added
    index     every shard the index names is there, every tensor it places is in its shard, and
              the total size it states is the shards' (headers validated as for any read)
    tensors   every target's zeros recounted (compressed formats decoded) against the stated
              sparsity per tensor and overall, and the N:M pattern checked group by group
    formats   every compressed tensor decoded and encoded again to the same bytes
    model     the config builds a model (on the meta device) and every parameter it needs is in
              the checkpoint with its shape, under the names transformers loads it by
    source    when the source checkpoint is present (``--source`` or the path recorded), its files
              still hash as recorded

Nothing is signed: a changed byte anywhere is found because everything is hashed or recounted.
Each problem is one line; the exit code is non-zero when there is any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError

MANIFEST = "sparsity.json"


@dataclass
class Verdict:
    path: Path
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok", or what it covered
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"path": str(self.path), "ok": self.ok, "checks": self.checks, "problems": self.problems}


def verify(path: Path, source: Path | None = None, progress: bool = True) -> Verdict:
    path = Path(path)
    v = Verdict(path)
    report = _manifest(path)
    _files(path, report, v)
    reader = _index(path, v)
    if reader is not None:
        _tensors(reader, report, v, progress)
        _model(path, reader, v)
    _source(report, source, v, progress)
    return v


def _manifest(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        report = json.loads((path / MANIFEST).read_text())
    except OSError:
        raise UserError(f"{path} has no {MANIFEST}: verify checks llm-prune exports against it") from None
    except ValueError as e:
        raise UserError(f"{path / MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(report, dict) or report.get("tool", {}).get("name") != "llm-prune":
        raise UserError(f"{path / MANIFEST} was not written by llm-prune")
    return report


def _files(path: Path, report: dict, v: Verdict) -> None:
    listed = (report.get("output") or {}).get("files")
    if not isinstance(listed, dict):
        v.problems.append(f"{MANIFEST} lists no output files (written by an llm-prune older than its manifest?)")
        return
    present = {f.name for f in path.iterdir() if f.is_file() and f.name != MANIFEST}
    for name in sorted(set(listed) - present):
        v.problems.append(f"{name} is missing (the manifest lists it)")
    for name in sorted(present - set(listed)):
        v.problems.append(f"{name} is not in the manifest (added after the export?)")
    for name in sorted(set(listed) & present):
        _check_digest(path / name, listed[name], v, f"{name} does not hash as recorded: its bytes changed")
    v.checks["files"] = f"{len(listed)} files hashed"


def _check_digest(path: Path, digest, v: Verdict, mismatch: str) -> None:
    """``mismatch`` is a problem unless ``path`` hashes to the recorded ``digest``; a digest
    llm-prune cannot check is one of its own. Verify has the cores to itself: BLAKE3 uses all."""
    from .fingerprint import matches

    try:
        same = matches(path, str(digest), threads=-1)
    except ValueError as e:
        v.problems.append(f"{path.name}: {e} in {MANIFEST}")
        return
    if not same:
        v.problems.append(mismatch)


def _index(path: Path, v: Verdict):
    from .reader import SAFE_INDEX, SPARSE_INDEX, CheckpointReader

    try:
        reader = CheckpointReader(path)
    except UserError as e:
        v.problems.append(str(e))
        return None
    index = next((path / i for i in (SAFE_INDEX, SPARSE_INDEX) if (path / i).is_file()), None)
    if index is not None:
        stated = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        actual = sum((path / f).stat().st_size for f in reader.files)
        if stated is not None and stated != actual:
            v.problems.append(f"{index.name} states {stated} bytes of shards, the shards hold {actual}")
    v.checks["index"] = f"{len(reader.files)} shards, {len(reader.infos)} stored tensors, headers valid"
    return reader


def _tensors(reader, report: dict, v: Verdict, progress: bool) -> None:
    """Zeros per target recounted; N:M groups; compressed tensors decoded and re-encoded."""
    from .arch import arch_for
    from .kernels import formats
    from .loading.decode import DenseSource
    from .magnitude import is_nm

    stated = (report.get("achieved") or {}).get("tensors") or {}
    source = DenseSource(reader)
    missing = [n for n in stated if n not in source.infos]
    for name in missing[:3]:
        v.problems.append(f"{name} is a target in {MANIFEST} but not in the checkpoint")
    names = [n for n in stated if n in source.infos]
    pattern = report.get("pattern")
    n, m = (int(x) for x in pattern.split(":")) if pattern else (None, None)
    in_first = arch_for(reader.config).weight_in_first  # Conv1D: groups run along dim 0
    fmts = report.get("formats") or {}
    zeros_all = numel_all = reencoded = 0
    for name in tqdm(names, desc="verifying tensors", disable=not progress, leave=False):
        try:
            (_, w), = source.read([name], mapped=[name])
        except UserError as e:  # a damaged encoding: named, and the others still checked
            v.problems.append(f"{name} cannot be decoded: {e}")
            continue
        zeros = w.numel() - int(torch.count_nonzero(w))
        zeros_all, numel_all = zeros_all + zeros, numel_all + w.numel()
        if zeros / max(w.numel(), 1) != stated[name]:
            v.problems.append(f"{name} has sparsity {zeros / w.numel():.6f}, {MANIFEST} says {stated[name]:.6f}")
        if n is not None:
            groups = w.t() if in_first else w
            if not is_nm(groups != 0, n, m):
                v.problems.append(f"{name} breaks the {pattern} pattern (a group of {m} keeps more than {n})")
        if fmts.get(name, "dense") != "dense":
            reencoded += 1
            _reencode(reader, name, w, fmts[name], v, formats)
    targeted = (report.get("achieved") or {}).get("targeted")
    if numel_all and targeted is not None and abs(zeros_all / numel_all - targeted) > 1e-12:
        v.problems.append(f"the targets hold {zeros_all / numel_all:.6f} zeros, {MANIFEST} says {targeted:.6f}")
    v.checks["tensors"] = (f"{len(names)} targets recounted" + (f", {pattern} groups checked" if pattern else "")
                           + (f", {reencoded} compressed tensors re-encoded" if reencoded else ""))


def _reencode(reader, name: str, dense: torch.Tensor, fmt: str, v: Verdict, formats) -> None:
    """The stored parts of ``name`` equal what encoding the decoded tensor gives, byte for byte."""
    stored_names = formats.stored_names(name, fmt)
    stored = reader.read(stored_names)
    again, _ = formats.encode(name, dense, fmt)
    for key in stored_names:
        a, b = stored[key], again[key]
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
        if not same:
            v.problems.append(f"{key} is not the {fmt} encoding of the tensor it decodes to: the file is damaged")
            return


def _model(path: Path, reader, v: Verdict) -> None:
    """The config builds the model, and every parameter it needs is stored with its shape."""
    from transformers import AutoConfig

    from .loading import hf
    from .loading.decode import DenseSource

    source = DenseSource(reader)
    try:
        config = AutoConfig.from_pretrained(path)
        model = hf.empty_model(hf.model_class(config), config, None)
    except (OSError, ValueError, KeyError) as e:
        v.problems.append(f"config.json does not build a model ({type(e).__name__}: {str(e).splitlines()[0]})")
        return
    names = hf.model_names(model, list(source.infos))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for stored, key in names.items():
        if tuple(source.infos[stored].shape) != shapes[key]:
            v.problems.append(f"{stored} has shape {tuple(source.infos[stored].shape)}, the model's {key} needs "
                              f"{shapes[key]}")
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    absent = sorted(k for k, _ in model.named_parameters() if k not in set(names.values()) and k not in tied)
    if absent:
        v.problems.append(f"the checkpoint lacks {len(absent)} weight(s) the model needs (first: {absent[0]})")
    v.checks["model"] = f"{type(model).__name__}: {len(names)} tensors placed"


def _source(report: dict, source: Path | None, v: Verdict, progress: bool) -> None:
    recorded = report.get("source") or {}
    where = Path(source) if source is not None else Path(recorded.get("path", ""))
    files = recorded.get("files") or {}
    if source is None and not (where.is_dir() and files):
        v.checks["source"] = "not present (pass --source DIR to check it)"
        return
    if not where.is_dir():
        v.problems.append(f"the source {where} is not a directory")
        return
    for name, digest in tqdm(sorted(files.items()), desc="hashing the source", disable=not progress, leave=False):
        f = where / name
        if not f.is_file():
            v.problems.append(f"the source lacks {name}")
        else:
            _check_digest(f, digest, v, f"the source's {name} does not hash as recorded: it changed since the export")
    v.checks["source"] = f"{len(files)} source files hashed in {where}"
