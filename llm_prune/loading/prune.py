"""Pruning while loading: each target pruned as it is read, exactly as the exporter prunes it.

Targets come from ``targets.select_targets`` over the same units as the exporter's. A global
threshold and its ties come from the key tables (``keytables``), dealt out in visiting order
before any tensor is read, so that tensors can be read in file order. Layer thresholds of a
nested method with 16-bit keys come from the same tables when the checkpoint's hashes are
known (the tables are then cached, or cached by this load's one pass); otherwise each from its
tensor as it is read, by the method (its fast path, else its reference). A nested method also
keeps each tensor's key table, with which ``set_sparsity`` later raises the sparsity without a
pass.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..allocation import Shares, alpha_shares, finite
from ..config import PruneConfig
from ..errors import UserError
from ..magnitude import KeyTable, NonFinite, key_table, layout, own_threshold
from ..methods import Method, prune_
from ..spectrum import SpectrumCache
from .decode import DenseSource
from .keytables import TableCache, global_thresholds


@dataclass
class PruneState:
    """What was applied to a loaded model; lets ``set_sparsity`` raise it without a reload."""

    config: PruneConfig
    weight_in_first: bool
    prune_dtype: torch.dtype  # dtype the masks were computed in (the checkpoint's)
    order: list[str]  # names of the targets, in the pipeline's visiting order
    # Per target: (key, ties) of the applied threshold, and the key table, when known.
    applied: dict[str, tuple[int, int]] = field(default_factory=dict)
    tables: dict[str, KeyTable] = field(default_factory=dict)
    checkpoint_names: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name
    shares: Shares | None = None  # a non-uniform allocation's counts, by checkpoint name

    def renamed(self, names: dict[str, str]) -> "PruneState":
        """The same state under the model's parameter names (``names``: checkpoint -> model)."""
        return PruneState(self.config, self.weight_in_first, self.prune_dtype,
                          [names[n] for n in self.order if n in names],
                          {names[n]: v for n, v in self.applied.items() if n in names},
                          {names[n]: v for n, v in self.tables.items() if n in names},
                          {names[n]: n for n in self.order if n in names}, self.shares)


class LoadPruner:
    """``prepare()`` once in the reading thread, then ``pruner(name, mapped tensor)`` -> pruned copy."""

    def __init__(self, source: DenseSource, method: Method, state: PruneState, progress: bool,
                 saver: ThreadPoolExecutor | None = None, units: list | None = None):
        self.source, self.method, self.state, self.units = source, method, state, units
        self.progress, self.saver = progress, saver
        self.thresholds: dict[str, tuple[int, int]] = {}

    def prepare(self) -> None:
        """Every target's (key, ties) first, from the key tables, while the main thread builds the
        model: always in global scope; in layer scope when the tables are cached, or can be at
        no cost beyond their own pass (the checkpoint's hashes are known), so that a load reads
        each target once, to prune it."""
        cfg = self.state.config
        if cfg.allocation == "alpha":  # every target's spectrum first (cached: later loads read none)
            src, reader = self.source, self.source.reader
            self.state.shares = alpha_shares(cfg, self.units, src.infos, SpectrumCache(reader.path, reader.files),
                                             lambda names: finite(src.read(names, mapped=names), src.file_of),
                                             self.progress)
        if cfg.scope == "global":
            self.thresholds, tables = global_thresholds(TableCache(self.source, self.method), self.state.order,
                                                        cfg.sparsity.ratio, self.progress, self.saver)
            self.state.applied, self.state.tables = dict(self.thresholds), tables
        elif self.method.nested and not cfg.sparsity.is_nm and not layout(self.state.prune_dtype).wide:
            cache = TableCache(self.source, self.method)
            if cache.hashes_known():
                tables = cache.tables(self.state.order, self.progress, self.saver)
                self.thresholds = {n: own_threshold(tables[n], self._sparsity(n).ratio) for n in self.state.order}
                self.state.applied, self.state.tables = dict(self.thresholds), tables

    def _sparsity(self, name: str):
        shares = self.state.shares
        return self.state.config.sparsity if shares is None else shares.sparsity(name)

    def __call__(self, name: str, src: torch.Tensor) -> torch.Tensor:
        # Targets arrive mapped from the file; their pruned weights are written into fresh memory,
        # the model's own: the weights cross memory once, and the file is never written.
        cfg, state = self.state.config, self.state
        sparsity = self._sparsity(name)
        out = torch.empty(src.shape, dtype=src.dtype)
        try:
            threshold = self.thresholds.get(name)
            if threshold is None and self.method.nested and not cfg.sparsity.is_nm:
                # The layer threshold read off the tensor's key table, kept for set_sparsity.
                table = key_table(self.method.score(src))
                if not table.wide:
                    threshold = state.applied[name] = own_threshold(table, sparsity.ratio)
                    state.tables[name] = table
            prune_(self.method, src, sparsity, state.weight_in_first, threshold=threshold, out=out)
        except NonFinite:
            raise UserError(f"{name} (in {self.source.file_of(name)}) has inf or nan values: "
                            "the checkpoint is damaged") from None
        return out
