"""Per-tensor magnitude tables: what makes OMP at any sparsity a lookup instead of a pass.

OMP masks from one checkpoint are nested: the weights pruned at sparsity s are a prefix of the
weights ordered by (magnitude key, visiting order). So one small table per tensor answers every
sparsity: the histogram of its magnitude keys (``masks.magnitude_key``), stored sparsely as the
occupied keys and their counts. A bf16 weight matrix occupies a few thousand of the 2^15
possible keys, so a table is tens of KiB whatever the tensor's size. From it:

* the k-th smallest key and the number of weights below it (exactly what ``masks.find_threshold``
  returns, for a tensor or, summed, for a set of tensors), hence the threshold at any sparsity;
* how many of a tensor's weights sit exactly on a key, which is what distributes a global
  threshold's ties over tensors in visiting order without reading them;
* the magnitude quantiles at every 1% (``quantile_keys``), the human-sized summary.

fp32 keys have 31 significant bits; their table holds the high 16 bits (the same granularity as
bf16), and the exact threshold takes one more look at the tensors in the one bucket that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .kernels import magnitude as K
from .masks import magnitude_key

LOW_BITS = 16  # fp32 tables bucket keys by their high 16 bits, as masks.find_threshold does


@dataclass(frozen=True)
class KeyTable:
    """Sparse histogram of one tensor's magnitude keys: ``keys`` ascending, ``counts`` > 0."""

    dtype: torch.dtype
    numel: int
    keys: torch.Tensor  # int64, the occupied bins (the high 16 bits for fp32)
    counts: torch.Tensor  # int64, same length

    @property
    def bucketed(self) -> bool:
        """True when bins are fp32 high halves rather than whole keys."""
        return self.dtype == torch.float32

    def select(self, k: int) -> tuple[int, int]:
        """(bin holding the k-th smallest key (1-based), number of weights in bins below it)."""
        return select(self.keys, self.counts, k)

    def count_at(self, key: int) -> int:
        i = int(torch.searchsorted(self.keys, torch.tensor([key]))[0])
        return int(self.counts[i]) if i < len(self.keys) and int(self.keys[i]) == key else 0


def key_table(x: torch.Tensor) -> KeyTable:
    """The table of one tensor: one histogram pass over its magnitude keys."""
    x = x.detach().cpu()
    if K.supported(x):
        return table_of_histogram(K.key_histogram(x), x.dtype, x.numel())
    keys = magnitude_key(x).reshape(-1).long()
    hist = torch.bincount(keys >> LOW_BITS if x.dtype == torch.float32 else keys, minlength=1 << 15)
    return table_of_histogram(hist.numpy(), x.dtype, x.numel())


def table_of_histogram(counts: np.ndarray, dtype: torch.dtype, numel: int) -> KeyTable:
    """The table from a dense key histogram (``kernels.magnitude.key_histogram``'s bins)."""
    occupied = np.flatnonzero(counts)
    return KeyTable(dtype, numel, torch.from_numpy(occupied.astype(np.int64)),
                    torch.from_numpy(counts[occupied].astype(np.int64)))


def merge(tables: list[KeyTable]) -> KeyTable:
    """One table for the union of several tensors' weights (all of one dtype)."""
    dtypes = {t.dtype for t in tables}
    if len(dtypes) != 1:
        raise ValueError(f"tables of several dtypes cannot merge: {sorted(map(str, dtypes))}")
    dense = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tables:
        dense.index_add_(0, t.keys, t.counts)
    occupied = dense.nonzero().squeeze(1)
    return KeyTable(tables[0].dtype, sum(t.numel for t in tables), occupied, dense[occupied])


def select(keys: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Like ``masks._select`` on the dense histogram: empty bins never change a cumulative sum."""
    cum = torch.cumsum(counts, 0)
    i = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype))[0])
    return int(keys[i]), int(cum[i - 1]) if i > 0 else 0


def quantile_keys(table: KeyTable, steps: int = 100) -> list[int]:
    """The key at every 1/steps of the weights (index 0: the smallest, ``steps``: the largest).

    For fp32 tables the keys are high halves (the bucket, not the exact magnitude)."""
    if table.numel == 0:
        return []
    ks = torch.tensor([max(1, min(table.numel, int(round(i * table.numel / steps)))) for i in range(steps + 1)])
    idx = torch.searchsorted(torch.cumsum(table.counts, 0), ks)
    return table.keys[idx].tolist()


def to_tensors(tables: dict[str, KeyTable]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Flatten tables for a safetensors file: tensors plus the (dtype, numel) of each name."""
    tensors, meta = {}, {}
    for name, t in tables.items():
        tensors[f"{name}/keys"] = t.keys.contiguous()
        tensors[f"{name}/counts"] = t.counts.contiguous()
        meta[name] = [str(t.dtype).removeprefix("torch."), t.numel]
    return tensors, meta


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, list]) -> dict[str, KeyTable]:
    return {name: KeyTable(getattr(torch, dtype), numel, tensors[f"{name}/keys"], tensors[f"{name}/counts"])
            for name, (dtype, numel) in meta.items()}
