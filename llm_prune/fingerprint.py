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
import os
import re
from pathlib import Path

from .paths import cache_dir, atomic_write_text

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def file_sha256(path: Path) -> str:
    real = Path(os.path.realpath(path))
    if _SHA256.match(real.name) and real.parent.name == "blobs":
        return real.name
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir() / "hashes.json"
    memo = _load(memo_path)
    if key not in memo:
        with open(real, "rb") as f:
            memo[key] = hashlib.file_digest(f, "sha256").hexdigest()
        memo = {**_load(memo_path), key: memo[key]}  # re-read: another run may have added entries
        atomic_write_text(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    return memo[key]


def checkpoint_fingerprint(file_hashes: dict[str, str]) -> str:
    """One hash for a whole checkpoint: the sha256 of its sorted (file name, file hash) pairs."""
    text = "\n".join(f"{name} {h}" for name, h in sorted(file_hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
