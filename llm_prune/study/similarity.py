"""How much two keep-masks agree, and a compact file for keeping masks around to compare later.

Masks follow the house convention: bool tensors, True = weight kept. Similarities are computed
from integer counts, so they aggregate exactly: the similarity of a block, or of a whole model,
comes from the *summed* counts of its tensors (``MaskCounts.__add__``), never from an average of
per-tensor ratios, which would weigh a 576×576 projection like a 576×1536 one.

The paper's measure (Jaiswal et al. 2023, Fig. 10) is the cosine similarity of the masks read
as 0/1 vectors: |a ∧ b| / sqrt(|a|·|b|). IoU (|a ∧ b| / |a ∨ b|) is stricter and also given.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..paths import temp_file

META_KEY = "llm_prune.masks"
FORMAT = "llm-prune keep-masks"
VERSION = 1


@dataclass(frozen=True)
class MaskCounts:
    """Counts of two masks over the same elements: n elements, |a|, |b|, |a ∧ b|, |a ∨ b|."""

    n: int = 0
    a: int = 0
    b: int = 0
    both: int = 0
    either: int = 0

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> "MaskCounts":
        _check_pair(a, b)
        na, nb = int(torch.count_nonzero(a)), int(torch.count_nonzero(b))
        both = int(torch.count_nonzero(a & b))
        return cls(n=a.numel(), a=na, b=nb, both=both, either=na + nb - both)

    def __add__(self, other: "MaskCounts") -> "MaskCounts":
        return MaskCounts(self.n + other.n, self.a + other.a, self.b + other.b,
                          self.both + other.both, self.either + other.either)

    @property
    def cosine(self) -> float:
        """|a ∧ b| / sqrt(|a|·|b|); two empty masks → 1.0 (they agree), one empty → 0.0."""
        if self.a == 0 or self.b == 0:
            return 1.0 if self.a == self.b else 0.0
        if self.both == self.a == self.b:
            return 1.0  # identical keep-sets: exact, whatever rounding sqrt of a huge product does
        return self.both / math.sqrt(self.a * self.b)

    @property
    def iou(self) -> float:
        """|a ∧ b| / |a ∨ b|; two empty masks → 1.0."""
        return 1.0 if self.either == 0 else self.both / self.either


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two bool masks of equal shape, read as 0/1 vectors."""
    return MaskCounts.of(a, b).cosine


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of the kept sets of two bool masks of equal shape."""
    return MaskCounts.of(a, b).iou


def compare(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, MaskCounts]:
    """Per-tensor counts of two mask sets that must cover the same tensor names."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"the mask sets name different tensors, e.g. {only[0]!r} ({len(only)} differ)")
    return {name: MaskCounts.of(a[name], b[name]) for name in sorted(a)}


def block_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' → 'model.layers.3': the prefix up to the first index."""
    m = re.match(r"^(.*?\.\d+)\.", name)
    return m.group(1) if m else "other"


def aggregate(counts: Mapping[str, MaskCounts], group: Callable[[str], str] = block_of) -> dict[str, MaskCounts]:
    """Summed counts per group (default: per transformer block), in first-seen order."""
    out: dict[str, MaskCounts] = {}
    for name, c in counts.items():
        key = group(name)
        out[key] = out.get(key, MaskCounts()) + c
    return out


def total(counts: Mapping[str, MaskCounts]) -> MaskCounts:
    """Counts over every tensor: the overall similarity is ``total(counts).cosine``."""
    return sum(counts.values(), MaskCounts())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.bool or b.dtype != torch.bool:
        raise ValueError(f"masks must be bool tensors (True = kept), got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


# --- the mask file ---------------------------------------------------------------------------
#
# A safetensors file. Each mask is one uint8 tensor, named like the mask, holding the flattened
# (row-major) mask 8 elements per byte, least significant bit first:
#
#   | flat element index | byte   | bit (value)         |
#   |--------------------|--------|---------------------|
#   | 0 .. 7             | 0      | 0 (1) .. 7 (128)    |
#   | 8k + j             | k      | j (2**j)            |
#   | last byte, unused  | n // 8 | n % 8 .. 7, all 0   |
#
# The header's __metadata__ holds one entry, META_KEY → JSON with sorted keys and no spaces:
# {"bit_order": "lsb-first", "format": FORMAT, "metadata": {user's}, "shapes": {name: [dims]},
#  "version": 1}. One key of sorted JSON makes identical inputs give identical bytes.

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → 1-D uint8 tensor of ceil(numel / 8) bytes, LSB first (see the table)."""
    flat = mask.detach().reshape(-1).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    cols = flat.view(-1, 8)
    out = torch.zeros(cols.shape[0], dtype=torch.uint8)
    for j in range(8):  # one column at a time: memory stays at n/8 bytes per temporary
        out |= cols[:, j].to(torch.uint8) << j
    return out


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_bits``: the bool tensor of ``shape``."""
    n = math.prod(shape)
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:n].bool().reshape(shape)


