"""Content digests of checkpoint files, computed once.

``sparsity.json`` records a digest of every source weight file and of every file an export
writes, and caches (global thresholds, dense baselines) are keyed by them. A digest names its
algorithm, as OCI's do: ``"blake3:<hex>"`` or ``"sha256:<hex>"``.

* Files in the Hugging Face cache are symlinks to blobs named by their sha256 (for LFS files):
  that name is the digest (``sha256:<name>``), free, and the one the hub shows. Files that
  ``hf download --local-dir`` wrote have their sha256 in its record beside them: free too.
* Every file llm-prune hashes itself gets BLAKE3, the fastest cryptographic hash with a
  well-kept Python binding: a run hashes every byte it writes and, the first time it meets a
  checkpoint, every byte it reads, on cores the pruning keeps busy (BENCHMARKS.md, session 20).
* Other files are hashed once and remembered in ``<cache>/hashes.json`` under (real path,
  size, mtime_ns), so a sweep of runs over one checkpoint hashes it once; that once is while
  the run reads the file anyway (``SourceHasher``): the hash follows the reads, so its bytes
  come from the page cache instead of a second read of the disk.
* A digest without a prefix is a sha256: manifests and memo entries written before BLAKE3.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import re
import threading
from pathlib import Path

import blake3

from .paths import cache_dir, atomic_write_text

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
ALGORITHM = "blake3"  # what llm-prune computes; the others are only checked
_HASHES = {"blake3": lambda threads: blake3.blake3(max_threads=threads),
           "sha256": lambda threads: hashlib.sha256()}


def split(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest; a bare hex string is a sha256 (written before BLAKE3)."""
    algorithm, sep, hexdigest = digest.rpartition(":")
    return (algorithm, hexdigest) if sep else ("sha256", digest)


def named(digest: str) -> str:
    """The digest with its algorithm's name in front (bare sha256 digests gain theirs)."""
    return "{}:{}".format(*split(digest))


def file_digest(path: Path) -> str:
    known = known_digest(path)
    if known is not None:
        return known
    real, key = _memo_key(path)
    digest = digest_of(real)
    _remember({key: digest})
    return digest


def _remember(digests: dict[str, str]) -> None:
    memo_path = cache_dir() / "hashes.json"
    # Re-read: another run may have added entries. Entries of files that are gone or changed
    # since are dropped, so the memo holds what exists (every load parses it).
    memo = {k: v for k, v in _load(memo_path).items() if _current(k)}
    atomic_write_text(memo_path, json.dumps({**memo, **digests}, indent=0, sort_keys=True))


def _current(key: str) -> bool:
    """Whether a memo key (real path|size|mtime_ns) still describes its file."""
    try:
        return _memo_key(Path(key.rsplit("|", 2)[0]))[1] == key
    except OSError:
        return False


def known_digest(path: Path) -> str | None:
    """The file's digest when it costs nothing (a hub blob's name, a hub download's record, or
    remembered), else None."""
    real, key = _memo_key(path)
    if _SHA256.match(real.name) and real.parent.name == "blobs":
        return f"sha256:{real.name}"
    known = _load(cache_dir() / "hashes.json").get(key)  # parsed once per process: before any file read
    if known is not None:
        return named(known)
    downloaded = _local_dir_sha256(real)
    return None if downloaded is None else f"sha256:{downloaded}"


def _local_dir_sha256(real: Path, levels: int = 4) -> str | None:
    """The sha256 that ``hf download --local-dir`` recorded for a file, if it still holds.

    huggingface_hub keeps ``<local dir>/.cache/huggingface/download/<repo path>.metadata`` (three
    lines: commit, etag, timestamp); an LFS file's etag is its sha256 (a 40-hex git blob id is
    not, and is ignored). Trusted as huggingface_hub trusts it, while the file is no newer than
    the record (1 s of slack). Read here rather than through huggingface_hub's reader, which
    takes a lock file and deletes records it cannot parse: a source is never written.
    """
    for up in range(min(levels, len(real.parents) - 1)):
        local_dir = real.parents[up]
        record = local_dir.joinpath(".cache", "huggingface", "download", *real.parts[-1 - up:]).with_name(
            real.name + ".metadata")
        try:
            _, etag, stamp = record.read_text().splitlines()[:3]
            fresh = real.stat().st_mtime - 1 <= float(stamp)
        except (OSError, ValueError):
            continue
        return etag.strip() if fresh and _SHA256.match(etag.strip()) else None
    return None


_CHUNK = 64 << 20


def digest_of(path: Path, algorithm: str = ALGORITHM, threads: int = 1) -> str:
    """The file's digest, hashed over a read-only mapping: no copy into Python buffers (faster
    than ``hashlib.file_digest`` here). Each chunk's pages leave the mapping once hashed (they
    stay in the page cache): a mapped page counts in the process's resident memory, and a
    multi-GB shard hashed whole would count whole. ``threads`` > 1 (or -1, all cores) lets
    BLAKE3 hash each chunk on several cores, for callers with nothing else to do."""
    prefix = _Prefix(path, algorithm, threads)
    try:
        return prefix.finish()
    finally:
        prefix.close()  # on an error too


class Hasher:
    """``digest_of`` a file whose bytes are given in memory, in order, in pieces."""

    def __init__(self, algorithm: str = ALGORITHM):
        self.algorithm, self._h = algorithm, _HASHES[algorithm](1)

    def update(self, data) -> None:
        self._h.update(data)  # blake3 releases the GIL for large pieces

    def digest(self) -> str:
        return f"{self.algorithm}:{self._h.hexdigest()}"


