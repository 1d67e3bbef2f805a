"""The loop every reader reads: stream units in, prune their targets, write them out.

    reader = CheckpointReader(src)          validate every header before any work
    units  = reader.units(arch)             one per block, plus the non-block tensors
    (global scope) threshold = one pass     exact k-th magnitude over all targets
    for unit in units:                      the only place weights are in memory
        shard = writer.open(file, layout)   the output shard, laid out and allocated
        prune source -> shard               each target from the source's pages, in small pieces
        copy the rest file to file          (compressed formats: prune, encode, write from a thread)
        writer.commit(unit)                 logged in progress.jsonl
    writer.finish()                         index, side files, sparsity.json, atomic rename
"""

from __future__ import annotations

import fnmatch
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .arch import arch_for
from .calibration import CalibConfig
from .config import PruneConfig
from .errors import UserError
from .fingerprint import checkpoint_fingerprint, file_sha256
from .masks import Threshold, find_threshold, key_to_value
from .methods import get_method
from .methods.magnitude import NonFinite, threshold_plan, threshold_prune_
from .kernels.formats import check_encodable, encode_all
from .sequential import prune_sequential, saved_inputs_bytes
from .stream import SAFE_INDEX, SPARSE_INDEX, Arena, CheckpointReader, ShardWriter, TensorInfo, Unit, check_free_space

PRUNABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def prune_checkpoint(src: str | Path, cfg: PruneConfig, out: str | Path, *, fmt: str = "dense", calib: CalibConfig | None = None,
                     source_name: str | None = None, overwrite: bool = False, resume: bool = False,
                     allow_pickle: bool = False, progress: bool = True) -> dict:
    """Prune the checkpoint at ``src`` into ``out``; returns the ``sparsity.json`` payload.

    ``fmt`` stores the pruned targets as ``dense`` (zeros in place, loadable by anything),
    ``bitmask`` or ``packed24`` (see llm_prune.kernels.formats; loaded by ``llm_prune.load``).
    Calibration methods (SparseGPT, Wanda) run sequentially over the blocks with ``calib``.
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    method = get_method(cfg.method)
    calib = (calib or CalibConfig()) if method.needs_calibration else None
    reader = CheckpointReader(src, allow_pickle=allow_pickle)
    arch = arch_for(reader.config)
    units = reader.units(arch)
    select_targets(units, reader.infos, arch, cfg)
    check_format(units, reader.infos, arch, cfg, fmt)
    writer = ShardWriter(out, _run_key(reader, cfg, fmt, calib), overwrite=overwrite, resume=resume,
                         index_name=index_name(fmt))
    try:
        needed = sum(i.nbytes for i in reader.infos.values()) - _written_bytes(writer)
        if calib is not None:
            needed += saved_inputs_bytes(reader.config, calib)
        check_free_space(out.parent, needed)
        # Hash the source in the background: it is I/O the pruning loop can overlap.
        with ThreadPoolExecutor(1) as pool:
            hashes = pool.submit(lambda: {f: file_sha256(src / f) for f in reader.files})
            extra = {}
            if calib is not None:
                extra = prune_sequential(reader, units, cfg, calib, arch, writer, progress, fmt)
            else:
                threshold = _global_threshold(reader, units, cfg, writer, progress) if cfg.scope == "global" else None
                _prune_units(reader, units, cfg, arch, method, writer, threshold, progress, fmt)
            file_hashes = hashes.result()
    except UserError:
        writer.abort()  # bad data: nothing half-written stays behind
        raise
    report = {**_report(reader, units, cfg, writer, source_name or str(src), src, file_hashes, t0, fmt), **extra}
    weight_map = {n: rec["file"] for rec in writer.records().values() for n in rec["tensors"]}
    index = {"metadata": {"total_size": report["run"]["output_bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
    writer.finish(index, src, {"sparsity.json": report})
    return report


def select_targets(units: list[Unit], infos: dict[str, TensorInfo], arch, cfg: PruneConfig) -> None:
    """Mark each block's targets and check, from headers alone, that they can be pruned as asked."""
    dtypes = set()
    for unit in units:
        if unit.block is None:
            continue
        for name in unit.names:
            rel = arch.block_of(name)[1]
            info = infos[name]
            if len(info.shape) != 2 or not _matches(rel, name, cfg.targets) or _matches(rel, name, cfg.exclude):
                continue
            if info.dtype not in PRUNABLE_DTYPES:
                raise UserError(f"{name} has dtype {info.dtype}; targets must be fp16, bf16 or fp32 (see --exclude)")
            if cfg.sparsity.is_nm:
                in_dim = info.shape[0] if arch.weight_in_first else info.shape[1]
                if in_dim % cfg.sparsity.m:
                    raise UserError(f"{name} has input dimension {in_dim}, not a multiple of {cfg.sparsity.m}: "
                                    f"pattern {cfg.sparsity} cannot apply (leave it out with --exclude)")
            unit.targets.append(name)
            dtypes.add(info.dtype)
    if not any(u.targets for u in units):
        raise UserError(f"no tensor inside the transformer blocks matches --targets {' '.join(cfg.targets)}")
    if cfg.scope == "global" and len(dtypes) > 1:
        raise UserError(f"--scope global needs one dtype across targets, found {sorted(map(str, dtypes))}")


