"""Calibrated pruning (SparseGPT, Wanda, RIA) over the block stream, one block in memory at a time.

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

The next block's inputs come from the solver's full-precision weights, as in the reference
implementations (which propagate their working precision); only the export is rounded to the
checkpoint's dtype (BENCHMARKS.md compares both choices on SmolLM2). Those inputs cannot be
recomputed from the written shards, so each block's outputs are saved in the partial directory
(one file, replaced block by block) and a resumed run starts from them, bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Shares, allocate, outlier_ratio, target_blocks
from .blocks import (Observers, build_skeleton, capture_block_inputs, check_uniform, load_block, matmul_autocast,
                     observe, run_block)
from .calib_cache import cached_windows
from .calibration import CalibConfig
from .errors import UserError
from .lockstep import Lockstep, held_bytes
from .magnitude import all_finite
from .methods import get_method
from .methods.wanda import InputNorms, wanda_scores
from .reader import Unit
from .runtime import free_memory, resolve_device
from .writer import ShardWriter

log = logging.getLogger(__name__)


@dataclass
class _Pass:
    """What a calibrated run carries from block to block."""

    device: torch.device
    dtype: torch.dtype  # of activations and block forwards
    matmul: torch.dtype | None  # what the forwards' matmuls autocast to (bf16-mixed), else None
    store: torch.device  # where the activations live between blocks
    state: dict  # the run's state in progress.jsonl
    x: torch.Tensor | None = None  # the next block's inputs, [nsamples, seqlen, hidden]
    kwargs: dict | None = None  # what the model's forward passes its blocks
    blocks: nn.ModuleList | None = None  # the skeleton's blocks, on the meta device
    seconds: list[float] = field(default_factory=list)
    lockstep: bool = False  # --true-sequential in one forward per block (``lockstep``)


def prune_sequential(run) -> dict:
    """Prune every unit's targets of a ``pipeline.Run`` with its calibration method, block by
    block, and write them (same records, shard names and formats as the data-free exporter);
    finished units are skipped. Returns the fields to add to ``sparsity.json``."""
    cfg, calib, arch, writer, reader = run.cfg, run.calib, run.arch, run.writer, run.reader
    method = get_method(cfg.method)
    if not method.needs_calibration:
        raise UserError(f"method {cfg.method!r} does not prune from calibration data")
    method.check(cfg)
    if not arch.embed_modules:
        raise UserError(f"calibrated pruning has no entry for {arch.family} models yet "
                        "(embed_modules in llm_prune/arch.py)")
    if cfg.permute and not arch.permutable:
        raise UserError(f"--permute knows no matrix of {arch.family} models whose input channels it can reorder "
                        "(permutable in llm_prune/arch.py)")
    device, dtype = resolve_device(calib.device), calib.torch_dtype()
    seqlen = calib.resolved_seqlen(reader.config)
    run_key = {k: v for k, v in calib.to_json().items() if k not in ("device", "offload")} | {"seqlen": seqlen}
    if writer.state.get("calibration", run_key) != run_key:
        raise UserError(f"{writer.tmp} was started with other calibration settings "
                        f"({writer.state['calibration']}); delete it to start over")
    blocks_in_order = [u for u in run.units if u.block is not None]
    if [u.block for u in blocks_in_order] != list(range(len(blocks_in_order))):
        raise UserError("calibrated pruning needs blocks numbered 0..n-1 in the checkpoint")
    pending = [u.block for u in blocks_in_order if not writer.done(u)]
    report = {"source": calib.source, "nsamples": calib.nsamples, "seqlen": seqlen, "seed": calib.seed,
              "device": str(device), "activation_dtype": calib.dtype, "offload": calib.offload}
    report |= {f: getattr(calib, f) for f in method.calib_fields}
    log.info("calibration on %s in %s", device, calib.dtype)
    p = _Pass(device, dtype, calib.matmul_dtype(), torch.device("cpu") if calib.offload else device,
              {**writer.state, "calibration": run_key})
    if pending:
        report |= _start(run, p, seqlen)
        p.lockstep = _in_lockstep(run, p)
        if calib.true_sequential:  # how this run observed its groups (the bytes are the same either way)
            report["true_sequential_forwards"] = "one forward per block" if p.lockstep else "one forward per group"
    if cfg.allocation == "owl":
        t0 = time.perf_counter()
        run.shares = _owl_shares(run, p, blocks_in_order, first=bool(pending) and pending[0] == 0)
        p.state["allocation"] = run.shares.to_state()
        report["owl_first_pass_s"] = round(time.perf_counter() - t0, 3)  # what the second pass costs
    bar = tqdm(run.units, desc=f"{cfg.method} {cfg.sparsity}", unit="block", disable=not run.progress)
    with torch.no_grad():
        for pos, unit in enumerate(bar):
            if writer.done(unit):
                continue
            run.mark_read(unit.names)
            if unit.block is None:
                writer.write(unit, run.shard_name(pos), reader.sources(unit.names), {"stats": {}}, p.state)
                continue
            if unit.block == pending[0] and unit.block > 0:  # resume: the inputs the last run saved
                p.x.copy_(_load_inputs(writer, unit.block, p.x))
            t0 = time.perf_counter()
            _prune_block(run, p, unit, run.shard_name(pos))
            p.seconds.append(time.perf_counter() - t0)
            bar.set_postfix(s_per_block=f"{p.seconds[-1]:.1f}")
    if p.seconds:
        report["seconds_per_block"] = round(sum(p.seconds) / len(p.seconds), 3)
        report["block_seconds"] = [round(t, 3) for t in p.seconds]
    return {"calibration": report}


def _start(run, p: _Pass, seqlen: int) -> dict:
    """Calibration windows -> the skeleton -> block 0's inputs and kwargs; returns what to report."""
    reader = run.reader
    windows, info = cached_windows(run.calib, reader.path, seqlen)
    vocab = reader.config.get("vocab_size")
    if vocab and int(windows.max()) >= vocab:
        raise UserError(f"the tokenizer in {reader.path} produces ids up to {int(windows.max())}, "
                        f"beyond the model's vocabulary of {vocab}")
    skeleton = build_skeleton(reader.path)
    p.blocks = skeleton.get_submodule(run.arch.blocks_attr)
    check_uniform(p.blocks)
    p.x, p.kwargs = capture_block_inputs(skeleton, reader, run.arch, p.blocks[0], windows, p.device, p.dtype,
                                         p.store, run.progress)
    return info


