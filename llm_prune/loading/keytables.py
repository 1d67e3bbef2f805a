"""Key tables of a checkpoint's targets, cached: what makes a global threshold at any sparsity a lookup.

Masks of a data-free method are nested across sparsities: the weights pruned at sparsity s are a
prefix of the weights ordered by (score key, visiting order). So one small table per tensor (the
histogram of its score keys, ``magnitude.KeyTable``) answers every sparsity: the exact global
threshold, and how many of each tensor's weights sit on it, which deals the threshold's ties out
to tensors in visiting order before any of them is read.

Tables are cached under ``cache_dir()/keytables/<checkpoint fingerprint>-<method>.safetensors``,
keyed by the content hashes of the checkpoint files: later loads, at any sparsity, read the
threshold off the tables, and a changed checkpoint has another fingerprint. Wide (fp32) keys
need one more look at the tensors of the bin that holds the threshold; its result is cached
per target set and weight count beside the tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from tqdm.auto import tqdm

from ..fingerprint import SourceHasher, checkpoint_fingerprint, file_digest, known_digest
from ..magnitude import KeyTable, bucket_table, deal_ties, key_table, quantile_keys, table_threshold
from ..paths import atomic_save_tensors, atomic_write_text, cache_dir
from .decode import DenseSource

TABLES_VERSION = "2"
log = logging.getLogger(__name__)


class TableCache:
    """The key tables of one checkpoint under one method's score."""

    def __init__(self, source: DenseSource, method):
        self.source, self.method = source, method
        self._fingerprint: str | None = None

    def path(self) -> Path:
        """Keyed by the content of the checkpoint files (hashed once, then remembered by size/mtime)."""
        if self._fingerprint is None:
            reader = self.source.reader
            self._fingerprint = checkpoint_fingerprint({f: file_digest(reader.path / f) for f in reader.files})
        return self._path()

    def _path_of(self, digests: dict[str, str]) -> Path:
        self._fingerprint = checkpoint_fingerprint(digests)
        return self._path()

    def _path(self) -> Path:
        return cache_dir() / "keytables" / f"{self._fingerprint}-{self.method.name}.safetensors"

    def hashes_known(self) -> bool:
        """True when every checkpoint file's hash is remembered: the cache can be looked up, and
        filled, without hashing the files."""
        reader = self.source.reader
        return all(known_digest(reader.path / f) is not None for f in reader.files)

    def cached(self, names: list[str]) -> dict[str, KeyTable] | None:
        """The tables of ``names`` when every one is cached (and the hashes known), else None: no pass."""
        tables = _read_tables(self.path()) if self.hashes_known() else {}
        return {n: tables[n] for n in names} if all(n in tables for n in names) else None

    def save(self, digests: dict[str, str], tables: dict[str, KeyTable]) -> None:
        """Cache ``tables`` under the checkpoint whose files have ``digests`` (computed by a run
        that read them), beside the tables already cached for it."""
        path = self._path_of(digests)
        _write_tables(path, {**_read_tables(path), **tables})

    def tables(self, names: list[str], progress: bool, saver: ThreadPoolExecutor | None = None) -> dict[str, KeyTable]:
        """Tables of ``names`` from the cache; the missing ones in one streaming pass, then cached.

        When the files' hashes are not known yet (a first load) there can be no cached tables to
        find, and nothing needs the hashes but the cache itself: with a ``saver`` thread, the files
        are hashed as the tables' pass reads them (``SourceHasher``: no second read), and the
        tables are written from ``saver`` once both are done, while the caller goes on (it waits
        for ``saver`` at its end)."""
        reader = self.source.reader
        known = self.hashes_known()
        tables = _read_tables(self.path()) if known else {}
        missing = [n for n in names if n not in tables]
        if not missing:
            return {n: tables[n] for n in names}
        hasher = None
        if saver is not None and not known and not reader.pickle:
            hasher = SourceHasher(reader.path, reader.files, reader.header_ends())
        bar = tqdm(self.source.read(missing, mapped=missing), total=len(missing), desc="key tables (once)",
                   disable=not progress, leave=False)
        with hasher or contextlib.nullcontext():
            for name, w in bar:
                if hasher is not None and name in reader.infos:  # decoded tensors: hashed at the end
                    hasher.read_tensors([reader.infos[name]])
                tables[name] = key_table(self.method.score(w))
        if hasher is None:
            _write_tables(self.path(), tables)
        else:
            saver.submit(lambda: _write_tables(self._path_of(hasher.digests()), tables))
        return {n: tables[n] for n in names}

    def wide_threshold(self, order: list[str], tables: dict[str, KeyTable], k: int,
                       progress: bool) -> tuple[int, int, list[int]]:
        """Wide keys: (key, ties, each target's count at the key), from the tables and one pass
        over the targets for the bin that holds the answer (cached per target set and k)."""
        path = self.path().with_suffix(".wide.json")
        targets = hashlib.sha256("\n".join(order).encode()).hexdigest()[:16]
        tkey = f"{targets}:{k}"
        cached = _read_json(path).get(tkey)
        if cached:
            return cached["key"], cached["ties"], cached["counts"]

        def low_pass(high: int) -> list[KeyTable]:
            lows = {}
            for name, w in tqdm(self.source.read(order, mapped=order), total=len(order), desc="fp32 threshold",
                                disable=not progress, leave=False):
                lows[name] = bucket_table(self.method.score(w), high)
            return [lows[n] for n in order]

        t, counts = table_threshold([tables[n] for n in order], k, low_pass)
        atomic_write_text(path, json.dumps({**_read_json(path), tkey: {"key": t.key, "ties": t.ties, "counts": counts}}))
        return t.key, t.ties, counts