def check_format(units: list[Unit], infos: dict[str, TensorInfo], arch, cfg: PruneConfig, fmt: str) -> None:
    """Refuse, from headers alone, a storage format that cannot hold the pruned targets."""
    if fmt == "packed24" and (cfg.sparsity.n, cfg.sparsity.m) != (2, 4):
        raise UserError(f"--format packed24 stores 2:4 weights; this run prunes to {cfg.sparsity} (use --format bitmask)")
    if fmt == "packed24" and arch.weight_in_first:
        raise UserError(f"--format packed24 groups along the last dimension; {arch.family} stores weights "
                        "[in, out] (use --format bitmask)")
    for unit in units:
        for name in unit.targets:
            check_encodable(name, infos[name].shape, infos[name].dtype, fmt)


def index_name(fmt: str) -> str:
    """Compressed checkpoints get their own index name so that transformers refuses them loudly
    (instead of loading a model with its weights missing); llm_prune.load reads both."""
    return SAFE_INDEX if fmt == "dense" else SPARSE_INDEX


def _matches(rel: str, full: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(full, p) for p in patterns)


def _global_threshold(reader, units, cfg, writer, progress) -> Threshold:
    """One exact magnitude threshold over every target, kept in progress.jsonl for --resume."""
    if "threshold" in writer.state:
        return Threshold(**writer.state["threshold"])
    targets = [u for u in units if u.targets]

    def visit():
        for unit in tqdm(targets, desc="global threshold", unit="block", disable=not progress, leave=False):
            yield from reader.read(unit.targets).values()

    total = sum(reader.infos[n].numel for u in targets for n in u.targets)
    threshold = find_threshold(visit, int(round(cfg.sparsity.ratio * total)))
    writer.progress["state"] = {"threshold": threshold.__dict__, "ties_left": threshold.ties}
    return threshold


