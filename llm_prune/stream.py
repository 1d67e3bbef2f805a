"""Read a checkpoint one block at a time; write the output one shard at a time.

``CheckpointReader`` opens ``model.safetensors.index.json`` (or a single ``model.safetensors``),
validates every file's header up front (missing files, truncated or corrupt shards and names the
index promises but no file holds are reported before any work), and hands out one unit's tensors
at a time: mapped from the file, read into fresh memory, or as byte ranges to copy.
``ShardWriter`` writes each unit as its own shard (``ShardFile``: laid out, allocated and mapped,
then filled in place) into a hidden ``.NAME.partial`` directory beside the output, logs it in
``progress.jsonl``, and renames the directory into place only when the run is complete — which
is also what makes runs resumable at block granularity.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open, SafetensorError

from .arch import Arch
from .errors import UserError
from .paths import atomic_write_text

SAFE_INDEX = "model.safetensors.index.json"
SPARSE_INDEX = "sparse.safetensors.index.json"  # compressed formats (llm_prune.kernels.formats)
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Files that carry weights; everything else at the top level (config, tokenizer, generation
# settings, chat template, preprocessor) is copied to the output unchanged.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
WEIGHT_INDEXES = (SAFE_INDEX, SPARSE_INDEX, PICKLE_INDEX)
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name relative to the checkpoint directory
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset of the data in a safetensors file (-1: pickle)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class FileBytes:
    """A tensor left where it is in a source file: the writer copies its bytes file to file in
    the kernel (``copy_file_range``), so a tensor that is not pruned is never read into memory."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Unit:
    """What is read, pruned and written together: one transformer block, or a group of the
    tensors outside blocks (embeddings, final norm, head)."""

    key: str  # "block.7" or "rest.0"; progress.jsonl and resume refer to units by key
    block: int | None
    names: list[str]
    targets: list[str] = field(default_factory=list)  # names pruned in this unit

    def nbytes(self, infos: dict[str, TensorInfo]) -> int:
        return sum(infos[n].nbytes for n in self.names)


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