def matches(path: Path, digest: str, threads: int = 1) -> bool:
    """Whether ``path`` hashes to ``digest`` under the digest's own algorithm (ValueError when
    llm-prune does not know it)."""
    algorithm, _ = split(digest)
    if algorithm not in _HASHES:
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    return digest_of(path, algorithm, threads) == named(digest)


class SourceHasher:
    """The digests of a checkpoint's files, computed from the byte ranges the run has just read.

    A first run over a checkpoint needs its hashes (``sparsity.json``, caches keyed by content);
    hashing the files on their own would read every byte a second time. Instead the run tells
    the hasher which ranges it has read (``read(file, offset, nbytes)``) and a thread hashes each
    file's contiguous prefix of read ranges as it grows: those pages were just read, so the hash
    costs CPU but no disk. Ranges read out of file order wait until the gap before them is read;
    ``digests()`` hashes whatever no one read (a resumed run's finished units, holes, tensors
    never touched), so the digests always equal ``digest_of`` the whole file. Files whose
    hash is already known (a hub blob's name, remembered) are not hashed at all.
    """

    def __init__(self, root: Path, files: list[str], headers: dict[str, int] | None = None):
        self.root = Path(root)
        self._known = {f: known_digest(self.root / f) for f in files}
        self._files = {f: _Prefix(self.root / f) for f, d in self._known.items() if d is None}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        self._error: BaseException | None = None
        if self._files:
            self._thread = threading.Thread(target=self._follow, name="llm-prune-hash", daemon=True)
            self._thread.start()
            for f, end in (headers or {}).items():  # the headers were read when the files were validated
                self.read(f, 0, end)

    def read(self, file: str, offset: int, nbytes: int) -> None:
        """The run has read (or is reading) ``nbytes`` at ``offset`` of ``file``."""
        if file in self._files and nbytes > 0:
            self._queue.put((file, offset, offset + nbytes))

    def read_tensors(self, infos) -> None:
        """The run has read these tensors (``reader.TensorInfo``: file, offset, nbytes); pickled
        ones (offset -1) are hashed at the end."""
        for info in infos:
            if info.offset >= 0:
                self.read(info.file, info.offset, info.nbytes)

    def digests(self) -> dict[str, str]:
        """Every file's digest (finishing what no one read), remembered for later runs."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            fresh = {f: p.finish() for f, p in self._files.items()}
            _remember({_memo_key(self.root / f)[1]: d for f, d in fresh.items()})
            self._known.update(fresh)
        return dict(self._known)

    def _follow(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                file, begin, end = item
                self._files[file].add(begin, end)
        except BaseException as e:  # noqa: BLE001 - raised again by digests()
            self._error = e
            while self._queue.get() is not None:
                pass

    def __enter__(self) -> "SourceHasher":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """On an error, stop hashing and keep nothing; otherwise ``digests()`` is still to come."""
        if exc_type is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            for p in self._files.values():
                p.close()


class _Prefix:
    """One file's hash state: hashed up to ``pos``; ``pending`` holds ranges read beyond it."""

    def __init__(self, path: Path, algorithm: str = ALGORITHM, threads: int = 1):
        self.path, self.algorithm, self.pos, self.pending = path, algorithm, 0, []
        self.h = _HASHES[algorithm](threads)
        self._f = open(path, "rb")
        self.size = os.fstat(self._f.fileno()).st_size
        self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None

    def add(self, begin: int, end: int) -> None:
        self.pending.append((begin, end))
        self.pending.sort()
        while self.pending and self.pending[0][0] <= self.pos:
            _, end = self.pending.pop(0)
            self._advance(min(end, self.size))

    def _advance(self, to: int) -> None:
        view = memoryview(self._map) if self._map is not None else None
        try:
            for at in range(self.pos, to, _CHUNK):
                stop = min(at + _CHUNK, to)
                self.h.update(view[at:stop])  # releases the GIL for the chunk
                # let the pages leave this mapping (they stay in the page cache): see digest_of
                page = at - at % mmap.PAGESIZE
                if hasattr(self._map, "madvise") and stop - page >= mmap.PAGESIZE:
                    self._map.madvise(mmap.MADV_DONTNEED, page, (stop - page) // mmap.PAGESIZE * mmap.PAGESIZE)
        finally:
            if view is not None:
                view.release()
        self.pos = max(self.pos, to)

    def finish(self) -> str:
        self._advance(self.size)
        self.close()
        return f"{self.algorithm}:{self.h.hexdigest()}"

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._f.close()


def _memo_key(path: Path) -> tuple[Path, str]:
    real = Path(os.path.realpath(path))
    st = real.stat()
    return real, f"{real}|{st.st_size}|{st.st_mtime_ns}"


def checkpoint_fingerprint(file_hashes: dict[str, str]) -> str:
    """One hash for a whole checkpoint: the sha256 of its sorted (file name, file digest) pairs.
    sha256 digests enter bare, as before digests named their algorithm, so that caches keyed by
    then (a 7B model's dense evaluation takes hours) still hit."""
    text = "\n".join(f"{name} {h.removeprefix('sha256:')}" for name, h in sorted(file_hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


_PARSED: dict[Path, tuple[tuple[int, int, int], dict]] = {}


def _load(path: Path) -> dict:
    """The memo (read-only), parsed once per process and again only when the file changes: a
    warm load-time pruning asks for every shard's hash, and a memo of many checkpoints is
    hundreds of kB of JSON."""
    try:
        st = path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = _PARSED.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    _PARSED[path] = (stamp, memo)
    return memo
