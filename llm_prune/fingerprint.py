"""Content hashes of checkpoint files, computed once.

``sparsity.json`` records the sha256 of every source weight file, and caches (global
thresholds, dense baselines) are keyed by them. Hashing 13 GB takes ~20 s on this machine, so:

* files in the Hugging Face cache are symlinks to blobs named by their sha256 (for LFS files):
  that name is the hash, free;
* other files are hashed once and remembered in ``<cache>/hashes.json`` under
  (real path, size, mtime_ns), so a sweep of runs over one checkpoint hashes it once.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from pathlib import Path

from .paths import cache_dir, atomic_write_text

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    known = known_sha256(path)
    if known is not None:
        return known
    real, key = _memo_key(path)
    digest = sha256_of(real)
    memo_path = cache_dir() / "hashes.json"
    memo = {**_load(memo_path), key: digest}  # re-read: another run may have added entries
    atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    return digest


def known_sha256(path: Path) -> str | None:
    """The file's sha256 when it costs nothing (a hub blob's name, or remembered), else None."""
    real, key = _memo_key(path)
    if _SHA256.match(real.name) and real.parent.name == "blobs":
        return real.name
    return _load(cache_dir() / "hashes.json").get(key)


_CHUNK = 64 << 20


def sha256_of(path: Path) -> str:
    """sha256 over a read-only mapping: no copy into Python buffers (faster than
    ``hashlib.file_digest`` here). Each chunk's pages leave the mapping once hashed (they stay in
    the page cache): a mapped page counts in the process's resident memory, and a multi-GB shard
    hashed whole would count whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for at in range(0, size, _CHUNK):
                    h.update(view[at:at + _CHUNK])  # releases the GIL for the chunk
                    if hasattr(m, "madvise"):
                        m.madvise(mmap.MADV_DONTNEED, at, min(_CHUNK, size - at))
            finally:
                view.release()
    return h.hexdigest()


def _memo_key(path: Path) -> tuple[Path, str]:
    real = Path(os.path.realpath(path))
    st = real.stat()
    return real, f"{real}|{st.st_size}|{st.st_mtime_ns}"


def checkpoint_fingerprint(file_hashes: dict[str, str]) -> str:
    """One hash for a whole checkpoint: the sha256 of its sorted (file name, file hash) pairs."""
    text = "\n".join(f"{name} {h}" for name, h in sorted(file_hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