class CheckpointReader:
    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            self.config = json.loads(config_path.read_text())
        except ValueError as e:
            raise UserError(f"{config_path} is not valid JSON ({e})") from None
        self.pickle = False
        self.metadata: dict[str, dict[str, str]] = {}  # file -> safetensors __metadata__
        self.files, weight_map = self._find_files(allow_pickle)
        self.infos = self._read_headers(weight_map)

    # -- discovery and validation -------------------------------------------------------------
    def _find_files(self, allow_pickle: bool) -> tuple[list[str], dict[str, str] | None]:
        p = self.path
        for index in (SAFE_INDEX, SPARSE_INDEX):
            if (p / index).is_file():
                weight_map = _read_index(p / index)
                return sorted(set(weight_map.values())), weight_map
        if (p / SAFE_SINGLE).is_file():
            return [SAFE_SINGLE], None
        pickles = (p / PICKLE_INDEX).is_file() or (p / PICKLE_SINGLE).is_file()
        if pickles and not allow_pickle:
            raise UserError(f"{p} holds pickled .bin weights, which can run arbitrary code when loaded; "
                            "convert them to safetensors or pass --allow-pickle if you trust the source")
        if pickles:
            self.pickle = True
            if (p / PICKLE_INDEX).is_file():
                weight_map = _read_index(p / PICKLE_INDEX)
                return sorted(set(weight_map.values())), weight_map
            return [PICKLE_SINGLE], None
        raise UserError(f"{p} has no {SAFE_SINGLE} or {SAFE_INDEX}")

    def _read_headers(self, weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for file in self.files:
            fpath = self.path / file
            if not fpath.is_file():
                raise UserError(f"the checkpoint index names {file}, which is missing from {self.path}")
            for name, (dtype, shape, offset) in self._file_header(fpath).items():
                if weight_map is None or weight_map.get(name) == file:
                    infos[name] = TensorInfo(name, file, dtype, shape, offset)
        if weight_map is not None:
            missing = [n for n in weight_map if n not in infos]
            if missing:
                raise UserError(f"{weight_map[missing[0]]} does not contain {missing[0]}, which the index "
                                f"places there ({len(missing)} tensor(s) missing): the checkpoint is incomplete")
        return infos

    def _file_header(self, fpath: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        if self.pickle:
            return {k: (v.dtype, tuple(v.shape), -1) for k, v in self._load_pickle(fpath).items()}
        # The header alone is cheap to read; checking it against the file size catches truncated
        # downloads before the run starts instead of at block 31 of 32.
        try:
            with open(fpath, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
            self.metadata[fpath.name] = header.pop("__metadata__", None) or {}
            end = max((v["data_offsets"][1] for v in header.values()), default=0)
            if 8 + n + end != size:
                raise ValueError(f"data ends at byte {8 + n + end} but the file has {size}")
            with safe_open(fpath, "pt") as sf:  # the library's own validation too
                names = set(sf.keys())
            return {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0])
                    for k, v in header.items() if k in names}
        except (ValueError, KeyError, TypeError, SafetensorError, OSError) as e:
            raise UserError(f"{fpath} is truncated or corrupt ({e}); download it again") from None

    def _load_pickle(self, fpath: Path) -> dict[str, torch.Tensor]:
        try:  # weights_only refuses code objects; mmap keeps memory to what is touched
            return torch.load(fpath, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise UserError(f"{fpath} could not be read as a torch checkpoint ({e})") from None

    # -- reading --------------------------------------------------------------------------------
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, as memory-mapped copy-on-write views that callers must not write into."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.infos[n].file, []).append(n)
        out = {}
        for file, file_names in by_file.items():
            if self.pickle:
                data = self._load_pickle(self.path / file)
                out.update({n: data[n] for n in file_names})
                continue
            with safe_open(self.path / file, "pt") as f:
                out.update({n: f.get_tensor(n) for n in file_names})
        return {n: out[n] for n in names}

    def sources(self, names: list[str]) -> dict[str, "torch.Tensor | FileBytes"]:
        """The named tensors for a writer that passes them through unchanged: byte ranges of
        their files (pickle checkpoints: the tensors themselves)."""
        if self.pickle:
            return self.read(names)
        return {n: FileBytes(self.path / i.file, i.offset, i.nbytes, i.dtype, i.shape)
                for n, i in ((n, self.infos[n]) for n in names)}

    def read_fresh(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors one at a time, each in fresh memory the caller keeps (a loaded model).

        ``safe_open`` would hand out views of one private mapping of the whole file: every page a
        pruned tensor was read from would stay resident as long as any small unpruned tensor of
        the same shard lives. Positional reads keep the peak to what the caller holds plus one tensor.
        """
        for info in sorted((self.infos[n] for n in names), key=lambda i: (i.file, i.offset)):
            t = torch.empty(info.shape, dtype=info.dtype)
            self._positional_reads([(info, t.reshape(-1).view(torch.uint8))])
            yield info.name, t

    def read_mapped(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors as private (copy-on-write) mappings of their bytes in the file, in
        file order: nothing is read until a page is touched, untouched pages stay shared with the
        page cache (as transformers' own loads do), and writes go to private copies, never to
        the file. A tensor holds only its own byte range, so it pins no other tensor's pages."""
        by_file: dict[str, list[TensorInfo]] = {}
        for info in sorted((self.infos[n] for n in names), key=lambda i: (i.file, i.offset)):
            by_file.setdefault(info.file, []).append(info)
        for file, infos in by_file.items():
            with open(self.path / file, "rb") as f:  # the mappings outlive the descriptor
                size = os.fstat(f.fileno()).st_size
                for info in infos:
                    if info.nbytes == 0:
                        yield info.name, torch.empty(info.shape, dtype=info.dtype)
                        continue
                    if size < info.offset + info.nbytes:
                        raise UserError(f"{self.path / file} ended before {info.name}: the file is truncated")
                    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
                    m = mmap.mmap(f.fileno(), info.offset - start + info.nbytes, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
                    t = torch.frombuffer(m, dtype=torch.uint8, offset=info.offset - start, count=info.nbytes)
                    yield info.name, t.view(info.dtype).view(info.shape)

    def _positional_reads(self, jobs: list[tuple[TensorInfo, torch.Tensor]]) -> None:
        """Fill each uint8 destination with its tensor's bytes, in file order, each file opened once."""
        handles: dict[str, object] = {}
        try:
            for info, dest in sorted(jobs, key=lambda j: (j[0].file, j[0].offset)):
                if info.file not in handles:
                    handles[info.file] = open(self.path / info.file, "rb", buffering=0)
                f = handles[info.file]
                f.seek(info.offset)
                view, got = memoryview(dest.numpy()) if info.nbytes else memoryview(b""), 0
                while got < info.nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise UserError(f"{self.path / info.file} ended before {info.name}: the file is truncated")
                    got += k
        finally:
            for f in handles.values():
                f.close()

    def units(self, arch: Arch, max_rest_bytes: int | None = None) -> list[Unit]:
        """Blocks in index order (tensor names sorted within each), then the non-block tensors
        packed into groups of at most ``max_rest_bytes`` (default: the largest block)."""
        blocks: dict[int, list[str]] = {}
        rest: list[str] = []
        for name in self.infos:
            where = arch.block_of(name)
            if where is None:
                rest.append(name)
            else:
                blocks.setdefault(where[0], []).append(name)
        units = [Unit(f"block.{i}", i, sorted(blocks[i])) for i in sorted(blocks)]
        if max_rest_bytes is None:
            max_rest_bytes = max((u.nbytes(self.infos) for u in units), default=1)
        group: list[str] = []
        for name in sorted(rest):
            if group and sum(self.infos[n].nbytes for n in group) + self.infos[name].nbytes > max_rest_bytes:
                units.append(Unit(f"rest.{len(units) - len(blocks)}", None, group))
                group = []
            group.append(name)
        if group:
            units.append(Unit(f"rest.{len(units) - len(blocks)}", None, group))
        return units


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid checkpoint index ({e!r})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{path} has an empty weight_map")
    return weight_map


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
        header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        self.spans: dict[str, tuple[int, int]] = {}
        self.specs = specs
        end = 0
        for name, (dtype, shape) in sorted(specs.items(), key=lambda kv: (-kv[1][0].itemsize, kv[0])):
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
            n = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [end, end + n]}
            self.spans[name] = (end, n)
            end += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format asks
        self.start = 8 + len(raw)
        self.map = None
        self.size = self.start + end
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        try:
            _pwrite_all(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
            if end:
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
    waits for the data written before it (auto_da_alloc): a progress.json renamed over per unit
    cost 2.0-2.6 s of a 16-block 7B-shaped run, the log 0.01-0.05 s (BENCHMARKS.md, streaming run 7).
    """

    PROGRESS = "progress.jsonl"

    def __init__(self, out: Path, run_key: dict, *, overwrite: bool = False, resume: bool = False,
                 index_name: str = SAFE_INDEX):
        self.out = Path(out)
        self.index_name = index_name
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
            if old is None:
                raise UserError(f"{self.tmp} has no readable {self.PROGRESS} (left by another tool or an "
                                "older llm-prune?); delete it to start over")
            if old["run"] != run_key:
                raise UserError(f"{self.tmp} belongs to a run with other settings or another checkpoint; "
                                "delete it to start over")
            self.progress = old
            os.truncate(log, good)  # a line torn by a kill goes, so the next appends parse
        else:
            self.tmp.mkdir(parents=True)
            log.write_text(json.dumps({"run": run_key}) + "\n")
        self.resumed = len(self.progress["units"])  # units a previous run already finished
        self._lock = threading.Lock()

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

    def commit(self, unit: Unit, file: str, names: list[str], record: dict, state: dict | None = None) -> None:
        """Publish a finished shard (holding ``names``) in the partial directory and log it."""
        path = self.tmp / file
        os.replace(self._part(file), path)
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
            raise

    @property
    def state(self) -> dict:
        return self.progress["state"]

    def records(self) -> dict:
        return self.progress["units"]

    def finish(self, index: dict, side_src: Path, extra_json: dict[str, dict]) -> None:
        """Write the index, copy side files, add extra JSON files, then publish atomically."""
        atomic_write_text(self.tmp / self.index_name, json.dumps(index, indent=2))
        copy_side_files(side_src, self.tmp)
        for name, payload in extra_json.items():
            atomic_write_text(self.tmp / name, json.dumps(payload, indent=2))
        (self.tmp / self.PROGRESS).unlink()
        if self.out.exists():  # only reachable with --overwrite: swap, then drop the old copy
            old = self.out.parent / f".{self.out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)

    def abort(self) -> None:
        """Drop the partial directory after a refused run, unless it holds an earlier run's
        finished units: those stay, to resume once the cause is fixed."""
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
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed * 1.1:
        raise UserError(f"not enough disk space in {directory}: the output needs about "
                        f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
