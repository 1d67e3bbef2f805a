"""The key tables of an export's targets: read from the cache, or made by the run's own reads and cached.

A nested method's threshold, in either scope and at any sparsity, is a lookup in the targets' key
tables (``magnitude.KeyTable``). When the source's hashes are known (an earlier export or load
of it), the tables cached under them (``loading.keytables``) give every threshold and the run
reads each target once, to prune it. Otherwise the run makes the tables as it reads the
targets for their thresholds anyway (the global pass, or each tensor's layer threshold) and
caches them at its end under the hashes it computed: no export pays a table pass twice, and
none pays one of its own.
"""

from __future__ import annotations

from .magnitude import KeyTable, key_table, layout, own_threshold
from .reader import CheckpointReader


class RunTables:
    def __init__(self, reader: CheckpointReader, method, names: list[str]):
        self.names = names
        self.cache = None
        self.cached: dict[str, KeyTable] | None = None  # every target's table, from the cache
        self.made: dict[str, KeyTable] = {}  # tables this run made from its reads
        # Tables of scores that are not the weights would not answer set_sparsity or a load.
        self.enabled = bool(names) and method.nested and not reader.pickle
        if self.enabled:
            from .loading.decode import DenseSource
            from .loading.keytables import TableCache

            self.cache = TableCache(DenseSource(reader), method)
            self.cached = self.cache.cached(names)

    def layer_threshold(self, name: str, ratio: float) -> tuple[int, int] | None:
        """(key, ties) of ``name``'s own threshold from its cached table; None when not cached
        or wide (fp32: the method's plan looks at the tensor again for the low bits)."""
        table = self.cached.get(name) if self.cached is not None else None
        return None if table is None or table.wide else own_threshold(table, ratio)

    def layer_threshold_of(self, name: str, score, ratio: float) -> tuple[int, int] | None:
        """(key, ties) of ``name``'s own threshold from the tensor being read, its table kept for
        the cache; None when no table is being made (the method's plan then finds the threshold)."""
        if not self.enabled or self.cached is not None or layout(score.dtype).wide:
            return None
        return own_threshold(self.make(name, score), ratio)

    def make(self, name: str, score, checked: bool = True) -> KeyTable:
        """``name``'s table from its score; ``checked`` refuses inf and nan (as the method's plan does)."""
        table = key_table(score, checked=checked)
        if self.enabled:
            self.made[name] = table
        return table

    def save(self, digests: dict[str, str]) -> None:
        """Cache the tables this run made, when it made every target's (a resumed run did not)."""
        if self.enabled and self.cached is None and set(self.made) >= set(self.names):
            self.cache.save(digests, {n: self.made[n] for n in self.names})
