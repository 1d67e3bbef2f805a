"""Calibrated pruning (SparseGPT, Wanda) over the block stream, one block in memory at a time.

    windows  = calibration token windows           [nsamples, seqlen]
    skeleton = the model on the meta device         nothing allocated
    x        = inputs of block 0                     only the embedding is materialised
    for each block, in order:
        build it from the stream (assign=True)      one block in memory
        hook its targets; run x through it          statistics in fp32
        solve every target                          new weight + keep-mask (fp32)
        x = pruned block(x)                         the next block's inputs
        save x; write its shard; free it            x saved: what a resume starts from
    the other tensors (embeddings, norm, head) are written unchanged

Block kwargs (attention mask, rotary embeddings, position ids, caches off) are whatever the
model's own forward passes to block 0, captured by a pre-hook, so families differ only by the
data in ``llm_prune.arch``.

The next block's inputs come from the solver's full-precision weights, as in the reference
implementations (which propagate their working precision); only the export is rounded to the
checkpoint's dtype. On SmolLM2 (bf16) this gave lower perplexity than propagating the rounded
weights in every pair measured (BENCHMARKS.md). Those inputs cannot be recomputed from the
written shards, so each block's outputs are saved in the partial directory (one file, replaced
block by block) and a resumed run starts from them, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Arch
from .calibration import CalibConfig, calibration_windows, load_tokenizer, resolve_device
from .config import PruneConfig
from .errors import UserError
from .kernels.formats import encode_all
from .masks import all_finite
from .methods import get_method
from .stream import CheckpointReader, ShardWriter, Unit

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the block-0 pre-hook: the rest of the model is never run."""


