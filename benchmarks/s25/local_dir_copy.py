"""A checkpoint as ``hf download --local-dir`` leaves it: the files hard-linked into a directory
of their own (same bytes, same page cache, unknown to llm-prune's memo) and huggingface_hub's own
per-file records, whose etag is an LFS file's sha256, so a first contact hashes nothing.

    python benchmarks/s25/local_dir_copy.py /tmp/llm-prune-bench/synthetic-16 /tmp/dlbench/synthetic-16
"""

import hashlib
import os
import sys
from pathlib import Path

from huggingface_hub._local_folder import write_download_metadata

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in sorted(src.iterdir()):
    if not f.is_file():
        continue
    if not (dst / f.name).exists():
        os.link(f, dst / f.name)
    if f.suffix == ".safetensors":
        with open(f, "rb") as fh:
            etag = hashlib.file_digest(fh, "sha256").hexdigest()
        write_download_metadata(dst, f.name, "0" * 40, etag)
        print(f.name, etag[:12])
