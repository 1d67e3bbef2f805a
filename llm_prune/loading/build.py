"""Building the transformers model a load fills: empty, then tensor by tensor, then tied and dispatched.

Reading (and pruning) run in a background thread from the start (``_Ahead``): they release the
GIL, so they overlap with importing the model's transformers modules and building it empty,
which is most of what a plain transformers load costs. Everything that touches transformers'
private API goes through ``hf``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..kernels.magnitude import set_threads
from . import hf
from .decode import DenseSource

log = logging.getLogger(__name__)

Transform = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Placement:
    """Where a load puts the model: what ``dtype``/``device_map``/``max_memory``/``offload_folder``
    mean to transformers' ``from_pretrained``."""

    dtype: object = None
    device_map: object = None
    max_memory: dict | None = None
    offload_folder: str | os.PathLike | None = None


def materialize(source: DenseSource, where: Placement, transforms: dict[str, Transform], progress: bool,
                prepare: Callable[[], None] | None = None):
    """Empty model -> each tensor read, transformed (pruned), cast and placed -> ties -> dispatch.

    ``prepare`` runs first in the reading thread (global scope's table pass). Transforms get
    tensors mapped from the file and return new ones. Returns the model and the map checkpoint
    name -> model parameter name."""
    dtype = _resolve_dtype(where.dtype, source.reader.config, source)
    # Tensors read ahead are held until the model exists. They are the model's own memory when
    # everything stays on the CPU and no cast shrinks them; otherwise read ahead only a little.
    shrinks = any(i.dtype.is_floating_point and i.dtype.itemsize > dtype.itemsize for i in source.infos.values())
    limit = None if where.device_map is None and not shrinks else 2
    building = threading.Event()
    building.set()
    with _Ahead(_transformed(source, transforms, prepare, building), limit) as tensors:
        return _build(source, dtype, where, transforms, _first_taken(tensors, building.clear), progress)


def _first_taken(items, callback):
    """``items``, calling ``callback`` when the first one is asked for."""
    callback()
    yield from items


def _transformed(source: DenseSource, transforms: dict[str, Transform], prepare=None,
                 building: threading.Event | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    # Everything is mapped, not read: what is not pruned stays untouched until used, as in
    # transformers' own load; what is pruned is read once, by the kernel writing its new copy.
    # While the main thread builds the model (``building``), the kernels here keep to one core:
    # on a small machine, two-core kernels would slow the build more than they gain.
    cores = 1 if building is not None and building.is_set() else None
    set_threads(cores)
    if prepare is not None:
        prepare()
    for name, w in source.read(list(source.infos), mapped=source.infos.keys()):
        if cores and not building.is_set():
            cores = None
            set_threads(None)
        yield name, (transforms[name](name, w) if name in transforms else w)


def _build(source: DenseSource, dtype: torch.dtype, where: Placement, transforms, tensors, progress: bool):
    from transformers import AutoConfig

    path = source.reader.path
    config = AutoConfig.from_pretrained(path)
    model = hf.empty_model(hf.model_class(config), config, dtype)
    model_keys = set(model.state_dict())
    names = hf.model_names(model, list(source.infos))
    unexpected = sorted(set(source.infos) - set(names))
    if unexpected:
        log.info("%d checkpoint tensors the model has no place for, ignored (first: %s)", len(unexpected), unexpected[0])
    dtype_plan = hf.dtype_plan(model, dtype)
    device_map, placement = hf.placement(model, where.device_map, where.max_memory, list(model_keys))
    offload_index: dict = {}
    offload_folder = str(where.offload_folder) if where.offload_folder is not None else None

    from accelerate.utils import set_module_tensor_to_device

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
                hf.offload_weight(w, key, offload_folder, offload_index)
        else:
            # clear_cache=False: the default runs gc.collect() for every tensor (seconds per load).
            set_module_tensor_to_device(model, key, device, value=w, clear_cache=False)
        loaded.add(key)
        del w

    hf.tie_weights(model, model_keys - loaded, offload_index)
    absent = sorted(n for n, p in model.named_parameters() if p.device.type == "meta" and n not in offload_index)
    if absent:
        raise UserError(f"{path} lacks {len(absent)} weight(s) the model needs (first: {absent[0]}); "
                        "is it the checkpoint of this architecture?")
    model.eval()
    _attach_generation_config(model, path)
    hf.dispatch(model, device_map, offload_folder, offload_index)
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


def model_key(name: str, keys: set[str], prefix: str) -> str | None:
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