def save_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> Path:
    """Write bool ``masks`` bit-packed to a safetensors file, atomically; returns the path.

    Every mask is held in memory at once; ``MaskWriter`` writes the same bytes one mask at a time.
    """
    from safetensors.torch import save

    path = Path(path)
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must be a bool tensor (True = kept), got {m.dtype}")
    text = _header_text({name: tuple(m.shape) for name, m in masks.items()}, metadata)
    data = save({name: pack_bits(m) for name, m in sorted(masks.items())}, metadata={META_KEY: text})
    _write_atomic(path, data)
    return path


def _header_text(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping | None) -> str:
    """The one __metadata__ value of a mask file (see the table above)."""
    if "__metadata__" in shapes:
        raise ValueError("'__metadata__' is reserved by safetensors and cannot name a mask")
    header = {"bit_order": "lsb-first", "format": FORMAT, "metadata": dict(metadata or {}),
              "shapes": {name: list(shape) for name, shape in shapes.items()}, "version": VERSION}
    try:
        return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"mask file metadata must be plain JSON: {e}") from None


class MaskWriter:
    """Writes a mask file one mask at a time: the bytes ``save_masks`` writes for the same masks.

    ``MaskWriter(path, shapes, metadata)`` lays the file out from the masks' shapes alone (each
    packed mask's place is known before any is packed), so ``add(name, keep)`` packs a mask and
    writes it at once, in any order, and memory holds one packed mask at a time, never all of
    them. The file grows under a hidden temporary name beside ``path``; ``close()`` checks that
    every mask was added and renames it into place, ``abort()`` removes it. As a context manager
    it closes on success and aborts on an exception. ``add`` may be called from several threads
    for different masks (each write lands at its own offset).

    The header is written here rather than by ``llm_prune.writer.ShardFile``: safetensors writes
    non-ASCII names and metadata as UTF-8, ShardFile escapes them (``\\uXXXX``), and a mask file
    must be byte for byte what ``save_masks`` writes.
    """

    def __init__(self, path: str | os.PathLike, shapes: Mapping[str, Sequence[int]], metadata: Mapping | None = None):
        from ..writer import _allocate, _pwrite_all

        self.path = Path(path)
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        raw, self._spans, size = _layout(self.shapes, _header_text(self.shapes, metadata))
        self._start = 8 + len(raw)
        self._left = set(self.shapes)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = temp_file(self.path, ".tmp")
        self._fd = fd
        try:
            _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
            if size > self._start:
                _allocate(fd, size)  # a full disk fails here, before any mask is packed
        except BaseException:
            self.abort()
            raise

    def add(self, name: str, keep: torch.Tensor) -> None:
        """Pack ``keep`` (bool, True = kept, the shape given for ``name``) and write it in place."""
        shape = self.shapes.get(name)
        if shape is None:
            raise ValueError(f"{name!r} is not one of the {len(self.shapes)} masks this file was laid out for")
        if keep.dtype != torch.bool:
            raise ValueError(f"mask {name!r} must be a bool tensor (True = kept), got {keep.dtype}")
        if tuple(keep.shape) != shape:
            raise ValueError(f"mask {name!r} has shape {tuple(keep.shape)}, the file was laid out for {shape}")
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"{self.path}: the mask writer is already closed")
            if name not in self._left:
                raise ValueError(f"mask {name!r} was already added")
            self._left.discard(name)
        from ..writer import _pwrite_all

        at, n = self._spans[name]
        if n:
            _pwrite_all(self._fd, memoryview(pack_bits(keep).numpy()), self._start + at)

    def close(self) -> Path:
        """Publish the file under ``path``; with a mask never added, remove it and raise ValueError."""
        if self._left:
            missing = sorted(self._left)
            self.abort()
            raise ValueError(f"{self.path}: {len(missing)} mask(s) never added, e.g. {missing[0]!r}; nothing written")
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the unfinished file (harmless after close or a previous abort)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> "MaskWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _layout(shapes: Mapping[str, tuple[int, ...]], text: str) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """(safetensors header bytes, {name: (data offset, bytes)}, file size) as safetensors lays out
    uint8 tensors: metadata first, tensors by name, UTF-8 JSON without spaces, padded with spaces
    to a multiple of 8 bytes."""
    header: dict[str, object] = {"__metadata__": {META_KEY: text}}
    spans, end = {}, 0
    for name in sorted(shapes):
        n = (math.prod(shapes[name]) + 7) // 8
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [end, end + n]}
        spans[name] = (end, n)
        end += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, spans, 8 + len(raw) + end


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_masks(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``save_masks``: ({name: bool tensor}, metadata).

    Anything that is not such a file, or disagrees with its own header, raises ValueError with a
    one-line message naming the file.
    """
    with MaskReader(path) as f:
        return {name: f.read(name) for name in f.shapes}, f.metadata


