"""Write the output one shard at a time, into a hidden directory published atomically.

``ShardWriter`` writes each unit as its own shard (``ShardFile``: laid out, allocated and
mapped, then filled in place) into a hidden ``.NAME.partial`` directory beside the output, logs
it in ``progress.jsonl``, and renames the directory into place only when the run is complete:
which is also what makes runs resumable at block granularity.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError
from .fingerprint import Hasher, digest_of
from .paths import atomic_write_text, make_dir, publish_dir
from .reader import SAFE_INDEX, WEIGHT_INDEXES, WEIGHT_SUFFIXES, FileBytes, Unit, safetensors_dtype_name


class Arena:
    """A byte buffer reused for every unit, carved into aligned tensor views.

    Allocating fresh tensors per block costs a page fault per 4 KiB each time (the dominant cost
    of a naive loop on this kind of machine); a buffer that grows to the largest unit once and is
    reused keeps memory flat and the pages warm.
    """

    ALIGN = 64

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8)

    def carve(self, sizes: list[int]) -> list[torch.Tensor]:
        starts, end = [], 0
        for size in sizes:
            starts.append(end)
            end += -(-size // self.ALIGN) * self.ALIGN
        if end > self.buf.numel():
            self.buf = torch.empty(end, dtype=torch.uint8)
        return [self.buf[a:a + size] for a, size in zip(starts, sizes)]


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and generation files (every top-level non-weight file)."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES \
                and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def save_safetensors(path: Path, tensors: dict[str, "torch.Tensor | FileBytes"], metadata: dict[str, str]) -> None:
    """Write a safetensors file from tensors in memory and byte ranges of other files (``ShardFile``)."""
    with ShardFile(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata) as shard:
        for name, t in tensors.items():
            if isinstance(t, FileBytes):
                shard.copy_from(name, t)
            elif t.numel():
                shard.write(name, t)


class ShardFile:
    """A safetensors file laid out from its tensors' dtypes and shapes, then filled in place.

    The format (8-byte header length, JSON header, the tensors' bytes back to back) is simple
    enough to write directly, and doing so lets the pruner write each tensor in pieces, at their
    offsets, as it prunes them: the file is allocated on disk up front (no space left is an error
    here, never a crash halfway), tensors or pieces of them are written with ``pwrite`` (or into
    a mapping, ``tensor``), and tensors that are not pruned are copied file to file by the
    kernel (``copy_file_range``). ``safetensors.torch.save_file``
    instead copies every tensor into fresh bytes before writing them, which cost 3x the write on
    a 7B block here. Tensors are laid out by element size, largest first, then by name, as the
    library does, so each stays aligned to its element size; metadata keys are sorted, so
    identical runs write identical bytes.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        head, self.spans, self.size = shard_layout(specs, metadata)
        self.specs = specs
        self.start = len(head)
        self.map = None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        try:
            _pwrite_all(self.fd, head, 0)
            if self.size > self.start:
                _allocate(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise

    def tensor(self, name: str) -> torch.Tensor:
        """A writable view of ``name``'s bytes in the file (drop it before ``close``)."""
        dtype, shape = self.specs[name]
        at, n = self.spans[name]
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        if self.map is None:
            self.map = mmap.mmap(self.fd, self.size)
        return torch.frombuffer(self.map, dtype=torch.uint8, offset=self.start + at, count=n).view(dtype).view(shape)

    def write(self, name: str, t: torch.Tensor, offset: int = 0) -> None:
        """``name``'s bytes from a tensor in memory: all of them, or a piece at byte ``offset``."""
        at, n = self.spans[name]
        size = t.numel() * t.element_size()
        if t.dtype != self.specs[name][0] or not 0 <= offset <= n - size:
            raise ValueError(f"{name}: {size} bytes of {t.dtype} at byte {offset} do not fit its {n} bytes")
        if size:
            _pwrite_all(self.fd, memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()),
                        self.start + at + offset)

    def copy_from(self, name: str, src: FileBytes) -> None:
        """``name``'s bytes from ``src``: in the kernel where the file systems allow, else read and written."""
        at, n = self.spans[name]
        if n != src.nbytes:
            raise ValueError(f"{name}: {src.nbytes} bytes given, {n} expected")
        _copy_range(src, self.fd, self.start + at)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a caller still holds a view: the mapping goes when the view does
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """A safetensors file's leading bytes (length and JSON header), each tensor's (offset after
    them, byte count), and the file's size. Tensors are laid out by element size, largest first,
    then by name, as the library does; metadata keys are sorted."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    spans: dict[str, tuple[int, int]] = {}
    end = 0
    for name, (dtype, shape) in sorted(specs.items(), key=lambda kv: (-kv[1][0].itemsize, kv[0])):
        if safetensors_dtype_name(dtype) is None:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        n = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": safetensors_dtype_name(dtype), "shape": list(shape), "data_offsets": [end, end + n]}
        spans[name] = (end, n)
        end += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format asks
    head = struct.pack("<Q", len(raw)) + raw
    return head, spans, len(head) + end


class Stage:
    """Page-aligned memory a whole shard is assembled in, reused shard after shard (its pages
    stay warm), and whether the output's file system takes ``O_DIRECT`` writes of it.

    Written through the page cache, every byte of a shard is copied into fresh cache pages; on
    the 2-core VMs here that copy is the bound of a large export and of ``cp`` alike
    (BENCHMARKS.md, session 23), while direct writes go from this memory to the disk."""

    ALIGN = 4096  # O_DIRECT's alignment of addresses, offsets and lengths on common file systems

    def __init__(self, directory: Path):
        self.map: mmap.mmap | None = None
        self.direct = _takes_direct_io(directory)
        # A shard's staged bytes are hashed and written from these, in order, beside the pruning.
        self.hashing = ThreadPoolExecutor(1, thread_name_prefix="llm-prune-stage-hash")
        self.writing = ThreadPoolExecutor(1, thread_name_prefix="llm-prune-stage-write")

    def take(self, size: int) -> mmap.mmap:
        need = max(self.ALIGN, -(-size // self.ALIGN) * self.ALIGN)
        if self.map is None or len(self.map) < need:
            self._release()
            self.map = mmap.mmap(-1, need)  # anonymous: page aligned
        return self.map

    def close(self) -> None:
        self.hashing.shutdown()
        self.writing.shutdown()
        self._release()

    def _release(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still alive: the mapping goes with it
                pass
            self.map = None


def _takes_direct_io(directory: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / ".direct-io-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o666))
    except OSError:  # tmpfs and some other file systems refuse it
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


class StagedShard:
    """A safetensors shard assembled whole in a ``Stage``, hashed from it and written with
    ``O_DIRECT``: the same bytes as ``ShardFile`` without their copy into the page cache.

    The stage's threads hash and write the shard's finished prefix while the rest is filled in:
    each tensor declared ``done`` (``copy_from`` declares its own) extends it, and once it has
    grown by ``PIECE`` bytes its aligned part is handed on. ``finish`` hands on what is left and
    waits; the pruning of a block then waits on no more than its last tensors' write."""

    PIECE = 4 << 20

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
                 stage: Stage):
        head, self.spans, self.size = shard_layout(specs, metadata)
        self.path, self.specs, self.start, self.stage = path, specs, len(head), stage
        self.map = stage.take(self.size)
        self.map[:len(head)] = head
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8, count=self.size)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        try:
            _allocate(self.fd, self.size)  # space reserved first, as ``ShardFile`` does
        except BaseException:
            os.close(self.fd)
            raise
        self.direct = True  # until the file system refuses a direct write (then: the page cache)
        self._hash = Hasher()
        self._final, self._pending = self.start, []  # bytes [0, _final) are final; ranges beyond
        self._handed, self._jobs = 0, []  # bytes [0, _handed) are with the threads

    def tensor(self, name: str) -> torch.Tensor:
        """A writable view of ``name``'s bytes in the staged shard."""
        dtype, shape = self.specs[name]
        at, n = self.spans[name]
        return self.bytes[self.start + at:self.start + at + n].view(dtype).view(shape)

    def copy_from(self, name: str, src: FileBytes) -> None:
        at, n = self.spans[name]
        if n != src.nbytes:
            raise ValueError(f"{name}: {src.nbytes} bytes given, {n} expected")
        view, got = memoryview(self.map)[self.start + at:self.start + at + n], 0
        with open(src.path, "rb", buffering=0) as f:
            f.seek(src.offset)
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    raise UserError(f"{src.path} ended early: the file is truncated")
                got += k
        self.done(name)

    def done(self, name: str) -> None:
        """``name``'s bytes are final: the threads may hash and write them once what comes before is."""
        at, n = self.spans[name]
        self._pending.append((self.start + at, self.start + at + n))
        self._pending.sort()
        while self._pending and self._pending[0][0] <= self._final:
            self._final = max(self._final, self._pending.pop(0)[1])
        end = self._final // Stage.ALIGN * Stage.ALIGN
        if end - self._handed >= self.PIECE:
            self._hand_on(end)

    def finish(self) -> str:
        """Write the rest of the shard, wait for its writes, and return its digest."""
        body = self.size // Stage.ALIGN * Stage.ALIGN
        try:
            self._hand_on(body)
            self._jobs.append(self.stage.hashing.submit(self._hash.update, memoryview(self.map)[body:self.size]))
        finally:
            jobs, self._jobs = self._jobs, []
            wait(jobs)  # every thread done with the stage and the file before anything is raised
            os.close(self.fd)
        for job in jobs:
            job.result()
        tail = body if self.direct else 0
        if self.size > tail:  # the unaligned tail, under one page (or all of it), through the page cache
            fd = os.open(self.path, os.O_WRONLY)
            try:
                _pwrite_all(fd, memoryview(self.map)[tail:self.size], tail)
            finally:
                os.close(fd)
        del self.bytes
        return self._hash.digest()

    def abort(self) -> None:
        """Give the shard up: once the threads have let go of the stage and the file, remove it."""
        wait(self._jobs)
        self._jobs = []
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
        del self.bytes

    def _hand_on(self, end: int) -> None:
        if end > self._handed:
            view = memoryview(self.map)[self._handed:end]
            self._jobs.append(self.stage.hashing.submit(self._hash.update, view))
            self._jobs.append(self.stage.writing.submit(self._write_direct, view, self._handed))
            self._handed = end

    def _write_direct(self, view, at: int) -> None:
        if not self.direct:
            return
        try:
            _pwrite_all(self.fd, view, at)
        except OSError as e:  # a file system that opened it direct but will not write so
            if e.errno != errno.EINVAL:
                raise
            self.direct = False  # all of it through the page cache, in ``finish``


