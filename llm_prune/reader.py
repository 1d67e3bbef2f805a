"""Read a checkpoint: find its files, validate every header before any work, hand out tensors.

``CheckpointReader`` opens ``model.safetensors.index.json`` (or a single ``model.safetensors``),
checks every file's header against its size (missing files, truncated or corrupt shards and
names the index promises but no file holds are reported before any work) and hands out tensors:
mapped from the file, read into fresh memory, or as byte ranges for a writer to copy.
``group_units`` cuts a checkpoint into what is pruned and written together: one unit per
transformer block, plus groups of the tensors outside blocks.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open, SafetensorError

from .arch import Arch
from .errors import UserError

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


def safetensors_dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors header's name for ``dtype`` (None when the format has none)."""
    return _DTYPE_NAMES.get(dtype)


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

    def _check_inside(self, file: str) -> None:
        """A file an index names is a plain name in the checkpoint directory, and what it resolves to
        stays there (or in the Hugging Face cache's blob store of this repository): an index can
        never make llm-prune read, or write beside, a file elsewhere."""
        if not file or file != Path(file).name or file in (".", ".."):
            raise UserError(f"the checkpoint index names {file!r}, which is not a file name inside {self.path}: refused")
        real, home = (self.path / file).resolve(), self.path.resolve()
        blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
        if not (real.is_relative_to(home) or (blobs is not None and real.is_relative_to(blobs))):
            raise UserError(f"{self.path / file} links outside the checkpoint directory (to {real}): refused")

    def _read_headers(self, weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for file in self.files:
            self._check_inside(file)
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
            if not isinstance(self.metadata[fpath.name], dict):
                raise ValueError("__metadata__ is not an object")
            spans = sorted((_checked_entry(k, v), k) for k, v in header.items())
            end = 0
            for (begin, stop), name in spans:  # back to back, as the format lays them out
                if begin != end:
                    raise ValueError(f"{name}'s data starts at byte {begin} of the data, expected {end}")
                end = stop
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

    def header_ends(self) -> dict[str, int]:
        """Where each safetensors file's data begins: the bytes before it were read by the checks."""
        if self.pickle:
            return {}
        ends: dict[str, int] = {}
        for info in self.infos.values():
            ends[info.file] = min(ends.get(info.file, info.offset), info.offset)
        return ends

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
                    m, at = self._private_map(f, size, info)
                    t = torch.frombuffer(m, dtype=torch.uint8, offset=at, count=info.nbytes)
                    yield info.name, t.view(info.dtype).view(info.shape)

    def read_mapped_pieces(self, name: str, piece_bytes: int = 16 << 20) -> Iterator[torch.Tensor]:
        """``name``'s elements as consecutive flat pieces of at most ``piece_bytes``, from a
        private mapping of its bytes (as ``read_mapped``). Each piece's pages leave the process
        when the next piece is asked for (they stay in the page cache): a reader that looks at
        a tensor once holds one piece of it, not the whole tensor."""
        info = self.infos[name]
        if info.nbytes == 0:
            return
        with open(self.path / info.file, "rb") as f:
            m, first = self._private_map(f, os.fstat(f.fileno()).st_size, info)
        step = max(mmap.PAGESIZE, piece_bytes // mmap.PAGESIZE * mmap.PAGESIZE)  # whole elements
        end = first + info.nbytes
        for at in range(first, end, step):
            stop = min(at + step, end)
            yield torch.frombuffer(m, dtype=torch.uint8, offset=at, count=stop - at).view(info.dtype)
            # the pages this piece covers whole (the one it shares with the next goes next time)
            begin, done = at - at % mmap.PAGESIZE, stop - stop % mmap.PAGESIZE
            if done > begin:
                m.madvise(mmap.MADV_DONTNEED, begin, done - begin)

    def _private_map(self, f, size: int, info: TensorInfo) -> tuple[mmap.mmap, int]:
        """A private, copy-on-write mapping of ``info``'s bytes in the open file ``f`` (of
        ``size`` bytes), and where they start in it (mappings start on allocation granules)."""
        if size < info.offset + info.nbytes:
            raise UserError(f"{self.path / info.file} ended before {info.name}: the file is truncated")
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(f.fileno(), info.offset - start + info.nbytes, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        return m, info.offset - start

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
        units = group_units(self.infos, arch, max_rest_bytes)
        check_layers(self.config, units, self.path)
        return units


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def check_layers(config: dict, units: list[Unit], path: Path) -> None:
    """The weights hold as many blocks as config.json says the model has: a mismatch is a
    checkpoint whose config and weights belong to different models."""
    declared = next((config[k] for k in LAYER_KEYS if isinstance(config.get(k), int)), None)
    found = sum(1 for u in units if u.block is not None)
    if declared is not None and found and declared != found:
        raise UserError(f"{path}/config.json says the model has {declared} layers, the weights hold {found} blocks: "
                        "config and weights do not belong together")


def group_units(infos: dict[str, TensorInfo], arch: Arch, max_rest_bytes: int | None = None) -> list[Unit]:
    """Blocks in index order (tensor names sorted within each), then the non-block tensors
    packed into groups of at most ``max_rest_bytes`` (default: the largest block)."""
    blocks: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in infos:
        where = arch.block_of(name)
        if where is None:
            rest.append(name)
        else:
            blocks.setdefault(where[0], []).append(name)
    units = [Unit(f"block.{i}", i, sorted(blocks[i])) for i in sorted(blocks)]
    if max_rest_bytes is None:
        max_rest_bytes = max((u.nbytes(infos) for u in units), default=1)
    group: list[str] = []
    for name in sorted(rest):
        if group and sum(infos[n].nbytes for n in group) + infos[name].nbytes > max_rest_bytes:
            units.append(Unit(f"rest.{len(units) - len(blocks)}", None, group))
            group = []
        group.append(name)
    if group:
        units.append(Unit(f"rest.{len(units) - len(blocks)}", None, group))
    return units


def _checked_entry(name: str, entry) -> tuple[int, int]:
    """A header entry's data span, after checking its dtype, shape and span agree."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        raise ValueError(f"{name} has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{name} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{name} has invalid data offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if numel * _DTYPES[entry["dtype"]].itemsize != offsets[1] - offsets[0]:
        raise ValueError(f"{name}: shape {shape} of {entry['dtype']} does not fill its {offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1]


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid checkpoint index ({e!r})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{path} has an empty weight_map")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{path} maps tensor names to something other than file names")
    return weight_map
