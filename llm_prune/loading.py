"""Load a checkpoint into a transformers model tensor by tensor, pruning targets as they land.

    model = from_pretrained("vicuna-7b", method="omp", sparsity=0.4)      nothing written to disk
    set_sparsity(model, 0.5)                                               nested OMP masks: no reload

The model is built empty (parameters on the meta device), then each stored tensor is read from
its memory-mapped shard, turned into a dense tensor (the ``Decoder`` hook: plain safetensors
today, the sparse formats of ``llm_prune.kernels`` can register theirs), pruned if it is a
target, cast and placed where the accelerate ``device_map`` says (a device, or disk). Peak memory
is the loaded model plus the tensor in flight.

The result is bit-identical to ``prune_checkpoint`` followed by a plain transformers load: the
targets come from ``pipeline.select_targets`` over ``CheckpointReader.units``, layer-scope masks
from ``methods.get_method(...).keep`` (or, for OMP, the same threshold read off the tensor's key
table), and the global threshold and its ties are those of ``masks.find_threshold`` visiting units
in block order and targets by name. Ties are handed out to tensors in that order *before* any
tensor is read, so tensors can be read in file order.

Global scope needs every target's magnitudes before the first tensor lands. One streaming pass
builds a per-tensor key table (``quantiles.KeyTable``) and caches it under
``cache_dir()/keytables/<checkpoint fingerprint>.safetensors``, keyed by the content hashes of
the checkpoint files: later loads, at any sparsity, read the threshold off the tables, and a
changed checkpoint has another fingerprint.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .arch import Arch, arch_for
from .config import DEFAULT_TARGETS, PruneConfig, Sparsity
from .errors import UserError
from .fingerprint import checkpoint_fingerprint, file_sha256, known_sha256
from .kernels import formats
from .kernels import magnitude as K
from .masks import find_threshold, magnitude_key, prune_count, threshold_keep
from .methods import get_method
from .methods.magnitude import NonFinite, checked_histogram, magnitude_prune_, threshold_prune_
from .models import resolve_model
from .paths import cache_dir
from .pipeline import select_targets
from .quantiles import (LOW_BITS, KeyTable, from_tensors, key_table, merge, quantile_keys, table_of_histogram,
                        to_tensors)
from .stream import CheckpointReader, TensorInfo, Unit

log = logging.getLogger(__name__)
TABLES_VERSION = "1"
# Upcasts that keep every value (and so every magnitude order and tie): set_sparsity stays exact.
_LOSSLESS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


# -- stored tensors -> dense tensor ----------------------------------------------------------------
@dataclass(frozen=True)
class Decoder:
    """How a stored format becomes dense tensors; register one with ``register_decoder``.

    ``plan(reader)`` claims stored tensors: ``{dense name: (TensorInfo of the dense tensor,
    [stored names])}``; ``decode(dense name, {stored name: tensor}, metadata)`` returns the
    dense tensor (a fresh tensor, never a view into the read-only mmap that is then written to);
    ``metadata`` is the safetensors ``__metadata__`` of the file holding the first stored part.
    Stored tensors no decoder claims are read as they are.
    """

    name: str
    plan: Callable[[CheckpointReader], dict[str, tuple[TensorInfo, list[str]]]]
    decode: Callable[[str, dict[str, torch.Tensor], dict[str, str]], torch.Tensor]


DECODERS: dict[str, Decoder] = {}


def register_decoder(decoder: Decoder) -> Decoder:
    DECODERS[decoder.name] = decoder
    return decoder


def _formats_plan(reader: CheckpointReader) -> dict[str, tuple[TensorInfo, list[str]]]:
    """Claim the tensors that llm-prune's exporter stored as bitmask or packed24: each shard's
    ``__metadata__`` names them, with their dense shape and dtype."""
    plan = {}
    for file, meta in reader.metadata.items():
        for name in formats.encoded_names(meta):
            info = formats.tensor_info(name, meta)
            dense = TensorInfo(name, file, formats.DTYPES[info["dtype"]], tuple(info["shape"]))
            plan[name] = (dense, formats.stored_names(name, info["format"]))
    return plan


class DenseSource:
    """A checkpoint seen as dense tensors: the reader's tensors, with registered decoders applied."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.infos: dict[str, TensorInfo] = {}
        self.recipe: dict[str, tuple[Decoder | None, list[str]]] = {}
        claimed: set[str] = set()
        for decoder in DECODERS.values():
            for dense, (info, stored) in decoder.plan(reader).items():
                self.infos[dense], self.recipe[dense] = info, (decoder, stored)
                claimed.update(stored)
        for name, info in reader.infos.items():
            if name not in claimed:
                self.infos[name], self.recipe[name] = info, (None, [name])

    @property
    def decoded(self) -> bool:
        return any(d is not None for d, _ in self.recipe.values())

    def units(self, arch: Arch) -> list[Unit]:
        if not self.decoded:
            return self.reader.units(arch)
        # Units only look at names and sizes: run the reader's grouping over the dense view.
        return CheckpointReader.units(_InfoView(self.infos), arch)

    def read(self, names: list[str], mapped: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Dense tensors one at a time, in file order (each shard opened once). Stored tensors
        named in ``mapped`` come as private mappings of the file (read when touched, as
        transformers loads them); the others are read into fresh memory."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.reader.infos[self.recipe[n][1][0]].file, []).append(n)
        for file, dense_names in by_file.items():
            plain = [n for n in dense_names if self.recipe[n][0] is None]
            if not self.reader.pickle:
                lazy = [n for n in plain if n in mapped]
                yield from heapq.merge(self.reader.read_fresh([n for n in plain if n not in mapped]),
                                       self.reader.read_mapped(lazy), key=lambda item: self.reader.infos[item[0]].offset)
            else:
                for n in plain:
                    yield n, self.reader.read([n])[n]
            for n in dense_names:  # decoded: stored parts may live in other shards, the reader finds them
                decoder, stored = self.recipe[n]
                if decoder is not None:
                    meta = self.reader.metadata.get(self.reader.infos[stored[0]].file, {})
                    yield n, decoder.decode(n, self.reader.read(stored), meta)


@dataclass
class _InfoView:
    infos: dict[str, TensorInfo]


# -- what pruning each target means ------------------------------------------------------------------
@dataclass
class PruneState:
    """What was applied to a loaded model; lets ``set_sparsity`` raise it without a reload."""

    config: PruneConfig
    weight_in_first: bool
    prune_dtype: torch.dtype  # dtype the masks were computed in (the checkpoint's)
    order: list[str]  # model parameter names of the targets, in the pipeline's visiting order
    # Per target: (key, ties) of the applied threshold, and the key table, when known.
    applied: dict[str, tuple[int, int]] = field(default_factory=dict)
    tables: dict[str, KeyTable] = field(default_factory=dict)


def from_pretrained(name_or_path: str | os.PathLike, method: str = "omp", sparsity: float | str | None = None,
                    pattern: str | None = None, scope: str = "layer", targets=DEFAULT_TARGETS, exclude=(),
                    dtype=None, device_map=None, *, max_memory: dict | None = None,
                    offload_folder: str | os.PathLike | None = None, allow_pickle: bool = False,
                    progress: bool = True):
    """A transformers model whose targeted weights were pruned as they were read.

    Same pruning settings as ``prune_checkpoint`` (and ``llm-prune``), and the same weights bit
    for bit as exporting and loading the export; ``dtype``/``device_map``/``max_memory``/
    ``offload_folder`` mean what they mean to transformers' ``from_pretrained``.
    """
    if sparsity is None and pattern is None:
        raise UserError("give sparsity= (a fraction in [0, 1)) or pattern='N:M'; llm_prune.load() loads without pruning")
    cfg = PruneConfig(method=method, sparsity=Sparsity.parse(sparsity, pattern), scope=scope,
                      targets=tuple([targets] if isinstance(targets, str) else targets),
                      exclude=tuple([exclude] if isinstance(exclude, str) else exclude))
    pruner = get_method(cfg.method)
    if pruner.needs_calibration:
        raise UserError(f"method {cfg.method!r} needs calibration data, which loading cannot run; "
                        "prune with llm-prune and load the export")
    source = DenseSource(CheckpointReader(resolve_model(str(name_or_path)), allow_pickle=allow_pickle))
    arch = arch_for(source.reader.config)
    units = source.units(arch)
    select_targets(units, source.infos, arch, cfg)
    order = [n for u in units for n in u.targets]
    state = PruneState(cfg, arch.weight_in_first, source.infos[order[0]].dtype, order)
    plan: dict = {}  # global scope: (key, ties) per target, computed by the reading thread first

    def prepare() -> None:  # runs in the reading thread: the table pass overlaps the model build
        if cfg.scope == "global":
            thresholds, tables = _global_plan(source, order, cfg, progress, saver)
            plan.update(thresholds)
            state.applied, state.tables = dict(thresholds), tables

    def prune(name: str, src: torch.Tensor) -> torch.Tensor:
        # Targets arrive mapped from the file; their pruned weights are written into fresh memory,
        # the model's own: the weights cross memory once, and the file is never written.
        out = torch.empty(src.shape, dtype=src.dtype)
        try:
            if cfg.scope == "global":
                threshold_prune_(src, *plan[name], out=out)
            elif cfg.method == "omp" and not cfg.sparsity.is_nm and src.dtype != torch.float32 and K.supported(src):
                # The layer-scope OMP threshold read off the tensor's key table: the same (key, ties)
                # as masks.unstructured_keep, and the table lets set_sparsity raise it later.
                table = table_of_histogram(checked_histogram(src), src.dtype, src.numel())
                key, ties = _threshold(table, prune_count(src.numel(), cfg.sparsity.ratio))
                state.tables[name], state.applied[name] = table, (key, ties)
                K.prune_below_(src, key, ties, out)
            else:
                pruner.prune_(src, cfg.sparsity, arch.weight_in_first, out=out)
        except NonFinite:
            raise UserError(f"{name} (in {source.reader.infos[source.recipe[name][1][0]].file}) has inf or nan "
                            "values: the checkpoint is damaged") from None
        return out

    with ThreadPoolExecutor(1, thread_name_prefix="llm-prune-hash") as saver:  # waited for at the end
        model, names = _materialize(source, dtype, device_map, max_memory, offload_folder,
                                    {n: prune for n in order}, progress, prepare)
    state.order = [names[n] for n in order if n in names]
    state.applied = {names[n]: v for n, v in state.applied.items() if n in names}
    state.tables = {names[n]: v for n, v in state.tables.items() if n in names}
    model.llm_prune_state = state
    return model


def load(path: str | os.PathLike, dtype=None, device_map=None, *, max_memory: dict | None = None,
         offload_folder: str | os.PathLike | None = None, allow_pickle: bool = False, progress: bool = True):
    """Any checkpoint directory (or known model name) as a transformers model, read tensor by tensor."""
    source = DenseSource(CheckpointReader(resolve_model(str(path)), allow_pickle=allow_pickle))
    return _materialize(source, dtype, device_map, max_memory, offload_folder, {}, progress)[0]


def _threshold(table: KeyTable, k: int) -> tuple[int, int]:
    """(key, ties) that prune the k smallest weights of a 16-bit tensor's table."""
    if k == 0:
        return -1, 0
    key, below = table.select(k)
    return key, k - below


# -- global scope: tables, threshold, ties ---------------------------------------------------------------
def _global_plan(source: DenseSource, order: list[str], cfg: PruneConfig, progress: bool,
                 saver: ThreadPoolExecutor | None = None):
    """Per target (key, ties to prune at that key), plus the key tables; nothing read when cached."""
    tables = _cached_tables(source, order, progress, saver)
    k = int(round(cfg.sparsity.ratio * sum(source.infos[n].numel for n in order)))
    dtype = tables[order[0]].dtype
    if k == 0:
        return {n: (-1, 0) for n in order}, tables
    if dtype != torch.float32:
        key, below = merge([tables[n] for n in order]).select(k)
        counts = {n: tables[n].count_at(key) for n in order}
        return _deal_ties(order, key, k - below, counts), tables
    key, ties, counts = _fp32_threshold(source, order, tables, k, progress)
    return _deal_ties(order, key, ties, counts), tables


def _deal_ties(order, key, ties, counts) -> dict[str, tuple[int, int]]:
    """Give each target its share of the ties, in visiting order: ``threshold_keep``'s carry, precomputed."""
    out = {}
    for n in order:
        used = min(ties, counts[n])
        out[n], ties = (key, used), ties - used
    return out


def _fp32_threshold(source, order, tables, k, progress) -> tuple[int, int, dict[str, int]]:
    """fp32 keys: the tables give the high half; one pass over the tensors of that bucket gives the
    low half and each tensor's count at the exact key (cached per target set and k)."""
    path, tkey = _tables_path(source).with_suffix(".fp32.json"), f"{_targets_hash(order)}:{k}"
    cached = _read_json(path).get(tkey)
    if cached:
        return cached["key"], cached["ties"], cached["counts"]
    high, below = merge([tables[n] for n in order]).select(k)
    low_tables: dict[str, KeyTable] = {}
    for name, w in tqdm(source.read(order, mapped=order), total=len(order), desc="fp32 threshold", disable=not progress,
                        leave=False):
        key = magnitude_key(w).reshape(-1)
        low = (key[(key >> LOW_BITS) == high] & 0xFFFF).numpy()
        counts = np.bincount(low, minlength=1 << LOW_BITS)
        occ = np.flatnonzero(counts)
        low_tables[name] = KeyTable(torch.float32, int(counts.sum()), torch.from_numpy(occ.astype(np.int64)),
                                    torch.from_numpy(counts[occ].astype(np.int64)))
    merged = merge([low_tables[n] for n in order])
    low, below_low = merged.select(k - below)
    key = (high << LOW_BITS) | low
    counts = {n: low_tables[n].count_at(low) for n in order}
    result = {"key": key, "ties": k - below - below_low, "counts": counts}
    _write_json(path, {**_read_json(path), tkey: result})
    return result["key"], result["ties"], counts


def _cached_tables(source: DenseSource, names: list[str], progress: bool,
                   saver: ThreadPoolExecutor | None = None) -> dict[str, KeyTable]:
    """Key tables of ``names`` from the cache; the missing ones in one streaming pass, then cached.

    The cache is keyed by the files' content hashes. When they are not known yet (a first load)
    there can be no cached tables to find, and nothing needs the hashes but the cache itself: with
    a ``saver`` thread, the files are hashed there while the tables are computed, and the tables
    are written once both are done, while the caller goes on (it waits for ``saver`` at its end)."""
    known = all(known_sha256(source.reader.path / f) is not None for f in source.reader.files)
    tables = _read_tables(_tables_path(source)) if known else {}
    missing = [n for n in names if n not in tables]
    if not missing:
        return {n: tables[n] for n in names}
    hashed = saver.submit(_tables_path, source) if saver is not None else None
    bar = tqdm(source.read(missing, mapped=missing), total=len(missing), desc="key tables (once)",
               disable=not progress, leave=False)
    for name, w in bar:
        tables[name] = key_table(w)
    if hashed is None:
        _write_tables(_tables_path(source), tables)
    else:
        saver.submit(lambda: _write_tables(hashed.result(), tables))
    return {n: tables[n] for n in names}


def _tables_path(source: DenseSource) -> Path:
    """Keyed by the content of the checkpoint files (hashed once, then remembered by size/mtime)."""
    if not hasattr(source, "_fingerprint"):
        hashes = {f: file_sha256(source.reader.path / f) for f in source.reader.files}
        source._fingerprint = checkpoint_fingerprint(hashes)
    return cache_dir() / "keytables" / f"{source._fingerprint}.safetensors"


def _targets_hash(order: list[str]) -> str:
    return hashlib.sha256("\n".join(order).encode()).hexdigest()[:16]


def _read_tables(path: Path) -> dict[str, KeyTable]:
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != TABLES_VERSION:
                return {}
            return from_tensors({k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["tables"]))
    except (OSError, ValueError, KeyError):  # absent or damaged: rebuild
        return {}


def _write_tables(path: Path, tables: dict[str, KeyTable]) -> None:
    tensors, meta = to_tensors(tables)
    quantiles = {n: quantile_keys(t) for n, t in tables.items()}  # every 1%, for people and exports
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"version": TABLES_VERSION, "tables": json.dumps(meta),
                                           "quantile_keys": json.dumps(quantiles)})
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, payload: dict) -> None:
    from .paths import atomic_write_text

    atomic_write_text(path, json.dumps(payload))


