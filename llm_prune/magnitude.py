"""Magnitude pruning, the reference: keys, histograms, the k-th key, the tie order, exact thresholds.

A keep-mask is a bool tensor, True = weight kept. Everything here is plain torch; the numba
kernels of ``llm_prune.kernels.magnitude`` compute the same histograms and prune by the same
rules in place, and are used as a drop-in wherever they can take a tensor (``kernels_for``). Tests
check every kernel bit for bit against the functions here.

**Keys.** The bit pattern of |x| read as an integer orders exactly like |x| for IEEE floats (sign
bit cleared, exponent above mantissa), so magnitudes are compared as integers:

    weights | int view | sign cleared with | key of +inf | histogram bin of a key
    --------+----------+-------------------+-------------+--------------------------------------
    fp16    | int16    | 0x7FFF            | 0x7C00      | the key (2^15 bins hold every key)
    bf16    | int16    | 0x7FFF            | 0x7F80      | the key
    fp32    | int32    | 0x7FFFFFFF        | 0x7F800000  | key >> 16; the low 16 bits of the one
            |          |                   |             | bin that holds a threshold come from a
            |          |                   |             | second pass over that bin ("wide" keys)

A weight is inf or nan exactly when its key is at least the key of +inf.

**Thresholds.** Pruning k weights out of a set of tensors prunes every weight whose key is below
the k-th smallest key, and the first ``ties`` weights whose key equals it, in visiting order:
tensors in the order given (blocks in order, names sorted within a block), then flat index. So
runs are reproducible to the byte, masks are nested across sparsities, and pruning by a stable
argsort of |w| gives the same mask (which is how the tests check it). The k-th key over any
number of tensors is found exactly in bounded memory from their key histograms (``KeyTable``:
one per tensor, stored sparsely), never by concatenating or sorting them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from .config import Sparsity
from .errors import UserError

BINS = 1 << 15  # histogram bins: every 16-bit key, or the high half of a wide key
LOW_BITS = 16  # a wide key is (bin << LOW_BITS) | low


@dataclass(frozen=True)
class KeyLayout:
    int_dtype: torch.dtype
    sign_clear: int
    inf_key: int

    @property
    def wide(self) -> bool:
        return self.int_dtype == torch.int32


LAYOUT = {
    torch.float16: KeyLayout(torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: KeyLayout(torch.int16, 0x7FFF, 0x7F80),
    torch.float32: KeyLayout(torch.int32, 0x7FFFFFFF, 0x7F800000),
}


class NonFinite(ValueError):
    """A tensor holds inf or nan (the caller names the tensor and its file)."""


def layout(dtype: torch.dtype) -> KeyLayout:
    try:
        return LAYOUT[dtype]
    except KeyError:
        raise UserError(f"weights of dtype {dtype} are not supported (fp16, bf16 or fp32)") from None


def kernels_for(x: torch.Tensor):
    """The numba kernels when they can take ``x`` (a contiguous CPU float tensor), else None.
    Imported on first use, so only commands that prune pay numba's start-up."""
    if not x.is_floating_point():
        return None
    from .kernels import magnitude as K

    return K if K.supported(x) else None


def select_kernels(score: torch.Tensor):
    """The compiled k-smallest selections (``kernels/select.py``) when they can take ``score`` (a
    2-D fp32 CPU tensor), else None: the callers' torch selections give the same masks."""
    try:
        from .kernels import select
    except ImportError:  # numba missing
        return None
    return select if select.supported(score) else None