def _allocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now: a full disk fails here, cleanly, not as a fault mid-write."""
    try:
        if not hasattr(os, "posix_fallocate"):  # macOS
            raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # file systems without allocation: sized, filled as written


def _pwrite_all(fd: int, data, at: int) -> None:
    view = memoryview(data)
    while len(view):  # one write moves at most ~2 GiB on Linux
        if hasattr(os, "pwrite"):
            k = os.pwrite(fd, view, at)
        else:  # Windows: each ShardFile has its own descriptor, written by one thread
            os.lseek(fd, at, os.SEEK_SET)
            k = os.write(fd, view)
        view, at = view[k:], at + k


def _copy_range(src: FileBytes, fd: int, at: int) -> None:
    """Copy ``src``'s bytes to offset ``at`` of ``fd``."""
    with open(src.path, "rb", buffering=0) as g:
        done = 0
        try:
            if not hasattr(os, "copy_file_range"):  # not Linux
                raise OSError(errno.ENOSYS, "no copy_file_range")
            while done < src.nbytes:
                k = os.copy_file_range(g.fileno(), fd, src.nbytes - done, src.offset + done, at + done)
                if k == 0:
                    raise UserError(f"{src.path} ended early: the file is truncated")
                done += k
            return
        except OSError as e:  # not across these file systems (EXDEV), or no kernel support
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
        g.seek(src.offset + done)
        while done < src.nbytes:
            chunk = g.read(min(64 << 20, src.nbytes - done))
            if not chunk:
                raise UserError(f"{src.path} ended early: the file is truncated")
            _pwrite_all(fd, chunk, at + done)
            done += len(chunk)


