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
import sys

import numba as nb
import numpy as np
import torch

from llm_prune.errors import UserError
from llm_prune.magnitude import LAYOUT
from llm_prune.kernels import numba_start

numba_start.start()  # numba loads its registries once, without scipy.linalg (see numba_start)

if sys.byteorder != "little":  # the packers read groups of lanes as little-endian machine words
    raise ImportError("llm_prune.kernels.formats needs a little-endian machine")

FORMATS = ("dense", "bitmask", "packed24")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INT_VIEW = {d: lay.int_dtype for d, lay in LAYOUT.items()}
# The one key in a safetensors file's __metadata__ that describes its encoded tensors: a JSON
# object {NAME: {"format", "shape", "dtype", "version"}} with sorted keys. One key, not one per
# tensor: safetensors writes __metadata__ from a hash map in random order, so several keys would
# make identical runs write different bytes.
META_KEY = "llm_prune.encodings"
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
    return stored, _meta({name: info})


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


def encoded_names(meta: dict[str, str] | None) -> list[str]:
    """Names of the tensors a file's ``__metadata__`` describes as encoded."""
    return list(_encodings(meta))


def _encodings(meta: dict[str, str] | None) -> dict:
    raw = (meta or {}).get(META_KEY)
    if raw is None:
        return {}
    try:
        table = json.loads(raw)
        if isinstance(table, dict):
            return table
    except ValueError:
        pass
    raise UserError(f"the {META_KEY} metadata is not valid JSON: {raw[:80]!r}")


def _meta(table: dict) -> dict[str, str]:
    return {META_KEY: json.dumps(table, sort_keys=True)} if table else {}


def tensor_info(name: str, meta: dict[str, str] | None) -> dict | None:
    """The parsed metadata entry of ``name`` (format, shape, dtype, version), or None if dense."""
    info = _encodings(meta).get(name)
    if info is None:
        return None
    try:
        ok = info["format"] in FORMATS and info["dtype"] in DTYPES and len(info["shape"]) == 2
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"the metadata of {name} is not a valid llm-prune encoding: {info!r}")
    if info.get("version") != _VERSION:
        raise UserError(f"{name} uses encoding version {info.get('version')}; this llm-prune reads "
                        f"version {_VERSION}: upgrade llm-prune")
    return info