# -- keys -------------------------------------------------------------------------------------------
def magnitude_key(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer tensor ordered exactly like ``x.abs()`` (same shape, one pass, no float math)."""
    lay = layout(x.dtype)
    return torch.bitwise_and(x.view(lay.int_dtype), lay.sign_clear, out=out)


def as_key(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it already is a magnitude key (an integer tensor), else its key."""
    return magnitude_key(x) if x.is_floating_point() else x


def key_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of ``magnitude_key`` for weights of ``dtype``."""
    return layout(dtype).int_dtype


def inf_key(dtype: torch.dtype) -> int:
    """Key of +inf: a weight is inf or nan exactly when its key is at least this."""
    return layout(dtype).inf_key


def key_to_value(key: int, dtype: torch.dtype) -> float:
    """The magnitude a key stands for (used to report thresholds)."""
    return float(torch.tensor([key], dtype=layout(dtype).int_dtype).view(dtype)[0])


def all_finite(x: torch.Tensor) -> bool:
    """True when no element is inf or nan: a single max over the magnitude keys (no boolean
    tensor of x's size, as ``torch.isfinite`` makes), or torch's check for other dtypes."""
    if x.numel() == 0:
        return True
    if x.dtype not in LAYOUT:
        return bool(torch.isfinite(x).all())
    K = kernels_for(x)
    top = K.max_key(x) if K is not None else int(magnitude_key(x).max())
    return top < inf_key(x.dtype)


def check_finite(x: torch.Tensor) -> None:
    if not all_finite(x):
        raise NonFinite()


# -- histograms -------------------------------------------------------------------------------------
def histogram(x: torch.Tensor, serial: bool = False) -> torch.Tensor:
    """int64 counts of ``x``'s keys (``x`` floats or their keys) in ``BINS`` bins; wide keys by
    their high half. ``serial``: the kernel on the calling thread alone (``key_histogram``)."""
    K = kernels_for(x)
    if K is not None:
        return torch.from_numpy(K.key_histogram(x, serial))
    key = as_key(x).reshape(-1)
    high = (key >> LOW_BITS).to(torch.int16) if key.dtype == torch.int32 else key
    return torch.bincount(high, minlength=BINS)


def bucket_histogram(x: torch.Tensor, high: int) -> torch.Tensor:
    """Wide keys only: int64 counts of the low 16 bits of the keys whose high half is ``high``."""
    K = kernels_for(x)
    if K is not None:
        return torch.from_numpy(K.bucket_histogram(x, high))
    key = as_key(x).reshape(-1)
    in_bucket = key[(key >> LOW_BITS) == high]
    return torch.bincount((in_bucket & ((1 << LOW_BITS) - 1)).to(torch.int32), minlength=1 << LOW_BITS)


def checked_histogram(x: torch.Tensor, serial: bool = False) -> torch.Tensor:
    """``histogram``, refusing inf and nan (``NonFinite``): their keys fill the top bins."""
    return _finite(histogram(x, serial), x.dtype)


def _finite(hist: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lay = layout(dtype)
    if hist[lay.inf_key >> (LOW_BITS if lay.wide else 0):].any():
        raise NonFinite()
    return hist


@dataclass(frozen=True)
class KeyTable:
    """The histogram of one tensor's keys, stored sparsely: ``keys`` ascending (the occupied
    bins), ``counts`` > 0. A weight matrix occupies a few thousand of the 2^15 bins, so a table
    is tens of KiB whatever the tensor's size. ``wide``: bins are high halves of 31-bit keys."""

    wide: bool
    numel: int
    keys: torch.Tensor  # int64
    counts: torch.Tensor  # int64, same length

    def select(self, k: int) -> tuple[int, int]:
        """(bin holding the k-th smallest key (1-based), number of weights in bins below it)."""
        return select(self.counts, k, self.keys)

    def count_at(self, key: int) -> int:
        i = int(torch.searchsorted(self.keys, torch.tensor([key]))[0])
        return int(self.counts[i]) if i < len(self.keys) and int(self.keys[i]) == key else 0


def table_of_histogram(counts: torch.Tensor, wide: bool) -> KeyTable:
    counts = torch.as_tensor(counts).to(torch.int64)
    occupied = counts.nonzero().squeeze(1)
    return KeyTable(wide, int(counts.sum()), occupied, counts[occupied])


def key_table(x: torch.Tensor, *, checked: bool = False, serial: bool = False) -> KeyTable:
    """The table of one tensor (floats or keys): one histogram pass; ``checked`` refuses inf/nan;
    ``serial`` counts on the calling thread alone."""
    x = x.detach().cpu()
    wide = layout(x.dtype).wide if x.is_floating_point() else x.dtype == torch.int32
    return table_of_histogram(checked_histogram(x, serial) if checked else histogram(x, serial), wide)


def key_table_of_pieces(pieces, dtype: torch.dtype) -> KeyTable:
    """``key_table(checked=True, serial=True)`` of a float tensor given as consecutive pieces
    (``CheckpointReader.read_mapped_pieces``): only a piece in memory at a time. ``dtype``: the
    pieces' own, which an empty tensor (no pieces) cannot tell."""
    hist = torch.zeros(BINS, dtype=torch.int64)
    for piece in pieces:
        hist += histogram(piece, serial=True)
        dtype = piece.dtype
    return table_of_histogram(_finite(hist, dtype), layout(dtype).wide)


def bucket_table(x: torch.Tensor, high: int) -> KeyTable:
    """The table of the low halves of ``x``'s wide keys in bin ``high`` (the second pass)."""
    x = x.detach().cpu()
    return table_of_histogram(bucket_histogram(x, high), wide=False)


def merge(tables: list[KeyTable]) -> KeyTable:
    """One table for the union of several tensors' weights (all of one width)."""
    if len({t.wide for t in tables}) > 1:
        raise UserError("a global threshold needs targets of one width (fp16/bf16, or fp32), found both")
    dense = torch.zeros(1 << LOW_BITS, dtype=torch.int64)
    for t in tables:
        dense.index_add_(0, t.keys, t.counts)
    return table_of_histogram(dense, tables[0].wide if tables else False)


def quantile_keys(table: KeyTable, steps: int = 100) -> list[int]:
    """The bin at every 1/steps of the weights (index 0: the smallest, ``steps``: the largest)."""
    if table.numel == 0:
        return []
    ks = torch.tensor([max(1, min(table.numel, int(round(i * table.numel / steps)))) for i in range(steps + 1)])
    idx = torch.searchsorted(torch.cumsum(table.counts, 0), ks)
    return table.keys[idx].tolist()


# -- the k-th key and thresholds --------------------------------------------------------------------
def select(counts: torch.Tensor, k: int, keys: torch.Tensor | None = None) -> tuple[int, int]:
    """Bin holding the k-th element (1-based) and the number of elements in bins below it.
    ``keys`` names the bins of a sparse histogram (default: bin i is ``counts[i]``)."""
    cum = torch.cumsum(counts, 0)
    i = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype))[0])
    return int(keys[i]) if keys is not None else i, int(cum[i - 1]) if i > 0 else 0


