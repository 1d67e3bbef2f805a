"""Load a checkpoint into a transformers model tensor by tensor, pruning targets as they land.

    model = from_pretrained("vicuna-7b", method="omp", sparsity=0.4)      nothing written to disk
    set_sparsity(model, 0.5)                                               nested OMP masks: no reload
    model = load("exported-dir")                                           any export format

The model is built empty (parameters on the meta device), then each stored tensor is read from
its memory-mapped shard, decoded to a dense tensor (``decode``: plain safetensors, and the
sparse formats of ``llm_prune.kernels``), pruned if it is a target (``prune``), cast and placed
where the accelerate ``device_map`` says (``build``). Peak memory is the loaded model plus the
tensor in flight. The result is bit-identical to ``prune_checkpoint`` followed by a plain
transformers load.

    decode.py     stored formats -> dense tensors (Decoder registry, DenseSource)
    prune.py      pruning while loading, and what it records for set_sparsity
    keytables.py  per-tensor key tables, cached under the checkpoint's content hash
    build.py      the model, filled tensor by tensor (hf.py: transformers' private API, in one place)
    sparsity.py   set_sparsity
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..arch import arch_for
from ..config import DEFAULT_TARGETS, PruneConfig, Sparsity
from ..errors import UserError
from ..methods import get_method
from ..models import resolve_model
from ..reader import CheckpointReader
from ..targets import select_targets, target_order
from .build import Placement, materialize
from .decode import DECODERS, Decoder, DenseSource, register_decoder
from .prune import LoadPruner, PruneState
from .sparsity import prune_state, remember, set_sparsity

__all__ = ["from_pretrained", "load", "set_sparsity", "prune_state", "Decoder", "DECODERS", "register_decoder"]


def from_pretrained(name_or_path: str | os.PathLike, method: str = "omp", sparsity: float | str | None = None,
                    pattern: str | None = None, scope: str = "layer", targets=DEFAULT_TARGETS, exclude=(),
                    dtype=None, device_map=None, *, max_memory: dict | None = None,
                    offload_folder: str | os.PathLike | None = None, allow_pickle: bool = False,
                    progress: bool = True, allocation: str = "uniform", allocation_band: float | None = None,
                    allocation_clip: bool = True):
    """A transformers model whose targeted weights were pruned as they were read.

    Same pruning settings as ``prune_checkpoint`` (and ``llm-prune``), and the same weights bit
    for bit as exporting and loading the export; ``dtype``/``device_map``/``max_memory``/
    ``offload_folder`` mean what they mean to transformers' ``from_pretrained``. ``allocation``
    is ``uniform`` or ``alpha`` (data-free; ``owl`` needs calibration activations, which a load
    cannot run), with ``allocation_band`` as ``--allocation-band`` and ``allocation_clip=False`` as
    ``--allocation-unclipped``.
    """
    if sparsity is None and pattern is None:
        raise UserError("give sparsity= (a fraction in [0, 1)) or pattern='N:M'; llm_prune.load() loads without pruning")
    cfg = PruneConfig(method=method, sparsity=Sparsity.parse(sparsity, pattern), scope=scope,
                      targets=tuple([targets] if isinstance(targets, str) else targets),
                      exclude=tuple([exclude] if isinstance(exclude, str) else exclude),
                      allocation=allocation, band=allocation_band, clip=allocation_clip)
    pruner = get_method(cfg.method)
    if pruner.needs_calibration:
        raise UserError(f"method {cfg.method!r} needs calibration data, which loading cannot run; "
                        "prune with llm-prune and load the export")
    pruner.check(cfg)
    source = DenseSource(CheckpointReader(resolve_model(str(name_or_path)), allow_pickle=allow_pickle))
    arch = arch_for(source.reader.config)
    units = source.units(arch)
    select_targets(units, source.infos, arch, cfg)
    order = target_order(units)
    state = PruneState(cfg, arch.weight_in_first, source.infos[order[0]].dtype, order)
    where = Placement(dtype, device_map, max_memory, offload_folder)
    with ThreadPoolExecutor(1, thread_name_prefix="llm-prune-hash") as saver:  # waited for at the end
        prune = LoadPruner(source, pruner, state, progress, saver, units)
        model, names = materialize(source, where, {n: prune for n in order}, progress, prune.prepare)
    remember(model, state.renamed(names))
    return model


def load(path: str | os.PathLike, dtype=None, device_map=None, *, max_memory: dict | None = None,
         offload_folder: str | os.PathLike | None = None, allow_pickle: bool = False, progress: bool = True):
    """Any checkpoint directory (or known model name) as a transformers model, read tensor by tensor."""
    source = DenseSource(CheckpointReader(resolve_model(str(path)), allow_pickle=allow_pickle))
    return materialize(source, Placement(dtype, device_map, max_memory, offload_folder), {}, progress)[0]