# -- building the model ---------------------------------------------------------------------------------
def _materialize(source: DenseSource, dtype, device_map, max_memory, offload_folder,
                 transforms: dict[str, Callable[[str, torch.Tensor], torch.Tensor]], progress,
                 prepare: Callable[[], None] | None = None):
    """Empty model -> each tensor read, transformed (pruned), cast and placed -> ties -> dispatch.

    Reading and pruning run in a background thread from the start (``_Ahead``): they release
    the GIL, so they overlap with importing the model's transformers modules and building it
    empty, which is most of what a plain transformers load costs. ``prepare`` runs there first
    (global scope's table pass). Transforms get tensors mapped from the file and return new ones.
    Returns the model and the map checkpoint name -> model parameter name."""
    dtype = _resolve_dtype(dtype, source.reader.config, source)
    # Tensors read ahead are held until the model exists. They are the model's own memory when
    # everything stays on the CPU and no cast shrinks them; otherwise read ahead only a little.
    shrinks = any(i.dtype.is_floating_point and i.dtype.itemsize > dtype.itemsize for i in source.infos.values())
    limit = None if device_map is None and not shrinks else 2
    building = threading.Event()
    building.set()
    with _Ahead(_transformed(source, transforms, prepare, building), limit) as tensors:
        return _build(source, dtype, device_map, max_memory, offload_folder, transforms,
                      _first_taken(tensors, building.clear), progress)