@dataclass(frozen=True)
class Threshold:
    """The k-th smallest key over a set of tensors: pruning removes every weight with key <
    ``key`` and the first ``ties`` weights whose key equals it (in visiting order), k in all."""

    key: int
    ties: int
    k: int
    total: int

    @staticmethod
    def none(total: int) -> "Threshold":
        return Threshold(key=-1, ties=0, k=0, total=total)


def table_threshold(tables: list[KeyTable], k: int,
                    low_pass: Callable[[int], Iterable[KeyTable]] | None = None) -> tuple[Threshold, list[int]]:
    """The exact k-th key over tensors given their tables, and each tensor's count at that key.

    Wide tables give the bin; ``low_pass(bin)`` then yields each tensor's ``bucket_table`` in the
    same order (one more look at the tensors, for the one bin that holds the answer)."""
    total = sum(t.numel for t in tables)
    if not 0 <= k <= total:
        raise ValueError(f"k={k} outside [0, {total}]")
    if k == 0:
        return Threshold.none(total), [0] * len(tables)
    merged = merge(tables)
    high, below = merged.select(k)
    if not merged.wide:
        return Threshold(high, k - below, k, total), [t.count_at(high) for t in tables]
    lows = list(low_pass(high))
    low, below_low = merge(lows).select(k - below)
    return (Threshold((high << LOW_BITS) | low, k - below - below_low, k, total), [t.count_at(low) for t in lows])