def global_thresholds(cache: TableCache, order: list[str], ratio: float, progress: bool,
                      saver: ThreadPoolExecutor | None = None) -> tuple[dict[str, tuple[int, int]], dict[str, KeyTable]]:
    """Per target (key, ties to prune at it) of the one global threshold, and the key tables;
    nothing is read when the tables are cached."""
    tables = cache.tables(order, progress, saver)
    k = int(round(ratio * sum(cache.source.infos[n].numel for n in order)))
    if k == 0:
        return {n: (-1, 0) for n in order}, tables
    if tables[order[0]].wide:
        key, ties, counts = cache.wide_threshold(order, tables, k, progress)
    else:
        t, counts = table_threshold([tables[n] for n in order], k)
        key, ties = t.key, t.ties
    return deal_ties(order, key, ties, dict(zip(order, counts))), tables


def _read_tables(path: Path) -> dict[str, KeyTable]:
    # One read of the whole file and one deserialisation: a checkpoint has hundreds of small
    # tables, and a tensor at a time from a mapping costs twice as much (every warm global load).
    try:
        data = path.read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = header.get("__metadata__") or {}
        if meta.get("version") != TABLES_VERSION:
            return {}
        tensors = load_safetensors(data)
        return {name: KeyTable(bool(wide), numel, tensors[f"{name}/keys"], tensors[f"{name}/counts"])
                for name, (wide, numel) in json.loads(meta["tables"]).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):  # absent or damaged: rebuild
        return {}


def _write_tables(path: Path, tables: dict[str, KeyTable]) -> None:
    # A cache that cannot be written (read-only, full) costs later runs a pass, never this one.
    try:
        _save_tables(path, tables)
    except OSError as e:
        log.warning("could not cache the key tables in %s (%s)", path.parent, e)


def _save_tables(path: Path, tables: dict[str, KeyTable]) -> None:
    tensors, meta = {}, {}
    for name, t in tables.items():
        tensors[f"{name}/keys"], tensors[f"{name}/counts"] = t.keys.contiguous(), t.counts.contiguous()
        meta[name] = [t.wide, t.numel]
    quantiles = {n: quantile_keys(t) for n, t in tables.items()}  # every 1%, for people and exports
    atomic_save_tensors(path, tensors, {"version": TABLES_VERSION, "tables": json.dumps(meta),
                                        "quantile_keys": json.dumps(quantiles)})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