def _first_taken(items, callback):
    """``items``, calling ``callback`` when the first one is asked for."""
    callback()
    yield from items


def _transformed(source: DenseSource, transforms, prepare=None,
                 building: threading.Event | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    # Everything is mapped, not read: what is not pruned stays untouched until used, as in
    # transformers' own load; what is pruned is read once, by the kernel writing its new copy.
    # While the main thread builds the model (``building``), the kernels here keep to one core:
    # on a small machine, two-core kernels would slow the build more than they gain.
    cores = 1 if building is not None and building.is_set() else None
    K.set_threads(cores)
    if prepare is not None:
        prepare()
    for name, w in source.read(list(source.infos), mapped=source.infos.keys()):
        if cores and not building.is_set():
            cores = None
            K.set_threads(None)
        yield name, (transforms[name](name, w) if name in transforms else w)


def _build(source: DenseSource, dtype, device_map, max_memory, offload_folder, transforms, tensors, progress):
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig
    from transformers.integrations.accelerate import (_get_device_map, accelerate_dispatch,
                                                      check_and_set_device_map, expand_device_map, offload_weight)

    path = source.reader.path
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(config)
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed for real
        model = cls._from_config(config, dtype=dtype)
    model_keys = set(model.state_dict())
    names = {n: k for n in source.infos if (k := _model_key(n, model_keys, model.base_model_prefix))}
    unexpected = sorted(set(source.infos) - set(names))
    if unexpected:
        log.info("%d checkpoint tensors the model has no place for, ignored (first: %s)", len(unexpected), unexpected[0])
    dtype_plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}

    device_map = check_and_set_device_map(device_map)
    if device_map is not None:
        device_map = _get_device_map(model, device_map, max_memory, None)
    placement = expand_device_map(device_map, list(model_keys))
    offload_index: dict = {}
    offload_folder = str(offload_folder) if offload_folder is not None else None

    loaded: set[str] = set()
    bar = tqdm(tensors, total=len(source.infos), desc="loading", unit="tensor", disable=not progress)
    for name, w in bar:
        if name not in names:
            continue
        key = names[name]
        if w.is_floating_point():
            w = w.to(_param_dtype(key, dtype, dtype_plan))
        device = placement.get(key, "cpu")
        if device == "disk":
            if name not in transforms and source.recipe[name][0] is None and not source.reader.pickle:
                # Served from the shard itself (cast on the fly) when the model needs it, as transformers does.
                offload_index[key] = {"safetensors_file": str(path / source.infos[name].file),
                                      "weight_name": name, "dtype": str(w.dtype).removeprefix("torch.")}
            else:
                if offload_folder is None:
                    raise UserError("the device_map puts pruned or converted weights on disk: pass offload_folder=DIR")
                os.makedirs(offload_folder, exist_ok=True)
                offload_weight(w, key, offload_folder, offload_index)
        else:
            # clear_cache=False: the default runs gc.collect() for every tensor (seconds per load).
            set_module_tensor_to_device(model, key, device, value=w, clear_cache=False)
        loaded.add(key)
        del w

    missing = model_keys - loaded
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    for target, src in tied.items():
        if src in offload_index and target not in offload_index:
            offload_index[target] = offload_index[src]
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    absent = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and n not in offload_index)
    if absent:
        raise UserError(f"{path} lacks {len(absent)} weight(s) the model needs (first: {absent[0]}); "
                        "is it the checkpoint of this architecture?")
    model.eval()
    _attach_generation_config(model, path)
    if device_map is not None and (len(set(device_map.values())) > 1 or "disk" in set(device_map.values())):
        accelerate_dispatch(model, None, device_map, offload_folder, offload_index, False)
    return model, names