def _owl_shares(run, p: _Pass, blocks: list[Unit], first: bool) -> Shares:
    """OWL's outlier ratio of every block (``allocation.outlier_ratio``), then the shares.

    Two passes, because OWL's map normalises each block's ratio by the minimum and maximum over
    all blocks: no block's sparsity is known before the last block's ratio is. This first pass is
    statistics only: each dense block is read and run once, with hooks summing its targets' input
    norms (Wanda's statistic, whatever the method: OWL's scores are Wanda's), and its outputs are
    the next block's inputs (the dense model's activations, as OWL's reference code takes them).
    No solver runs and nothing is written: one read and one forward per block on top of the
    pruning pass. Block 0's inputs wait on disk meanwhile (not a second copy in memory). A resumed
    run reads the shares from progress.jsonl instead.
    """
    cfg, reader, arch, writer = run.cfg, run.reader, run.arch, run.writer
    names, numels = target_blocks(run.units, reader.infos)
    if "allocation" in p.state or not first:
        if "allocation" not in p.state:
            raise UserError(f"{writer.tmp} holds no OWL allocation to resume with; delete it to start over")
        return Shares.from_state(p.state["allocation"], names, numels)
    _save_inputs(writer, 0, p.x)
    metric = {}
    for unit in tqdm(blocks, desc="owl outlier ratios", unit="block", disable=not run.progress, leave=False):
        tensors = _read_block(reader, unit)
        with torch.no_grad():
            block = load_block(p.blocks[unit.block], tensors, arch, p.device, p.dtype, p.matmul)
            rels = {arch.block_of(n)[1]: n for n in unit.targets}
            observers = Observers(block, list(rels), InputNorms, p.device)
            run_block(block, p.x, p.kwargs, p.device, p.dtype, collect=True, after_each=observers.end_forward,
                      matmul=p.matmul)
            observers.remove()
        if unit.targets:
            wif = arch.weight_in_first
            metric[unit.block] = outlier_ratio([wanda_scores(tensors[n].t() if wif else tensors[n],
                                                             observers.stat(r).norms) for r, n in rels.items()],
                                               cfg.owl_m)
        p.blocks[unit.block] = block.to("meta")
        del tensors, block
    p.x.copy_(_load_inputs(writer, 0, p.x))
    (writer.tmp / _inputs_file(0)).unlink(missing_ok=True)
    return allocate(cfg, metric, names, numels)