def prune_sequential(reader: CheckpointReader, units: list[Unit], cfg: PruneConfig, calib: CalibConfig,
                     arch: Arch, writer: ShardWriter, progress: bool = True, fmt: str = "dense") -> dict:
    """Prune every unit's targets with ``cfg.method`` (a calibration method) and write them.

    Same records, shard names and storage formats (``fmt``) as ``pipeline._prune_units``;
    finished units are skipped.
    Returns the fields to add to ``sparsity.json`` (``{"calibration": {...}}``).
    """
    method = get_method(cfg.method)
    if method.observer is None or method.solve is None:
        raise UserError(f"method {cfg.method!r} does not prune from calibration data")
    if cfg.scope != "layer":
        raise UserError(f"{cfg.method} prunes each matrix from its own statistics; --scope {cfg.scope} does not apply")
    if not arch.embed_modules:
        raise UserError(f"calibrated pruning has no entry for {arch.family} models yet "
                        "(embed_modules in llm_prune/arch.py)")
    device, dtype = resolve_device(calib.device), calib.torch_dtype()
    store = torch.device("cpu") if calib.offload else device
    seqlen = calib.resolved_seqlen(reader.config)
    run_key = {k: v for k, v in calib.to_json().items() if k not in ("device", "offload")} | {"seqlen": seqlen}
    if writer.state.get("calibration", run_key) != run_key:
        raise UserError(f"{writer.tmp} was started with other calibration settings "
                        f"({writer.state['calibration']}); delete it to start over")
    state = {**writer.state, "calibration": run_key}
    blocks_in_order = [u for u in units if u.block is not None]
    if [u.block for u in blocks_in_order] != list(range(len(blocks_in_order))):
        raise UserError("calibrated pruning needs blocks numbered 0..n-1 in the checkpoint")
    pending = [u.block for u in blocks_in_order if not writer.done(u)]
    report = {"source": calib.source, "nsamples": calib.nsamples, "seqlen": seqlen, "seed": calib.seed,
              "device": str(device), "activation_dtype": calib.dtype, "offload": calib.offload}
    if cfg.method == "sparsegpt":
        report |= {"damp": calib.damp, "blocksize": calib.blocksize}
    log.info("calibration on %s in %s (%s)", device, calib.dtype,
             "fp32 keeps CPU matmuls fast and exact" if dtype == torch.float32 else "as asked")

    x = kwargs = blocks = None
    if pending:
        windows, info = calibration_windows(calib, load_tokenizer(reader.path), seqlen)
        report |= info
        vocab = reader.config.get("vocab_size")
        if vocab and int(windows.max()) >= vocab:
            raise UserError(f"the tokenizer in {reader.path} produces ids up to {int(windows.max())}, "
                            f"beyond the model's vocabulary of {vocab}")
        skeleton = build_skeleton(reader.path)
        blocks = skeleton.get_submodule(arch.blocks_attr)
        _check_uniform(blocks)
        x, kwargs = capture_block_inputs(skeleton, reader, arch, blocks[0], windows, device, dtype, store, progress)
        del skeleton, windows
    seconds: list[float] = []
    n_units = len(units)
    bar = tqdm(units, desc=f"{cfg.method} {cfg.sparsity}", unit="block", disable=not progress)
    with torch.no_grad():
        for pos, unit in enumerate(bar):
            file = f"{'model' if fmt == 'dense' else 'sparse'}-{pos + 1:05d}-of-{n_units:05d}.safetensors"
            if unit.block is None:
                if not writer.done(unit):
                    writer.write(unit, file, reader.sources(unit.names), {"stats": {}}, state)
                continue
            if writer.done(unit):
                continue
            if unit.block == pending[0] and unit.block > 0:  # resume: the inputs the last run saved
                x.copy_(_load_inputs(writer, unit.block, x))
            t0 = time.perf_counter()
            tensors = reader.read(unit.names)
            for name in unit.targets:
                if not all_finite(tensors[name]):
                    raise UserError(f"{name} (in {reader.infos[name].file}) has inf or nan values: "
                                    "the checkpoint is damaged")
            block = load_block(blocks[unit.block], tensors, arch, device, dtype)
            rel_targets = {arch.block_of(n)[1]: n for n in unit.targets}
            first = _observe(block, list(rel_targets), method, device, x, kwargs, dtype,
                             first_group_only=calib.true_sequential)
            groups = first.groups(list(rel_targets)) if calib.true_sequential else [list(rel_targets)]
            stats = {}
            for i, group in enumerate(groups):
                # true-sequential: each later group is observed anew, with the groups before it pruned
                observers = first if i == 0 else _observe(block, group, method, device, x, kwargs, dtype)
                for rel in group:
                    name = rel_targets[rel]
                    new, keep = method.solve(tensors[name].to(device, torch.float32), observers.stat(rel),
                                             cfg.sparsity, weight_in_first=arch.weight_in_first, calib=calib)
                    mod_path, pname = rel.rsplit(".", 1)  # the next block sees the full-precision solution
                    setattr(block.get_submodule(mod_path), pname,
                            nn.Parameter(new.to(device, dtype), requires_grad=False))
                    tensors[name] = stored = new.to(tensors[name].dtype).cpu()
                    stats[name] = [stored.numel(), stored.numel() - int(torch.count_nonzero(stored))]
            del observers, first
            if unit.block < len(blocks) - 1:
                x = run_block(block, x, kwargs, device, dtype, collect=True)
                _save_inputs(writer, unit.block + 1, x)  # before the block counts as done
            blocks[unit.block] = block.to("meta")
            stored, meta = encode_all(tensors, {n: fmt for n in unit.targets})
            writer.write(unit, file, stored, {"stats": stats}, state, metadata=meta)
            (writer.tmp / _inputs_file(unit.block)).unlink(missing_ok=True)
            del tensors, stored, block
            seconds.append(time.perf_counter() - t0)
            bar.set_postfix(s_per_block=f"{seconds[-1]:.1f}")
    if seconds:
        report["seconds_per_block"] = round(sum(seconds) / len(seconds), 3)
        report["block_seconds"] = [round(t, 3) for t in seconds]
    return {"calibration": report}