def find_threshold(visit: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """Exact k-th smallest magnitude key over the tensors ``visit()`` yields, in bounded memory.

    ``visit`` yields float tensors or their keys and is called once per pass (once for 16-bit
    weights, twice for fp32), so a streaming caller can re-read tensors from disk instead of
    holding them. Memory is one tensor plus one small table per tensor."""
    tables = [key_table(x) for x in visit()]
    return table_threshold(tables, k, lambda high: (bucket_table(x, high) for x in visit()))[0]


def deal_ties(order: list[str], key: int, ties: int, counts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each tensor's (key, ties to prune at it), handing ties out in visiting order from each
    tensor's count at the key: ``threshold_keep``'s carry, decided before any tensor is read."""
    out = {}
    for name in order:
        used = min(ties, counts[name])
        out[name], ties = (key, used), ties - used
    return out


def threshold_keep(x: torch.Tensor, key: int, ties: int) -> tuple[torch.Tensor, int]:
    """Keep-mask of one tensor (or its key) under a threshold; prunes up to ``ties`` of its
    weights equal to ``key``. Returns the mask and how many ties this tensor used (the caller
    carries the rest to the next tensor: how a global threshold breaks ties across tensors)."""
    k = as_key(x).contiguous()  # ties go in the tensor's logical (row-major) order
    keep = k > key
    if ties > 0:
        tie_idx = (k.reshape(-1) == key).nonzero().squeeze(1)
        used = min(ties, tie_idx.numel())
        keep.view(-1)[tie_idx[used:]] = True
        return keep, used
    keep |= k == key  # ties == 0: nothing at the threshold is pruned
    return keep, 0


def prune_count(numel: int, ratio: float) -> int:
    """Number of weights a ratio removes; rounding half to even, as ``round`` does."""
    return int(round(ratio * numel))


def own_threshold(table: KeyTable, ratio: float) -> tuple[int, int]:
    """(key, ties) pruning ``ratio`` of one tensor at its own threshold, from its 16-bit key table:
    ``table_threshold([table], k)`` without merging a table of one (a load in layer scope asks
    this of every target; BENCHMARKS.md, session 25)."""
    if table.wide:
        raise ValueError("a wide (fp32) table gives only the bin of a threshold")
    k = prune_count(table.numel, ratio)
    if not 0 <= k <= table.numel:
        raise ValueError(f"k={k} outside [0, {table.numel}]")
    if k == 0:
        return -1, 0
    # numpy on the table's few thousand bins: a few microseconds, where torch's dispatch of the
    # same three ops costs ~100 (and a load asks from a thread beside the model's build)
    cum = np.cumsum(table.counts.numpy())
    i = int(np.searchsorted(cum, k))
    return int(table.keys[i]), k - (int(cum[i - 1]) if i > 0 else 0)


def unstructured_keep(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask pruning ``round(ratio * numel)`` smallest magnitudes of one tensor."""
    key = as_key(x)  # computed once, used by both passes
    t = find_threshold(lambda: [key], prune_count(x.numel(), ratio))
    return threshold_keep(key, t.key, t.ties)[0]


_RANK_MAX_M = 8  # beyond this the m(m-1) comparisons cost more than one sort


def nm_keep(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest magnitudes in every ``m`` consecutive weights of the last dim.

    Ties keep the earlier weight (what a stable descending sort gives). The last dimension must
    be a multiple of ``m``; callers validate that from the checkpoint header before any work.
    """
    if x.shape[-1] % m:
        raise UserError(f"a tensor of shape {tuple(x.shape)} cannot take an N:M pattern with M={m}: "
                        f"its input dimension {x.shape[-1]} is not a multiple of {m}")
    groups = as_key(x).reshape(-1, m)
    if m > _RANK_MAX_M:
        top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
        return torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, top, True).reshape(x.shape)
    # A weight is kept when fewer than n others in its group beat it: a later weight beats it by
    # being strictly larger, an earlier one by being at least as large. m(m-1) vectorised
    # comparisons over strided columns instead of a sort per group.
    cols = [groups[:, j] for j in range(m)]
    keep = torch.empty(groups.shape, dtype=torch.bool)
    beaten = torch.empty(groups.shape[0], dtype=torch.uint8)
    beats = torch.empty(groups.shape[0], dtype=torch.bool)
    for i in range(m):
        beaten.zero_()
        for j in range(m):
            if j != i:
                (torch.ge if j < i else torch.gt)(cols[j], cols[i], out=beats)
                beaten += beats
        torch.lt(beaten, n, out=keep[:, i])
    return keep.reshape(x.shape)


def magnitude_keep(x: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> torch.Tensor:
    """The keep-mask of one matrix by magnitude (OMP's reference; a score method's on its score):
    the sparsity's share of smallest |x|, or the N largest of every M along the input dimension."""
    if not sparsity.is_nm:
        return unstructured_keep(x, sparsity.ratio)
    if weight_in_first:  # Conv1D stores [in, out]: groups run along dim 0
        return nm_keep(x.t(), sparsity.n, sparsity.m).t()
    return nm_keep(x, sparsity.n, sparsity.m)


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the last dim keeps at most ``n``."""
    groups = keep.reshape(*keep.shape[:-1], keep.shape[-1] // m, m)
    return bool((groups.sum(-1) <= n).all())


def apply_keep_(w: torch.Tensor, keep: torch.Tensor) -> int:
    """Zero ``w`` where ``keep`` is False, in place, writing +0 (an integer view times the mask,
    so kept weights keep their exact bits). Returns the zeros ``w`` ends with (either sign)."""
    if w.is_floating_point() and w.element_size() in (2, 4):
        iv = w.view({2: torch.int16, 4: torch.int32}[w.element_size()])
        iv.mul_(keep)
    else:
        w.masked_fill_(~keep, 0)
    return w.numel() - int(torch.count_nonzero(w))