class _Ahead:
    """Iterate ``items`` in a background thread, at most ``limit`` items ahead (None: no limit).

    Items come out in order; an exception in the thread comes out where its item would have.
    Leaving the ``with`` block early stops the thread after the item it is working on."""

    _END = object()

    def __init__(self, items, limit: int | None):
        self._queue: queue.Queue = queue.Queue(maxsize=limit or 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="llm-prune-read", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting for room
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _run(self, items) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failed(e))
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, _Failed):
                raise item.error
            yield item


@dataclass
class _Failed:
    error: BaseException


def _resolve_dtype(dtype, config: dict, source: DenseSource) -> torch.dtype:
    """transformers' ``dtype="auto"``: config.json's dtype, else the first floating tensor's."""
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UserError(f"dtype must be a torch dtype or 'auto', got {dtype!r}")
        return getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        raise UserError(f"dtype must be a torch dtype or 'auto', got {dtype!r}")
    cfg_dtype = config.get("dtype") or config.get("torch_dtype")  # the key before transformers 5
    cfg_dtype = getattr(torch, cfg_dtype, None) if isinstance(cfg_dtype, str) else None
    if isinstance(cfg_dtype, torch.dtype):
        return cfg_dtype
    return next((i.dtype for i in source.infos.values() if i.dtype.is_floating_point), torch.get_default_dtype())