def _prune_units(reader, units, cfg, arch, method, writer, threshold, progress, fmt) -> None:
    """Prune unit by unit, in file order; tensors that are not pruned are copied file to file.

    Dense output (the default): each target is read from the source file's pages and pruned a
    few MiB at a time into a small buffer written to its place in the output shard
    (``ShardFile``), so the weights cross memory once and no block is ever held. Compressed formats prune
    into a reused buffer (``Arena``), encode, and write from a thread while the next unit is pruned.
    Units with nothing to prune (embeddings, head) are copied by the kernel from that thread from
    the start, beside the kernels' start-up and the pruning.
    """
    ties_left = writer.state.get("ties_left", 0)  # carried in unit order, into progress.jsonl
    stem = "model" if fmt == "dense" else "sparse"
    files = [f"{stem}-{pos + 1:05d}-of-{len(units):05d}.safetensors" for pos in range(len(units))]
    todo = [(file, u) for file, u in zip(files, units) if not writer.done(u)]
    copied = [(file, u) for file, u in todo if not u.targets and not reader.pickle]
    arenas, in_flight = [Arena(), Arena()], None  # alternate: a write in flight holds the other
    with ThreadPoolExecutor(1, thread_name_prefix="llm-prune-writer") as pool:
        copies = [pool.submit(writer.write, u, file, reader.sources(u.names), {"stats": {}}) for file, u in copied]
        try:
            bar = tqdm([t for t in todo if t not in copied], desc=f"{cfg.method} {cfg.sparsity}", unit="block",
                       disable=not progress)
            for file, unit in bar:
                for f in copies:  # a copy that failed (a full disk) stops the run now, not at the end
                    if f.done() and f.exception() is not None:
                        f.result()
                others = reader.sources([n for n in unit.names if n not in unit.targets])
                if fmt == "dense" and not reader.pickle:
                    specs = {n: (reader.infos[n].dtype, reader.infos[n].shape) for n in unit.names}
                    with writer.open(file, specs) as shard:
                        for name, src in others.items():
                            shard.copy_from(name, src)
                        stats, ties_left = _prune_targets(reader, unit, cfg, arch, method, threshold, ties_left,
                                                          shard=shard)
                    writer.commit(unit, file, list(specs), {"stats": stats}, _state(writer, threshold, ties_left))
                    continue
                arenas.reverse()
                views = dict(zip(unit.targets, arenas[0].carve([reader.infos[n].nbytes for n in unit.targets])))
                out = lambda n: views[n].view(reader.infos[n].dtype).view(reader.infos[n].shape)  # noqa: E731
                stats, ties_left = _prune_targets(reader, unit, cfg, arch, method, threshold, ties_left, out)
                if in_flight is not None:
                    in_flight.result()  # one write at a time, in order
                stored, meta = encode_all({n: out(n) for n in unit.targets}, {n: fmt for n in unit.targets})
                stored.update(others)
                in_flight = pool.submit(writer.write, unit, file, stored, {"stats": stats},
                                        _state(writer, threshold, ties_left), metadata=meta)
            for f in copies + ([in_flight] if in_flight is not None else []):
                f.result()
        finally:
            # Never leave a write running into a directory being removed.
            wait(copies + ([in_flight] if in_flight is not None else []))


PIECE_BYTES = 4 << 20  # the exporter prunes this much at a time into a buffer that stays in cache


