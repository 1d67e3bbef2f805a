"""On-disk sparse formats: dense, bitmask and packed 2:4, as plain safetensors tensors.

One API serves the exporter and the loader::

    stored, meta = encode(name, w, fmt)        # tensors to write + __metadata__ entries (str -> str)
    w2 = decode(name, stored, meta)            # bit-identical to w
    stored, meta = encode_all(tensors, formats)   # a whole shard at once
    tensors = decode_all(stored, meta)            # every original tensor of a shard back

Formats, for a 2-D weight of R rows and C columns (C is the input dimension of nn.Linear):

* ``dense``   -- the tensor itself under its own name, no metadata: loadable by anything.
* ``bitmask`` -- ``NAME.values``: every bitwise non-zero element, row-major, 1-D;
  ``NAME.mask``: uint8 [R, ceil(C/8)], bit i (LSB first) of byte j is column 8j+i of the row,
  padding bits are 0; ``NAME.row_offsets``: int64 [R+1], cumulative non-zero counts (row r's
  values are ``values[row_offsets[r]:row_offsets[r+1]]``). Any sparsity, any pattern.
* ``packed24`` -- ``NAME.values``: [R, C/2] in the weight dtype, the two kept elements of every
  group of 4 consecutive columns, in column order; ``NAME.meta``: uint8 [R, ceil(C/8)], the
  2-bit in-group position of each kept element. Bit layout of one metadata byte j of a row
  (groups g = 2j and 2j+1, i.e. columns 8j .. 8j+7)::

      bits | 7 6     | 5 4     | 3 2     | 1 0
      -----+---------+---------+---------+---------
      what | hi(g+1) | lo(g+1) | hi(g)   | lo(g)        lo < hi, positions 0..3 within the group

  ``values[r, 2g]`` sits at column 4g + lo(g), ``values[r, 2g+1]`` at 4g + hi(g). A trailing
  odd group leaves bits 7..4 of the last byte 0. This is CUTLASS's 2:4 metadata order (one
  nibble ``lo | hi << 2`` per group, nibbles little-endian), so two metadata bytes read as a
  little-endian int16 are one element of CUTLASS's metadata before its reordering, which is
  what lets ``semi_structured`` build sparse tensor-core weights without a dense round trip.
  A group with fewer than two non-zeros stores explicit zeros at the positions CUTLASS would
  pick (its encoding table, reproduced in ``_positions``), so ``values`` equals CUTLASS's own
  compression of the dense tensor element for element.

"Non-zero" means a non-zero bit pattern: -0.0 is kept as a value, so every format round-trips
bit for bit (pruning writes +0.0, so real pruned weights never carry -0.0 where they were cut).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from llm_prune.errors import UserError

FORMATS = ("dense", "bitmask", "packed24")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Key in a safetensors file's __metadata__ that describes the encoded tensor NAME.
META_PREFIX = "llm_prune.encoding:"
SUFFIXES = {"dense": ("",), "bitmask": (".values", ".mask", ".row_offsets"), "packed24": (".values", ".meta")}
_VERSION = "1"


# -- public API ------------------------------------------------------------------------------

def check_encodable(name: str, shape, dtype: torch.dtype, fmt: str) -> None:
    """Raise UserError when ``fmt`` cannot hold a tensor of this shape and dtype (headers only)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "dense":
        return
    if dtype not in _INT_VIEW:
        raise UserError(f"{name} has dtype {dtype}; the {fmt} format takes fp32, fp16 or bf16 (store it dense)")
    if len(shape) != 2:
        raise UserError(f"{name} has shape {tuple(shape)}; the {fmt} format takes 2-D weights (store it dense)")
    if fmt == "packed24" and shape[1] % 4:
        raise UserError(f"{name} has {shape[1]} columns, not a multiple of 4: it cannot be stored as packed24 "
                        "(use --format bitmask)")