class MaskReader:
    """A mask file opened to read one mask at a time: ``shapes`` ({name: shape}, header order),
    ``metadata`` (the user's), ``read(name)`` → bool tensor. Opening checks the header against the
    stored tensors (names, byte counts), so a damaged file fails before any mask is read; errors
    are one-line ValueErrors naming the file (FileNotFoundError when there is none)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no mask file at {self.path}")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            meta = self._file.metadata() or {}
            stored = {name: self._file.get_slice(name) for name in self._file.keys()}
            sizes = {name: (s.get_dtype(), s.get_shape()) for name, s in stored.items()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers/data
            raise ValueError(f"{self.path}: not a readable safetensors file ({_first_line(e)})") from None
        header = _read_header(self.path, meta)
        self.shapes = {name: tuple(shape) for name, shape in header["shapes"].items()}
        self.metadata = header["metadata"]
        for name, shape in self.shapes.items():
            _check_stored(self.path, name, sizes.get(name), shape)
        extra = sorted(set(sizes) - set(self.shapes))
        if extra:
            raise ValueError(f"{self.path}: tensor {extra[0]!r} has no shape in the header")

    def read(self, name: str) -> torch.Tensor:
        try:
            packed = self._file.get_tensor(name)
        except Exception as e:
            raise ValueError(f"{self.path}: mask {name!r} is not readable ({_first_line(e)})") from None
        return _unpack_checked(self.path, name, packed, self.shapes[name])

    def close(self) -> None:
        self._file = None  # safetensors releases its mapping when the handle goes

    def __enter__(self) -> "MaskReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_header(path: Path, meta: Mapping[str, str]) -> dict:
    if META_KEY not in meta:
        raise ValueError(f"{path}: not an llm-prune mask file (no {META_KEY!r} metadata)")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: mask header is not JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} llm-prune mask file")
    shapes, user = header.get("shapes"), header.get("metadata")
    if not isinstance(shapes, dict) or not isinstance(user, dict):
        raise ValueError(f"{path}: mask header lacks 'shapes' or 'metadata'")
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: mask {name!r} has a bad shape {shape!r}")
    return header


def _check_stored(path: Path, name: str, stored: tuple[str, list[int]] | None, shape: tuple[int, ...]) -> None:
    """The header's shape of ``name`` against the dtype and shape safetensors stores for it."""
    if stored is None:
        raise ValueError(f"{path}: mask {name!r} is in the header but not in the file")
    n = math.prod(shape)
    if stored != ("U8", [(n + 7) // 8]):
        raise ValueError(f"{path}: mask {name!r} should be {(n + 7) // 8} uint8 bytes for shape {shape}, "
                         f"found {stored[0]} of shape {tuple(stored[1])}")


def _unpack_checked(path: Path, name: str, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"{path}: mask {name!r} should be {(n + 7) // 8} uint8 bytes for shape {shape}, "
                         f"found {packed.dtype} of shape {tuple(packed.shape)}")
    if n % 8 and int(packed[-1]) >> (n % 8):
        raise ValueError(f"{path}: mask {name!r} has set bits past its last element")
    return unpack_bits(packed, shape)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
