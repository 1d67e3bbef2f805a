"""Where llm-prune keeps its cache, and small file helpers that never leave half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """``$LLM_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/llm-prune``, else ``~/.cache/llm-prune``."""
    root = os.environ.get("LLM_PRUNE_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm-prune")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one.

    No fsync: the rename is what makes it atomic for other processes and for a killed run (the
    page cache survives the process). On ext4 (auto_da_alloc) a rename over an existing file
    waits for data written before it, so this is for files written once or rarely, not once per
    block of a run (``ShardWriter`` appends to a log instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path, ".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    mask = os.umask(0)  # read it: the only portable way is to set it and set it back
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # at import, before any thread could create files meanwhile


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file at ``path``, written whole or not at all (as
    ``atomic_write_text``): the caches' and fine-tuning's small tensor files."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path, ".tmp")
    os.close(fd)  # save_file writes by name
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_file(final: Path, suffix: str) -> tuple[int, str]:
    """A new temporary file beside ``final`` (to be renamed over it), with the permissions a plain
    ``open`` would give it: ``mkstemp`` makes files only their owner can read, and a renamed
    file keeps them."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a finished directory into place. An existing ``final`` (only there when the caller
    allowed replacing it) is swapped out first and dropped after, so readers see the old or the
    new directory, never a mix."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def check_apart(out: Path, src: Path) -> None:
    """Refuse an output that is the source, lies inside it, or holds it: a run must never write
    into, over or around what it reads."""
    out, src = Path(out).resolve(), Path(src).resolve()
    if out == src or out.is_relative_to(src):
        raise UserError(f"the output {out} is inside the checkpoint it is made from ({src}): choose another --out")
    if src.is_relative_to(out):
        raise UserError(f"the output {out} would contain the checkpoint it is made from ({src}): choose another --out")


def make_dir(path: Path) -> None:
    """``mkdir -p``, with a read-only or vanished location as one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror or e} (is the location read-only, or gone?)") from None