def _prune_targets(reader, unit, cfg, arch, method, threshold, ties_left, out_of=None, shard=None):
    """Prune each target of ``unit`` from the source, into ``out_of(name)`` or into ``shard``.

    Into a shard, the kernels prune a few MiB at a time into one small buffer that is written
    with ``pwrite``: less system time than faulting in a mapping of the output one 4 KiB page at
    a time, the same wall time (BENCHMARKS.md, streaming run 6), and the output never occupies
    memory. Returns ({name: [numel, zeros]}, the global threshold's ties left)."""
    stats, buf = {}, None
    pickled = reader.read(unit.targets) if reader.pickle else None
    for name in unit.targets:  # in name order: the order a global threshold's ties are pruned in
        src = pickled.pop(name) if pickled is not None else next(reader.read_mapped([name]))[1]
        try:
            plan = (threshold_plan(src, threshold.key, ties_left) if threshold is not None
                    else method.plan(src, cfg.sparsity, arch.weight_in_first) if method.plan else None)
            if shard is not None and plan is not None:
                if buf is None or buf.dtype != src.dtype:
                    buf = torch.empty(PIECE_BYTES // src.element_size(), dtype=src.dtype)
                zeros = _prune_in_pieces(plan, src, buf, lambda at, piece: shard.write(name, piece, at))
            else:
                out = shard.tensor(name) if shard is not None else out_of(name)
                if plan is not None:
                    zeros = plan.apply(src, out)
                elif threshold is not None:
                    zeros, used = threshold_prune_(src, threshold.key, ties_left, out=out)
                else:
                    zeros = method.prune_(src, cfg.sparsity, arch.weight_in_first, out=out)
                del out
        except NonFinite:
            raise UserError(f"{name} (in {reader.infos[name].file}) has inf or nan values: "
                            "the checkpoint is damaged") from None
        if threshold is not None:
            ties_left -= plan.used if plan is not None else used
        stats[name] = [src.numel(), zeros]
        del src  # unmaps the source tensor: memory stays one tensor of source pages
    return stats, ties_left


def _prune_in_pieces(plan, src: torch.Tensor, buf: torch.Tensor, write) -> int:
    """Apply ``plan`` to ``src`` piece by piece through ``buf``; ``write(byte offset, piece)``."""
    flat, zeros = src.reshape(-1), 0
    step = max(plan.align, buf.numel() // plan.align * plan.align)
    for at in range(0, flat.numel(), step):
        piece = flat[at:at + step]
        out = buf[:piece.numel()]
        zeros += plan.apply(piece, out)
        write(at * src.element_size(), out)
    return zeros


def _state(writer, threshold, ties_left) -> dict | None:
    return {**writer.state, "ties_left": ties_left} if threshold is not None else None


def _run_key(reader: CheckpointReader, cfg: PruneConfig, fmt: str, calib: CalibConfig | None) -> dict:
    """What a resumed run must share with the one that left the partial directory."""
    files = {f: [os.stat(reader.path / f).st_size, os.stat(reader.path / f).st_mtime_ns] for f in reader.files}
    return {"config": cfg.to_json(), "format": fmt, "calibration": calib.to_json() if calib else None,
            "source": str(reader.path.resolve()), "files": files, "version": __version__}


def _written_bytes(writer: ShardWriter) -> int:
    return sum(f.stat().st_size for f in writer.tmp.glob("*.safetensors"))


def _report(reader, units, cfg, writer, source_name, src, file_hashes, t0, fmt) -> dict:
    per_tensor: dict[str, list[int]] = {}
    for rec in writer.records().values():
        per_tensor.update(rec.get("stats", {}))
    arch = arch_for(reader.config)
    by_type: dict[str, list[int]] = {}
    for name, (numel, zeros) in per_tensor.items():
        kind = arch.block_of(name)[1].removesuffix(".weight")
        acc = by_type.setdefault(kind, [0, 0])
        acc[0] += numel
        acc[1] += zeros
    n_t, z_t = sum(v[0] for v in per_tensor.values()), sum(v[1] for v in per_tensor.values())
    n_all = sum(i.numel for i in reader.infos.values())
    report = {
        "tool": {"name": "llm-prune", "version": __version__},
        "method": cfg.method,
        "scope": cfg.scope,
        "pattern": f"{cfg.sparsity.n}:{cfg.sparsity.m}" if cfg.sparsity.is_nm else None,
        "target_sparsity": cfg.sparsity.ratio,
        "targets": list(cfg.targets),
        "exclude": list(cfg.exclude),
        "format": fmt,  # of the targets; every other tensor is stored dense
        "formats": {n: fmt for u in units for n in u.targets},
        "source": {"name": source_name, "path": str(Path(src).resolve()), "files": file_hashes,
                   "fingerprint": checkpoint_fingerprint(file_hashes)},
        "achieved": {
            "targeted": z_t / n_t,
            "all_parameters": z_t / n_all,  # zeros outside the targets are not counted
            "targeted_params": n_t,
            "all_params": n_all,
            "by_type": {k: {"params": v[0], "sparsity": v[1] / v[0]} for k, v in sorted(by_type.items())},
            "tensors": {n: z / max(numel, 1) for n, (numel, z) in sorted(per_tensor.items())},
        },
        "run": {
            "time_s": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "output_bytes": _written_bytes(writer),
            "units": len(units),
            "resumed_units": writer.resumed,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    if cfg.scope == "global":
        t = Threshold(**writer.state["threshold"])
        dtype = reader.infos[next(n for u in units for n in u.targets)].dtype
        report["threshold"] = {"magnitude": key_to_value(t.key, dtype) if t.k else 0.0, "pruned": t.k, "of": t.total}
    return report