def encode_all(tensors: dict[str, torch.Tensor], formats: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode a shard: ``formats`` maps names to a format; names not in it stay dense."""
    stored, table = {}, {}
    for name, w in tensors.items():
        s, m = encode(name, w, formats.get(name, "dense"))
        clash = stored.keys() & s.keys()
        if clash:
            raise UserError(f"stored name {sorted(clash)[0]} is produced twice in one shard")
        stored.update(s)
        table.update(_encodings(m))
    return stored, _meta(table)


def decode_all(stored: dict[str, torch.Tensor], meta: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Every original tensor of a shard: encoded ones decoded, the rest passed through."""
    encoded = encoded_names(meta)
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


# -- shared machinery --------------------------------------------------------------------------
# The packers work on integer views (bit patterns only, never float arithmetic). packed24 both
# ways and bitmask decoding are numba kernels, parallel over rows, one pass in and one out
# instead of the several temporaries numpy's vector passes need (BENCHMARKS.md, "Sparse formats").

def _ints(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a CPU float tensor as a numpy integer array (no copy when contiguous)."""
    return t.detach().cpu().contiguous().view(_INT_VIEW[t.dtype]).numpy()


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


# -- bitmask ---------------------------------------------------------------------------------

def _encode_bitmask(w: torch.Tensor):
    # numpy over chunks of rows (their temporaries stay in cache): np.compress and np.packbits
    # beat a numba loop here (the kept/pruned branch is a coin flip at 50%).
    a = _ints(w)
    rows, cols = a.shape
    mask = np.empty((rows, (cols + 7) // 8), np.uint8)
    counts = np.empty(rows, np.int64)
    parts = []
    step = max(1, (1 << 18) // max(cols, 1))
    for r0 in range(0, rows, step):
        b = a[r0:r0 + step]
        keep = b != 0
        parts.append(np.compress(keep.ravel(), b.ravel()))  # row-major order
        mask[r0:r0 + step] = np.packbits(keep, axis=1, bitorder="little")
        counts[r0:r0 + step] = np.count_nonzero(keep, axis=1)
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    values = np.concatenate(parts) if parts else np.empty(0, a.dtype)
    return torch.from_numpy(values).view(w.dtype), torch.from_numpy(mask), torch.from_numpy(offsets)


def _decode_bitmask(name, values, mask, offsets, shape, dtype):
    rows, cols = shape
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (rows, (cols + 7) // 8) or values.dtype != dtype \
            or values.dim() != 1 or tuple(offsets.shape) != (rows + 1,) or offsets.dtype != torch.int64:
        raise UserError(f"{name}: bitmask parts have shapes/dtypes that do not match its metadata (corrupt file)")
    m, off, v = mask.cpu().contiguous().numpy(), offsets.cpu().contiguous().numpy(), _ints(values)
    # Popcounts of whole bytes: set padding bits count too, so they are caught as corruption.
    counts = _POPCOUNT[m].sum(1) if rows else np.zeros(0, np.int64)
    if off[0] != 0 or off[-1] != v.size or not np.array_equal(np.diff(off), counts):
        raise UserError(f"{name}: bitmask, row offsets and values disagree (corrupt file)")
    out = np.empty((rows, cols), v.dtype)
    _bitmask_scatter(v, m, off, out)
    return torch.from_numpy(out).view(dtype)


@nb.njit(parallel=True, cache=True, nogil=True)
def _bitmask_scatter(values, mask, offsets, out):
    rows, cols = out.shape
    zero = out.dtype.type(0)
    for r in nb.prange(rows):
        k = offsets[r]
        for c in range(cols):
            if (mask[r, c >> 3] >> (c & 7)) & 1:
                out[r, c] = values[k]
                k += 1
            else:
                out[r, c] = zero


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


def _frozen(x) -> np.ndarray:
    x = np.asarray(x)
    x.setflags(write=False)
    return x


def _tables():
    """Lookup tables indexed by a group's 4-bit non-zero code (bit i = position i non-zero).
    Built from ``_positions`` so there is one source of truth."""
    flags = ((torch.arange(16)[:, None] >> torch.arange(4)) & 1).bool()
    lo, hi = (p.long().numpy() for p in _positions(flags))
    return dict(lo=_frozen(lo), hi=_frozen(hi), over=_frozen(flags.sum(1).numpy() > 2))


_T = _tables()


def _encode_packed24(name: str, w: torch.Tensor):
    a = _ints(w)
    rows, cols = a.shape
    values = np.empty((rows, cols // 2), a.dtype)
    meta = np.zeros((rows, (cols + 7) // 8), np.uint8)
    bad = _pack24(a, values, meta, _T["lo"], _T["hi"], _T["over"])
    r = int(np.flatnonzero(bad >= 0)[0]) if (bad >= 0).any() else -1
    if r >= 0:
        g = int(bad[r])
        raise UserError(f"{name} is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold more than 2 "
                        "non-zeros; prune with --pattern 2:4 or use --format bitmask")
    return torch.from_numpy(values).view(w.dtype), torch.from_numpy(meta)


@nb.njit(parallel=True, cache=True, nogil=True)
def _pack24(a, values, meta, lo_t, hi_t, over_t):
    """Kept pair and metadata nibble (lo | hi << 2) of every group; per row, the first group with
    more than two non-zeros (-1: none)."""
    rows, cols = a.shape
    bad = np.full(rows, -1, np.int64)
    for r in nb.prange(rows):
        for g in range(cols // 4):
            c = 4 * g
            code = np.int64(a[r, c] != 0) | (np.int64(a[r, c + 1] != 0) << 1) \
                | (np.int64(a[r, c + 2] != 0) << 2) | (np.int64(a[r, c + 3] != 0) << 3)
            if over_t[code]:
                if bad[r] < 0:
                    bad[r] = g
                continue
            lo, hi = lo_t[code], hi_t[code]
            values[r, 2 * g] = a[r, c + lo]
            values[r, 2 * g + 1] = a[r, c + hi]
            meta[r, g >> 1] |= np.uint8(lo | (hi << 2)) << (4 * (g & 1))
    return bad


def _check_packed24_parts(name, values, meta, shape, dtype):
    rows, cols = shape
    if values.dtype != dtype or tuple(values.shape) != (rows, cols // 2) or meta.dtype != torch.uint8 \
            or tuple(meta.shape) != (rows, (cols + 7) // 8) or cols % 4:
        raise UserError(f"{name}: packed24 parts have shapes/dtypes that do not match its metadata (corrupt file)")


def _decode_packed24(name, values, meta, shape, dtype):
    if values.device.type != "cpu":
        return _decode_packed24_torch(name, values, meta, shape, dtype)
    _check_packed24_parts(name, values, meta, shape, dtype)
    rows, cols = shape
    v = _ints(values)
    out = np.empty((rows, cols), v.dtype)
    if not _unpack24(v, meta.contiguous().numpy(), out):
        raise UserError(f"{name}: packed24 metadata has a group whose positions are not increasing (corrupt file)")
    return torch.from_numpy(out).view(dtype)


@nb.njit(parallel=True, cache=True, nogil=True)
def _unpack24(values, meta, out):
    """Scatter every kept pair to its positions, zeros elsewhere; False if a nibble has lo >= hi."""
    rows, cols = out.shape
    ok = np.ones(rows, np.bool_)
    zero = out.dtype.type(0)
    for r in nb.prange(rows):
        for g in range(cols // 4):
            nib = (meta[r, g >> 1] >> (4 * (g & 1))) & 0xF
            lo, hi = nib & 3, nib >> 2
            c = 4 * g
            out[r, c] = zero
            out[r, c + 1] = zero
            out[r, c + 2] = zero
            out[r, c + 3] = zero
            if lo >= hi:
                ok[r] = False
                continue
            out[r, c + lo] = values[r, 2 * g]
            out[r, c + hi] = values[r, 2 * g + 1]
    return ok.all()


def _decode_packed24_torch(name, values, meta, shape, dtype):
    """Device-agnostic torch version (used on GPU before cuSPARSELt compression); same result."""
    _check_packed24_parts(name, values, meta, shape, dtype)
    rows, cols = shape
    groups = cols // 4
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