class ShardWriter:
    """Writes units as shards into ``.NAME.partial`` and publishes the directory atomically.

    ``progress.jsonl`` in the partial directory is a log: the run's key, then one line per
    finished unit with whatever the pipeline needs to continue (per-tensor statistics, carried
    state), appended once the unit's shard is in place, so a killed run loses at most the unit in
    flight. A log is appended to, never renamed over: on ext4 a rename over an existing file
    waits for the data written before it (auto_da_alloc), which made every unit of a run wait for
    the disk (BENCHMARKS.md, streaming run 7).
    """

    PROGRESS = "progress.jsonl"

    def __init__(self, out: Path, run_key: dict, *, overwrite: bool = False, resume: bool = False,
                 index_name: str = SAFE_INDEX, manifest: str | None = None):
        self.out = Path(out)
        self.index_name = index_name
        self.manifest = manifest
        self.finished: dict | None = None  # a run killed between its last write and its publish
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        self.overwrite = overwrite
        if self.out.exists() and not overwrite:
            raise UserError(f"{self.out} already exists; pass --overwrite to replace it or choose another --out")
        self.progress = {"run": run_key, "units": {}, "state": {}}
        log = self.tmp / self.PROGRESS
        if self.tmp.exists():
            if not resume:
                raise UserError(f"an unfinished run left {self.tmp}; pass --resume to continue it "
                                f"or delete that directory to start over")
            old, good = _read_log(log)
            if old is None and self._finished(run_key):
                self.resumed = 0
                return
            if old is None:
                raise UserError(f"{self.tmp} has no readable {self.PROGRESS} (left by another tool or an "
                                "older llm-prune?); delete it to start over")
            if old["run"] != run_key:
                raise UserError(f"{self.tmp} belongs to a run with other settings or another checkpoint; "
                                "delete it to start over")
            self.progress = old
            os.truncate(log, good)  # a line torn by a kill goes, so the next appends parse
        else:
            make_dir(self.tmp)
            log.write_text(json.dumps({"run": run_key}) + "\n")
        self.resumed = len(self.progress["units"])  # units a previous run already finished
        self._lock = threading.Lock()
        # Each shard is hashed once it is final, in a thread, while the next block is pruned: the
        # manifest in sparsity.json (what ``llm-prune verify`` checks) then costs no extra pass.
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="llm-prune-hash-out")
        self._hashes: dict[str, Future] = {}
        self.digests: dict[str, str] = {}  # staged shards' digests, until they are committed

    def _finished(self, run_key: dict) -> bool:
        """The partial directory holds a whole output of this very run (its manifest, written
        last, carries the run's key) that a kill stopped just before the rename: only the
        publishing is left to do (``publish_finished``)."""
        if self.manifest is None:
            return False
        try:
            payload = json.loads((self.tmp / self.manifest).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(payload, dict) or "output" not in payload or payload.get("run", {}).get("key") != run_key:
            return False
        self.finished = payload
        return True

    def publish_finished(self) -> dict:
        publish_dir(self.tmp, self.out)
        return self.finished

    def done(self, unit: Unit) -> bool:
        """True when the unit's shard was finished, and is still there whole (same byte size)."""
        entry = self.progress["units"].get(unit.key)
        if entry is None:
            return False
        path = self.tmp / entry["file"]
        # Entries written before sizes were recorded have none: existence is all they can show.
        return path.is_file() and entry.get("bytes", path.stat().st_size) == path.stat().st_size

    def write(self, unit: Unit, file: str, tensors: dict[str, "torch.Tensor | FileBytes"], record: dict,
              state: dict | None = None, metadata: dict[str, str] | None = None) -> None:
        """Write ``unit``'s shard from tensors in memory or byte ranges of the source, and record it."""
        with self._disk_errors(file):
            save_safetensors(self._part(file), tensors, metadata or {"format": "pt"})
        self.commit(unit, file, list(tensors), record, state)

    def open(self, file: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
             metadata: dict[str, str] | None = None) -> ShardFile:
        """A ``ShardFile`` to fill in place; ``commit`` it once closed."""
        with self._disk_errors(file):
            return ShardFile(self._part(file), specs, metadata or {"format": "pt"})

    @contextmanager
    def staged(self, file: str, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], stage: Stage,
               metadata: dict[str, str] | None = None):
        """A ``StagedShard`` to fill; on leaving, it is written and its digest is in ``digest``."""
        with self._disk_errors(file):
            shard = StagedShard(self._part(file), specs, metadata or {"format": "pt"}, stage)
            try:
                yield shard
            except BaseException:
                shard.abort()
                raise
            self.digests[file] = shard.finish()

    def commit(self, unit: Unit, file: str, names: list[str], record: dict, state: dict | None = None) -> None:
        """Publish a finished shard (holding ``names``) in the partial directory and log it."""
        path = self.tmp / file
        os.replace(self._part(file), path)
        if file in self.digests:  # hashed from memory before it was written
            done = Future()
            done.set_result(self.digests.pop(file))
            self._hashes[file] = done
        else:
            self._hashes[file] = self._hashing.submit(digest_of, path)
        entry = {"file": file, "bytes": path.stat().st_size, "tensors": sorted(names), **record}
        line = {"unit": unit.key, **entry, **({"state": state} if state is not None else {})}
        with self._lock:  # units with nothing to prune are committed from the writer thread
            self.progress["units"][unit.key] = entry
            if state is not None:
                self.progress["state"] = state
            with open(self.tmp / self.PROGRESS, "a") as f:
                f.write(json.dumps(line) + "\n")

    def _part(self, file: str) -> Path:
        return self.tmp / (file + ".tmp")

    @contextmanager
    def _disk_errors(self, file: str):
        """A full disk is one line (the caller then ``abort``s, once every write has stopped);
        the half-written shard goes."""
        try:
            yield
        except OSError as e:
            self._part(file).unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise UserError(f"no space left on the device while writing {self.out}; "
                                "nothing was kept, free some space and run again") from None
            if e.errno in (errno.ENOENT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise UserError(f"writing {self.out} failed: {e.strerror} (was the output location made "
                                "read-only, or removed, during the run?)") from None
            raise

    def written_bytes(self) -> int:
        """Bytes of the shards in the partial directory so far."""
        return sum(f.stat().st_size for f in self.tmp.glob("*.safetensors"))

    @property
    def state(self) -> dict:
        return self.progress["state"]

    def records(self) -> dict:
        return self.progress["units"]

    def finish(self, index: dict, side_src: Path, extra_json: dict[str, dict], before_publish=None,
               manifest: str | None = None) -> None:
        """Write the index, copy side files, add extra JSON files, then publish atomically.
        ``before_publish(directory)`` may add files to the complete checkpoint first. ``manifest``
        names the extra JSON file that gets ``output.files``: the digest of every other file."""
        atomic_write_text(self.tmp / self.index_name, json.dumps(index, indent=2))
        copy_side_files(side_src, self.tmp)
        for name, payload in extra_json.items():
            atomic_write_text(self.tmp / name, json.dumps(payload, indent=2))
        if before_publish is not None:
            before_publish(self.tmp)
        if manifest is not None:
            extra_json[manifest]["output"] = {"files": self._file_hashes(exclude={manifest, self.PROGRESS})}
            extra_json[manifest].setdefault("run", {})["key"] = self.progress["run"]  # see _finished
            atomic_write_text(self.tmp / manifest, json.dumps(extra_json[manifest], indent=2))
        self._hashing.shutdown()
        (self.tmp / self.PROGRESS).unlink()
        publish_dir(self.tmp, self.out)  # an existing output is only there with --overwrite

    def _file_hashes(self, exclude: set[str]) -> dict[str, str]:
        """The digest of every file in the partial directory: shards from their hashing thread, the
        rest (and shards a resumed run inherited) now."""
        out = {}
        for f in sorted(self.tmp.iterdir()):
            if f.is_file() and f.name not in exclude:
                job = self._hashes.get(f.name)
                out[f.name] = job.result() if job is not None else digest_of(f)
        return out

    def abort(self) -> None:
        """Drop the partial directory after a refused run, unless it holds an earlier run's
        finished units: those stay, to resume once the cause is fixed."""
        self._hashing.shutdown(wait=True, cancel_futures=True)
        if not self.resumed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _read_log(path: Path) -> tuple[dict | None, int]:
    """A progress log read back: ({"run", "units", "state"} or None, bytes of whole lines)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, 0
    progress, good = None, 0
    for line in data.splitlines(keepends=True):
        try:
            rec = json.loads(line) if line.endswith(b"\n") else None  # no newline: torn by a kill
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or ("run" if progress is None else "unit") not in rec:
            break
        if progress is None:
            progress = {"run": rec["run"], "units": {}, "state": {}}
        else:
            unit, state = rec.pop("unit"), rec.pop("state", None)
            progress["units"][unit] = rec
            if state is not None:
                progress["state"] = state
        good += len(line)
    return progress, good


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse to start a run that cannot fit (10% margin), instead of failing halfway."""
    make_dir(directory)
    free = shutil.disk_usage(directory).free
    if free < needed * 1.1:
        raise UserError(f"not enough disk space in {directory}: the output needs about "
                        f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