def _param_dtype(key: str, dtype: torch.dtype, dtype_plan: dict) -> torch.dtype:
    for module, forced in dtype_plan.items():
        if module in key.split("."):
            return forced
    return dtype


def _model_class(config):
    import transformers

    for arch_name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch_name, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise UserError(f"transformers has no model class for model_type {config.model_type!r}")


def _model_key(name: str, keys: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint tensor: as is, or with the base-model prefix added/removed
    (checkpoints saved from the bare model lack ``model.``; those of a head model loaded into the
    bare model have it)."""
    if name in keys:
        return name
    if prefix and f"{prefix}.{name}" in keys:
        return f"{prefix}.{name}"
    if prefix and name.startswith(f"{prefix}.") and name[len(prefix) + 1:] in keys:
        return name[len(prefix) + 1:]
    return None


def _attach_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            log.info("generation_config.json not used (%s)", e)


# -- raising the sparsity of a model in memory ---------------------------------------------------------------
def set_sparsity(model, sparsity: float) -> None:
    """Raise an OMP-pruned model (from ``from_pretrained``) to ``sparsity``, in place, without a reload.

    OMP masks are nested, so the weights to remove at a higher sparsity are among those still
    kept: the result equals ``from_pretrained(..., sparsity=sparsity)`` bit for bit. Key tables
    (kept from loading) give each threshold without a pass; without them one histogram pass over
    the weights in memory finds it, exact all the same (pruned weights are zeros, which sort first).
    """
    state: PruneState | None = getattr(model, "llm_prune_state", None)
    if state is None:
        raise UserError("set_sparsity needs a model from llm_prune.from_pretrained (it records how it was pruned)")
    cfg = state.config
    if cfg.method != "omp" or cfg.sparsity.is_nm:
        raise UserError(f"set_sparsity raises unstructured OMP masks; this model was pruned with {cfg.method} "
                        f"{cfg.sparsity}: load it again with the new setting")
    new = Sparsity.parse(sparsity)
    if new.ratio < cfg.sparsity.ratio:
        raise UserError(f"lowering sparsity from {cfg.sparsity.ratio:g} to {new.ratio:g} needs the dense weights, "
                        f"which are gone: load again with from_pretrained(..., sparsity={new.ratio:g})")
    if new.ratio == cfg.sparsity.ratio:
        return
    params = dict(model.named_parameters())
    weights = [params[n] for n in state.order]
    for n, p in zip(state.order, weights):
        if p.device.type == "meta":
            raise UserError(f"{n} is offloaded to disk; set_sparsity needs the weights in memory: "
                            "load again with from_pretrained(..., sparsity=...)")
        if p.dtype != state.prune_dtype and (state.prune_dtype, p.dtype) not in _LOSSLESS:
            raise UserError(f"the model holds {p.dtype} weights cast from {state.prune_dtype}; that cast merged "
                            "magnitudes, so raising sparsity exactly needs a new load at the new sparsity")
    with torch.no_grad():
        current = lambda p: p.detach().to("cpu", state.prune_dtype)  # noqa: E731  (exact, see _LOSSLESS)
        have_tables = state.tables.keys() >= set(state.order) and state.prune_dtype != torch.float32
        if have_tables:
            target, plan = _raised_plan(state, new)
        elif cfg.scope == "global":
            k = int(round(new.ratio * sum(p.numel() for p in weights)))
            t = find_threshold(lambda: (current(p) for p in weights), k)
            plan, ties = {}, t.ties
            for n, p in zip(state.order, weights):
                used = threshold_keep(current(p), t.key, ties)[1]
                plan[n], ties = (t.key, used), ties - used
        else:
            plan = None
        for n, p in zip(state.order, weights):
            w = current(p)  # p itself when it is on the CPU in the pruning dtype: pruned in place
            if plan is not None:
                threshold_prune_(w, *plan[n])
            else:
                magnitude_prune_(w, new, state.weight_in_first)
            if w.data_ptr() != p.data_ptr():
                p.data.copy_(w.to(p.device, p.dtype))
    state.config = PruneConfig(cfg.method, new, cfg.scope, cfg.targets, cfg.exclude)
    if have_tables:
        state.applied = target  # thresholds are recorded against the original weights


def _raised_plan(state: PruneState, new: Sparsity):
    """(thresholds on the original weights, (key, ties) to apply to each *current* tensor so that it ends as the original pruned at ``new``.

    On the original tensor the new threshold prunes keys < key1 and the first ties1 at key1. In
    memory the weights pruned before are +0.0 (key 0). If the old key equals the new one (and is
    not 0), the first old ties at that key are zeros now, so only ties1 - ties0 of the remaining
    ones go; otherwise every weight at key1 is still in place (key 0: zeros stay first in order).
    """
    if state.config.scope == "global":
        order = state.order
        k = int(round(new.ratio * sum(state.tables[n].numel for n in order)))
        if k == 0:
            target = {n: (-1, 0) for n in order}
        else:
            key, below = merge([state.tables[n] for n in order]).select(k)
            target = _deal_ties(order, key, k - below, {n: state.tables[n].count_at(key) for n in order})
    else:
        target = {n: _threshold(state.tables[n], prune_count(state.tables[n].numel, new.ratio)) for n in state.order}
    plan = {}
    for n, (key1, ties1) in target.items():
        key0, ties0 = state.applied.get(n, (-1, 0))
        plan[n] = (key1, ties1 - ties0 if key0 == key1 and key1 > 0 else ties1)
    return target, plan


register_decoder(Decoder("llm-prune formats", _formats_plan, formats.decode))