def encode(name: str, w: torch.Tensor, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stored tensors (under names derived from ``name``) and the ``__metadata__`` entries for ``w``.

    ``dense`` stores ``w`` unchanged with no metadata. Raises UserError when ``w`` does not fit
    the format (wrong shape or dtype, or more than 2 non-zeros in a group of 4 for packed24).
    """
    check_encodable(name, w.shape, w.dtype, fmt)
    if fmt == "dense":
        return {name: w}, {}
    w = w.contiguous()
    parts = _encode_bitmask(w) if fmt == "bitmask" else _encode_packed24(name, w)
    stored = {name + suffix: t for suffix, t in zip(SUFFIXES[fmt], parts)}
    info = {"format": fmt, "shape": list(w.shape), "dtype": _dtype_name(w.dtype), "version": _VERSION}
    return stored, {META_PREFIX + name: json.dumps(info)}


def decode(name: str, stored: dict[str, torch.Tensor], meta: dict[str, str]) -> torch.Tensor:
    """The original tensor ``name`` from a file's stored tensors and ``__metadata__``.

    ``meta`` may be the whole metadata dict of the file; a name without an entry is dense.
    """
    info = tensor_info(name, meta)
    if info is None:
        if name not in stored:
            raise UserError(f"{name} is neither stored nor described in this file's metadata")
        return stored[name]
    fmt, shape, dtype = info["format"], tuple(info["shape"]), DTYPES[info["dtype"]]
    try:
        parts = [stored[name + suffix] for suffix in SUFFIXES[fmt]]
    except KeyError as e:
        raise UserError(f"{name} is stored as {fmt} but {e.args[0]} is missing: the file is incomplete") from None
    if fmt == "bitmask":
        return _decode_bitmask(name, *parts, shape, dtype)
    return _decode_packed24(name, *parts, shape, dtype)


def tensor_info(name: str, meta: dict[str, str] | None) -> dict | None:
    """The parsed metadata entry of ``name`` (format, shape, dtype, version), or None if dense."""
    raw = (meta or {}).get(META_PREFIX + name)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        ok = info["format"] in FORMATS and info["dtype"] in DTYPES and len(info["shape"]) == 2
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"the metadata of {name} is not a valid llm-prune encoding: {raw!r}")
    if info.get("version") != _VERSION:
        raise UserError(f"{name} uses encoding version {info.get('version')}; this llm-prune reads "
                        f"version {_VERSION}: upgrade llm-prune")
    return info


def encode_all(tensors: dict[str, torch.Tensor], formats: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode a shard: ``formats`` maps names to a format; names not in it stay dense."""
    stored, meta = {}, {}
    for name, w in tensors.items():
        s, m = encode(name, w, formats.get(name, "dense"))
        clash = stored.keys() & s.keys()
        if clash:
            raise UserError(f"stored name {sorted(clash)[0]} is produced twice in one shard")
        stored.update(s)
        meta.update(m)
    return stored, meta


def decode_all(stored: dict[str, torch.Tensor], meta: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Every original tensor of a shard: encoded ones decoded, the rest passed through."""
    encoded = [k[len(META_PREFIX):] for k in (meta or {}) if k.startswith(META_PREFIX)]
    out, used = {}, set()
    for name in encoded:
        out[name] = decode(name, stored, meta)
        used.update(name + s for s in SUFFIXES[tensor_info(name, meta)["format"]])
    for key, t in stored.items():
        if key not in used:
            out[key] = t
    return out


def stored_names(name: str, fmt: str) -> list[str]:
    """Names under which ``encode(name, ..., fmt)`` stores its tensors (for index weight maps)."""
    return [name + s for s in SUFFIXES[fmt]]


def size_formula(shape, dtype: torch.dtype, sparsity: float, fmt: str) -> int:
    """Expected bytes of the stored tensor data (safetensors header not included).

    ``sparsity`` is the fraction of zeros; bitmask stores ``numel - round(sparsity * numel)``
    values (the count a per-matrix prune leaves). packed24 ignores it: it always stores half.
    """
    numel = math.prod(shape)
    item = torch.empty((), dtype=dtype).element_size()
    if fmt == "dense":
        return numel * item
    check_encodable("tensor", shape, dtype, fmt)
    rows, cols = shape
    mask_bytes = rows * ((cols + 7) // 8)
    if fmt == "bitmask":
        nnz = numel - int(round(sparsity * numel))
        return nnz * item + mask_bytes + 8 * (rows + 1)
    return numel // 2 * item + mask_bytes


# -- bitmask ---------------------------------------------------------------------------------

def _encode_bitmask(w: torch.Tensor):
    ints = w.view(_INT_VIEW[w.dtype])  # integer views: copies move bits, never float values
    keep = ints != 0
    values = ints[keep].view(w.dtype)  # row-major order
    # numpy's packbits is a tight C loop, ~10x faster than shifting and summing in torch.
    mask = torch.from_numpy(np.packbits(keep.numpy(), axis=1, bitorder="little"))
    offsets = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=offsets[1:])
    return values, mask, offsets


def _decode_bitmask(name, values, mask, offsets, shape, dtype):
    rows, cols = shape
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (rows, (cols + 7) // 8) or values.dtype != dtype \
            or offsets.shape != (rows + 1,):
        raise UserError(f"{name}: bitmask parts have shapes/dtypes that do not match its metadata (corrupt file)")
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), axis=1, count=cols, bitorder="little")).view(torch.bool)
    counts = keep.sum(1)
    if int(counts.sum()) != values.numel() or not torch.equal(offsets[1:] - offsets[:-1], counts) or offsets[0] != 0:
        raise UserError(f"{name}: bitmask, row offsets and values disagree (corrupt file)")
    out = torch.zeros(shape, dtype=_INT_VIEW[dtype])
    out[keep] = values.view(_INT_VIEW[dtype])
    return out.view(dtype)


# -- packed 2:4 ------------------------------------------------------------------------------

def _positions(nz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-group positions (lo, hi) of the two stored elements of each group of 4 flags.

    CUTLASS's encoding (torch/sparse/_semi_structured_conversions.py): the non-zeros when there
    are two; padded with zeros at fixed spots otherwise. [F,F,F,F] -> (2,3), [F,F,F,T] -> (2,3),
    [F,F,T,F] -> (2,3), [F,T,F,F] -> (1,2), [T,F,F,F] -> (0,2). Callers reject > 2 non-zeros.
    """
    m0, m1, _, m3 = nz.unbind(-1)
    e0, e1, e2 = m0 & m1, ~m0 & m1, ~m0 & ~m1
    lo = e1.to(torch.uint8) | (e2.to(torch.uint8) << 1)
    hi = (e0 | e2 | m3).to(torch.uint8) | ((e1 | ~m1).to(torch.uint8) << 1)
    return lo, hi


def _encode_packed24(name: str, w: torch.Tensor):
    rows, cols = w.shape
    bits = w.view(_INT_VIEW[w.dtype]).view(rows, cols // 4, 4)
    nz = bits != 0
    over = nz.sum(-1) > 2
    if bool(over.any()):
        r, g = (int(i) for i in over.nonzero()[0])
        raise UserError(f"{name} is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold more than 2 "
                        f"non-zeros ({int(over.sum())} such groups); prune with --pattern 2:4 or use --format bitmask")
    lo, hi = _positions(nz)
    idx = torch.stack((lo, hi), -1)
    values = bits.gather(-1, idx.long()).view(rows, cols // 2).view(w.dtype)
    return values, _pack_nibbles(lo | (hi << 2))


def _pack_nibbles(nib: torch.Tensor) -> torch.Tensor:
    """uint8 [R, G] of 4-bit values -> uint8 [R, ceil(G/2)], group 2j in the low nibble of byte j."""
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _decode_packed24(name, values, meta, shape, dtype):
    rows, cols = shape
    groups = cols // 4
    if values.dtype != dtype or tuple(values.shape) != (rows, cols // 2) or meta.dtype != torch.uint8 \
            or tuple(meta.shape) != (rows, (cols + 7) // 8):
        raise UserError(f"{name}: packed24 parts have shapes/dtypes that do not match its metadata (corrupt file)")
    nib = torch.stack((meta & 0xF, meta >> 4), -1).view(rows, -1)[:, :groups]
    lo, hi = nib & 3, nib >> 2
    if bool((lo >= hi).any()):
        raise UserError(f"{name}: packed24 metadata has a group whose positions are not increasing (corrupt file)")
    int_dtype = _INT_VIEW[dtype]
    out = torch.zeros(rows, groups, 4, dtype=int_dtype, device=values.device)
    out.scatter_(-1, torch.stack((lo, hi), -1).long(), values.view(int_dtype).view(rows, groups, 2))
    return out.view(rows, cols).view(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