def _prune_block(run, p: _Pass, unit: Unit, file: str) -> None:
    """One block: read it, observe and solve its targets, run it pruned for the next block's
    inputs (saved before the block counts as done), write its shard, free it."""
    reader, arch = run.reader, run.arch
    tensors = _read_block(reader, unit)
    block = load_block(p.blocks[unit.block], tensors, arch, p.device, p.dtype, p.matmul)
    last = unit.block == len(p.blocks) - 1
    if p.lockstep:  # true-sequential in one forward, which also gives the outputs
        stats = _solve_in_lockstep(run, p, block, unit, tensors, outputs=not last)
    else:
        stats = _solve_targets(run, p, block, unit, tensors)
        if not last:
            p.x = run_block(block, p.x, p.kwargs, p.device, p.dtype, collect=True, matmul=p.matmul)
    if not last:
        _save_inputs(run.writer, unit.block + 1, p.x)
    p.blocks[unit.block] = block.to("meta")
    from .kernels.formats import encode_all  # numba: imported once, by the first block that needs it

    stored, meta = encode_all(tensors, {n: run.fmt for n in unit.targets})
    run.writer.write(unit, file, stored, {"stats": stats}, p.state, metadata=meta)
    (run.writer.tmp / _inputs_file(unit.block)).unlink(missing_ok=True)


def _read_block(reader, unit: Unit) -> dict[str, torch.Tensor]:
    """A block's tensors, refusing a damaged target by name."""
    tensors = reader.read(unit.names)
    for name in unit.targets:
        if not all_finite(tensors[name]):
            raise UserError(f"{name} (in {reader.infos[name].file}) has inf or nan values: the checkpoint is damaged")
    return tensors


def _solve_targets(run, p: _Pass, block: nn.Module, unit: Unit, tensors: dict[str, torch.Tensor]) -> dict:
    """Observe the block's targets and solve each; ``tensors`` get the pruned weights (in the
    checkpoint's dtype), the block the full-precision ones. Returns {name: [numel, zeros]}."""
    method, calib = get_method(run.cfg.method), run.calib
    rel_targets = {run.arch.block_of(n)[1]: n for n in unit.targets}
    producers = {**dict(run.arch.permutable), **dict(run.arch.permutable_heads)}
    first = observe(block, list(rel_targets), method, p.device, p.x, p.kwargs, p.dtype,
                    first_group_only=calib.true_sequential, matmul=p.matmul)
    groups = first.groups(list(rel_targets)) if calib.true_sequential else [list(rel_targets)]
    stats = {}
    for i, group in enumerate(groups):
        # true-sequential: each later group is observed anew, with the groups before it pruned
        observers = first if i == 0 else observe(block, group, method, p.device, p.x, p.kwargs, p.dtype,
                                                 matmul=p.matmul)
        for rel in group:
            stat = observers.stat(rel)
            if run.cfg.permute and rel in producers:
                stat = _permute_channels(run, block, tensors, unit, rel, stat, p.device)
            _solve_one(run, p, block, tensors, rel_targets[rel], rel, stat, stats)
    return stats


def _solve_one(run, p: _Pass, block: nn.Module, tensors: dict, name: str, rel: str, stat, stats: dict) -> None:
    """Solve target ``name`` (``rel`` in the block) from ``stat``: the block gets the solution in
    full precision, ``tensors`` and ``stats`` the export's rounding of it and its zeros."""
    new, _ = get_method(run.cfg.method).solve(tensors[name].to(p.device, torch.float32), stat,
                                              run.sparsity_of(name), weight_in_first=run.arch.weight_in_first,
                                              calib=run.calib)
    mod_path, pname = rel.rsplit(".", 1)  # the next block sees the full-precision solution
    module = block.get_submodule(mod_path)  # (in the dtype the block holds it in: bf16 under bf16-mixed)
    setattr(module, pname, nn.Parameter(new.to(p.device, getattr(module, pname).dtype), requires_grad=False))
    tensors[name] = stored = new.to(tensors[name].dtype).cpu()
    stats[name] = [stored.numel(), stored.numel() - int(torch.count_nonzero(stored))]