# -- the model's parts --------------------------------------------------------------------------
def build_skeleton(model_dir) -> nn.Module:
    """The whole model with every parameter on the meta device (no memory); buffers that are
    computed rather than stored (rotary ``inv_freq``) are real, because the forward needs them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UserError(f"calibrated pruning needs a causal LM; transformers cannot build one from "
                        f"{model_dir}/config.json ({e})") from None
    return model.eval()


def _check_uniform(blocks: nn.ModuleList) -> None:
    # The kwargs captured at block 0 (e.g. the attention mask) serve every block; models that
    # alternate sliding-window and full attention per layer would need one capture per type.
    kinds = {getattr(b, "attention_type", None) for b in blocks}
    if len(kinds) > 1:
        raise UserError(f"blocks use different attention types ({sorted(map(str, kinds))}); "
                        "calibrated pruning supports one type per model so far")


def capture_block_inputs(skeleton: nn.Module, reader: CheckpointReader, arch: Arch, block0: nn.Module,
                         windows: torch.Tensor, device, dtype, store, progress: bool = False):
    """([nsamples, seqlen, hidden] inputs of block 0 on ``store``, the kwargs block 0 receives).

    Only ``arch.embed_modules`` are filled from the checkpoint; a pre-hook on block 0 records its
    inputs and stops the forward there, and the embeddings go back to the meta device after.
    """
    loaded = _load_embeddings(skeleton, reader, arch, device, dtype)
    for m in skeleton.modules():  # computed buffers (rotary frequencies) follow the device
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                m._buffers[k] = b.to(device)
    seen: dict = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    x = None
    try:
        with torch.no_grad():
            for j in tqdm(range(windows.shape[0]), desc="block 0 inputs", unit="sample", disable=not progress,
                          leave=False):
                try:
                    skeleton(input_ids=windows[j:j + 1].to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError(f"the forward of {type(skeleton).__name__} never reached block 0")
                if x is None:
                    x = torch.empty((windows.shape[0], *seen["h"].shape[1:]), dtype=dtype, device=store)
                x[j] = seen["h"][0]
    finally:
        handle.remove()
        for module in loaded:
            module.to("meta")
    return x, seen["kwargs"]


def _load_embeddings(skeleton, reader, arch, device, dtype) -> list[nn.Module]:
    prefix = getattr(skeleton, "base_model_prefix", "") + "."
    loaded = []
    for path in arch.embed_modules:
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            continue  # optional part this configuration does not have (OPT's project_in)
        names = {}
        for key in module.state_dict():
            full = f"{path}.{key}"
            name = full if full in reader.infos else full.removeprefix(prefix)
            if name not in reader.infos:
                raise UserError(f"the checkpoint has no {full}, which computes the calibration inputs")
            names[key] = name
        tensors = reader.read(list(names.values()))
        module.load_state_dict({k: _cast(tensors[n], device, dtype) for k, n in names.items()}, assign=True)
        loaded.append(module)
    return loaded


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    # Always a copy: reader tensors are copy-on-write mmaps that must never be written.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)


def load_block(module: nn.Module, tensors: dict[str, torch.Tensor], arch: Arch, device, dtype) -> nn.Module:
    """Fill a meta-device block with its checkpoint tensors (cast to ``dtype``) on ``device``."""
    state = {arch.block_of(n)[1]: _cast(t, device, dtype) for n, t in tensors.items()}
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"the checkpoint's block holds tensors the model's block does not have: "
                        f"{', '.join(result.unexpected_keys[:3])}")
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"the checkpoint's block lacks {', '.join(missing[:3])}")
    return module.to(device).eval()


def saved_inputs_bytes(model_config: dict, calib: CalibConfig) -> int:
    """Disk the saved block inputs take at most (two files while one replaces the other)."""
    hidden = model_config.get("hidden_size") or model_config.get("d_model") or 0
    return 2 * calib.nsamples * calib.resolved_seqlen(model_config) * hidden * calib.torch_dtype().itemsize


def _inputs_file(block: int) -> str:
    return f"calibration-inputs-{block:05d}.bin"


def _save_inputs(writer: ShardWriter, block: int, x: torch.Tensor) -> None:
    """The inputs of ``block``, raw bytes beside the shards (shape and dtype are the run's own)."""
    path = writer.tmp / _inputs_file(block)
    tmp = path.with_name(path.name + ".tmp")
    x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tofile(tmp)
    os.replace(tmp, path)


def _load_inputs(writer: ShardWriter, block: int, like: torch.Tensor) -> torch.Tensor:
    path = writer.tmp / _inputs_file(block)
    nbytes = like.numel() * like.element_size()
    if not path.is_file() or path.stat().st_size != nbytes:
        raise UserError(f"{writer.tmp} lacks the saved inputs of block {block} ({path.name}), so the run cannot "
                        "continue where it stopped; delete it to start over")
    return torch.from_file(str(path), size=nbytes, dtype=torch.uint8).view(like.dtype).view(like.shape)


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, device, dtype, *, collect: bool,
              after_each=None) -> torch.Tensor | None:
    """Run every sample through ``block``, one at a time (as the reference code does: memory is
    one sample's activations). Returns the outputs, in place of ``x``, when ``collect``."""
    for j in range(x.shape[0]):
        y = block(x[j:j + 1].to(device, dtype), **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if after_each is not None:
            after_each()
        if collect:
            x[j] = y[0].to(x.device, x.dtype)  # sample j is consumed before it is overwritten
    return x if collect else None


def _observe(block, rels, method, device, x, kwargs, dtype, first_group_only=False) -> "_Observers":
    """One forward of every sample through ``block`` with ``rels`` observed."""
    observers = _Observers(block, rels, method.observer, device, first_group_only=first_group_only)
    run_block(block, x, kwargs, device, dtype, collect=False, after_each=observers.end_forward)
    observers.remove()
    return observers


class _Observers:
    """Forward pre-hooks feeding each target's inputs to its method's observer.

    Targets that receive the very same input tensor (q/k/v projections; gate/up) share one
    observer: the statistic is a function of the input alone, so computing it once is exact.
    Sharing is decided on the first forward by object identity, never by address (a freed
    activation's memory can be reused by the next one).
    """

    def __init__(self, block: nn.Module, rel_names: list[str], make, device, first_group_only: bool = False):
        self.first_group_only = first_group_only  # accumulate only the first input group's statistics
        self.leader: dict[str, str] = {}
        self.stats: dict[str, object] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._first = True
        self._handles = []
        for rel in rel_names:
            module = block.get_submodule(rel.rsplit(".", 1)[0])
            self._handles.append(module.register_forward_pre_hook(self._hook(rel, make, device)))

    def _hook(self, rel, make, device):
        def pre(module, args):
            x = args[0]
            if self._first:
                leader = next((name for t, name in self._seen if t is x), None)
                if leader is not None:
                    self.leader[rel] = leader
                    return
                self._seen.append((x, rel))
                self.leader[rel] = rel
                if self.first_group_only and self.stats:
                    return  # a later group: observed in its own forward, after the earlier ones are pruned
                self.stats[rel] = make(x.shape[-1], device)
            if rel in self.stats:
                self.stats[rel].add(x.detach())
        return pre

    def end_forward(self) -> None:
        self._first = False
        self._seen.clear()

    def groups(self, rel_names: list[str]) -> list[list[str]]:
        """``rel_names`` grouped by shared input, the groups in forward order."""
        for rel in rel_names:
            if rel not in self.leader:
                self.stat(rel)  # refuses a target that never ran
        return [[r for r in rel_names if self.leader[r] == leader] for leader in dict.fromkeys(self.leader.values())]

    def stat(self, rel: str):
        if rel not in self.leader:
            raise UserError(f"{rel} never ran in the block's forward, so it has no calibration statistics "
                            "(leave it out with --exclude)")
        return self.stats[self.leader[rel]]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
