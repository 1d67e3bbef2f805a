"""The key tables of an export's targets: read from the cache, or made by the run's own reads and cached.

A nested method's threshold, in either scope and at any sparsity, is a lookup in the targets' key
tables (``magnitude.KeyTable``). When the source's hashes are known (an earlier export or load
of it), the tables cached under them (``loading.keytables``) give every threshold and the run
reads each target once, to prune it. Otherwise the run makes the tables as it reads the
targets for their thresholds anyway (the global pass, or each tensor's layer threshold) and
caches them at its end under the hashes it computed: no export pays a table pass twice, and
none pays one of its own. In layer scope a thread makes them a block ahead of the pruning
(``made_ahead``), on the core the kernels leave free, so the first contact's extra pass is not
on the pruning's path.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from .magnitude import KeyTable, key_table, key_table_of_pieces, layout, own_threshold
from .reader import CheckpointReader


class RunTables:
    def __init__(self, reader: CheckpointReader, method, names: list[str]):
        self.names = names
        self.cache = None
        self.cached: dict[str, KeyTable] | None = None  # every target's table, from the cache
        self.made: dict[str, KeyTable] = {}  # tables this run made from its reads
        # Tables of scores that are not the weights would not answer set_sparsity or a load.
        self.enabled = bool(names) and method.nested and not reader.pickle
        self.reader = reader
        self._ahead: dict[str, Future] = {}
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
        """(key, ties) of ``name``'s own threshold from the tensor being read (or from its table
        made ahead), its table kept for the cache; None when no table is being made (the method's
        plan then finds the threshold)."""
        if name in self._ahead:
            table = self._ahead.pop(name).result()  # raises what making it raised (NonFinite)
            self.made[name] = table
            self._submit_next(name)
            return own_threshold(table, ratio)
        if not self.enabled or self.cached is not None or layout(score.dtype).wide:
            return None
        return own_threshold(self.make(name, score), ratio)

    @contextmanager
    def made_ahead(self, units: list[list[str]], score):
        """Within: the 16-bit targets' tables (layer scope, none cached) are made in a thread,
        unit by unit, at most one unit ahead of the one ``layer_threshold_of`` is asked about:
        the source's pages it reads are still in the page cache when the pruning reads them.
        ``score``: the method's score of a tensor (the tables are of scores)."""
        if not self.enabled or self.cached is not None:
            yield
            return
        infos = self.reader.infos
        self._units = [[n for n in u if not layout(infos[n].dtype).wide] for u in units]
        self._units = [u for u in self._units if u]
        self._first = {u[0]: i for i, u in enumerate(self._units)}
        self._score = score
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llm-prune-tables")
        try:
            if self._units:
                self._submit(0)
            yield
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._ahead = {}

    def _submit_next(self, name: str) -> None:
        """Asked about the first target of unit i: unit i + 1 may start."""
        if name in self._first and self._first[name] + 1 < len(self._units):
            self._submit(self._first[name] + 1)

    def _submit(self, i: int) -> None:
        for n in self._units[i]:
            self._ahead[n] = self._pool.submit(self._make_from_source, n)

    def _make_from_source(self, name: str) -> KeyTable:
        # in pieces: this thread then holds a few MiB of source pages beside the pruning's tensor
        pieces = (self._score(p) for p in self.reader.read_mapped_pieces(name))
        return key_table_of_pieces(pieces, self.reader.infos[name].dtype)

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