def _in_lockstep(run, p: _Pass) -> bool:
    """--true-sequential runs in one forward per block (``lockstep``) where every sample's
    activations fit at once: within half the memory the device has free. Both ways give the
    same bytes. --permute reorders channels of activations already computed: group by group."""
    if not run.calib.true_sequential or run.cfg.permute:
        return False
    matmul = p.matmul or p.dtype
    need = held_bytes(run.reader.config, *p.x.shape, p.dtype.itemsize, matmul.itemsize)
    if p.store != p.device:  # the inputs themselves move to the device sample by sample
        need += p.x.numel() * p.x.element_size()
    free = free_memory(p.device)
    if need > free // 2:
        log.info("--true-sequential: holding every sample's activations needs %.1f GiB of %.1f GiB free on %s; "
                 "solving group by group (one forward per group)", need / 2**30, free / 2**30, p.device)
        return False
    return True


def _solve_in_lockstep(run, p: _Pass, block: nn.Module, unit: Unit, tensors: dict, outputs: bool) -> dict:
    """True-sequential in one forward: every sample waits at each target until it is solved
    (``lockstep.Lockstep``); the block's outputs replace ``p.x`` when ``outputs``."""
    rel_targets = {run.arch.block_of(n)[1]: n for n in unit.targets}
    lockstep, stats = Lockstep(block, list(rel_targets), get_method(run.cfg.method).observer, p.device), {}
    try:
        with matmul_autocast(p.device, p.matmul):
            solved = lockstep.run(p.x, p.kwargs, p.dtype,
                                  lambda rel: _solve_one(run, p, block, tensors, rel_targets[rel], rel,
                                                         lockstep.stat(rel), stats),
                                  until=None if outputs else set(rel_targets))
    finally:
        lockstep.remove()
    # in the order solving group by group lists them: groups in forward order, each in target order
    leaders = dict.fromkeys(lockstep.leader[r] for r in solved)
    return {rel_targets[r]: stats[rel_targets[r]] for lead in leaders for r in rel_targets if lockstep.leader[r] == lead}


def _permute_channels(run, block: nn.Module, tensors: dict, unit: Unit, rel: str, stat, device):
    """``--permute``: reorder the input channels of target ``rel`` and the output channels of its
    producers (already solved: their pruned weights in ``tensors``, their solutions in ``block``)
    so that the N:M groups keep the most of the method's score. Returns the statistic in the new
    order (unchanged when the matrix cannot be reordered)."""
    from .permute import channel_permutation, head_permutation, permute_inputs

    arch, (n, m) = run.arch, (run.cfg.sparsity.n, run.cfg.sparsity.m)
    wif, method = arch.weight_in_first, get_method(run.cfg.method)
    prefix = unit.targets[0][:-len(arch.block_of(unit.targets[0])[1])]
    w = tensors[prefix + rel].to(device, torch.float32)
    scores = method.channel_score(w.t() if wif else w, stat)
    heads = dict(arch.permutable_heads)
    if rel in heads:
        cfg = run.reader.config
        n_heads = cfg.get("num_attention_heads") or 0
        kv_heads = cfg.get("num_key_value_heads") or n_heads
        if not n_heads or scores.shape[1] % n_heads or (scores.shape[1] // n_heads) % m or n_heads % kv_heads:
            log.info("--permute leaves %s in order: its heads do not split into whole groups of %d", rel, m)
            return stat
        perm, producer_perm = head_permutation(scores, n, m, n_heads, kv_heads)
        producer_rels = heads[rel]
    else:
        perm, producer_perm = channel_permutation(scores, n, m), None
        producer_rels = dict(arch.permutable)[rel]
    present = [r for r in producer_rels if prefix + r in tensors]
    permute_inputs(tensors, prefix + rel, [prefix + r for r in present], perm, wif, producer_perm)
    moved = {r: block.get_submodule(r.rsplit(".", 1)[0]).get_parameter(r.rsplit(".", 1)[1]).detach()
             for r in [rel, *present]}
    permute_inputs(moved, rel, present, perm.to(device), wif,
                   None if producer_perm is None else producer_perm.to(device))
    for r, t in moved.items():
        mod_path, pname = r.rsplit(".", 1)
        setattr(block.get_submodule(mod_path), pname, nn.Parameter(t, requires_grad=False))
    return stat.permuted(perm)


def saved_inputs_bytes(model_config: dict, calib: CalibConfig) -> int:
    """Disk the saved block inputs take at most (two files while one replaces the other)."""
    hidden = model_config.get("hidden_size") or model_config.get("d_model") or model_config.get("n_embd") or 0
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


