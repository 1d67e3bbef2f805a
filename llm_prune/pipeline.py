"""The exporter, the loop every reader reads: stream units in, prune their targets, write them out.

    reader = CheckpointReader(src)          validate every header before any work
    units  = reader.units(arch)             one per block, plus the non-block tensors
    (global scope) threshold = one pass     exact k-th score over all targets
    for unit in units:                      the only place weights are in memory
        shard = writer.open(file, layout)   the output shard, laid out and allocated
        prune source -> shard               each target from the source's pages, in small pieces
        copy the rest file to file          (large exports: the shard staged whole, written O_DIRECT;
                                             compressed formats: prune, encode, write from a thread)
        writer.commit(unit)                 logged in progress.jsonl
    writer.finish()                         index, side files, sparsity.json, atomic rename

Calibrated methods run the same units through ``sequential.prune_sequential`` instead.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .arch import Arch, arch_for
from .calibration import CalibConfig
from .allocation import Shares, alpha_shares, finite
from .config import PruneConfig, Sparsity
from .errors import UserError
from .fingerprint import SourceHasher
from .magnitude import NonFinite, Threshold, bucket_table, table_threshold
from .methods import Method, get_method, prune_
from .paths import check_apart
from .reader import SAFE_INDEX, SPARSE_INDEX, CheckpointReader, TensorInfo, Unit
from .report import build_report
from .run_tables import RunTables
from .sequential import prune_sequential, saved_inputs_bytes
from .spectrum import SpectrumCache
from .study.compare import MASK_FILE
from .targets import select_targets
from .writer import Arena, ShardWriter, Stage, check_free_space

PIECE_BYTES = 4 << 20  # the exporter prunes this much at a time, into a buffer that stays in cache
DIRECT_IO = True  # dense shards written with O_DIRECT where the output's file system takes it (``Stage``)
# ... when the export writes at least this much: a small output is faster through the page cache,
# whose write-back then happens after the run (BENCHMARKS.md, session 23)
DIRECT_MIN_BYTES = 1 << 30


@dataclass
class Run:
    """One export: where it reads, what it prunes and how, where it writes."""

    reader: CheckpointReader
    units: list[Unit]
    cfg: PruneConfig
    arch: Arch
    method: Method
    writer: ShardWriter
    fmt: str = "dense"
    calib: CalibConfig | None = None
    progress: bool = True
    shares: Shares | None = None  # a non-uniform allocation's count per target (None: uniform)
    hasher: SourceHasher | None = None  # hashes the source from the byte ranges the run reads
    tables: RunTables | None = None  # the targets' key tables, cached or made by this run (data-free)

    def mark_read(self, names: list[str]) -> None:
        """``names`` are being read (pruned, or copied file to file): their bytes can be hashed now."""
        if self.hasher is not None:
            self.hasher.read_tensors(self.reader.infos[n] for n in names)

    def sparsity_of(self, name: str) -> Sparsity:
        """What ``name`` is pruned to: the run's sparsity, or its share of a non-uniform allocation."""
        return self.cfg.sparsity if self.shares is None else self.shares.sparsity(name)

    def shard_name(self, pos: int) -> str:
        stem = "model" if self.fmt == "dense" else "sparse"
        return f"{stem}-{pos + 1:05d}-of-{len(self.units):05d}.safetensors"


def prune_checkpoint(src: str | Path, cfg: PruneConfig, out: str | Path, *, fmt: str = "dense", calib: CalibConfig | None = None,
                     source_name: str | None = None, overwrite: bool = False, resume: bool = False,
                     allow_pickle: bool = False, progress: bool = True, save_mask: bool = False,
                     extra_report: dict | None = None) -> dict:
    """Prune the checkpoint at ``src`` into ``out``; returns the ``sparsity.json`` payload.

    ``fmt`` stores the pruned targets as ``dense`` (zeros in place, loadable by anything),
    ``bitmask`` or ``packed24`` (see llm_prune.kernels.formats; loaded by ``llm_prune.load``).
    Calibration methods (SparseGPT, Wanda) run sequentially over the blocks with ``calib``.
    ``save_mask`` adds the targets' keep-masks, bit-packed, as ``masks.safetensors`` (what
    ``llm-prune masks compare`` reads without the weights). ``extra_report`` adds fields to
    ``sparsity.json`` (how a fine-tuned model was trained, say).
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    method = get_method(cfg.method)
    method.check(cfg)
    calib = (calib or CalibConfig()) if method.needs_calibration else None
    check_apart(out, src)
    reader = CheckpointReader(src, allow_pickle=allow_pickle)
    arch = arch_for(reader.config)
    units = reader.units(arch)
    select_targets(units, reader.infos, arch, cfg)
    check_format(units, reader.infos, arch, cfg, fmt)
    writer = ShardWriter(out, _run_key(reader, cfg, fmt, calib), overwrite=overwrite, resume=resume,
                         index_name=index_name(fmt), manifest="sparsity.json")
    if writer.finished is not None:  # killed after its last write, before the rename: only that is left
        return writer.publish_finished()
    run = Run(reader, units, cfg, arch, method, writer, fmt, calib, progress)
    try:
        needed = sum(i.nbytes for i in reader.infos.values()) - _written_bytes(writer)
        if calib is not None:
            needed += saved_inputs_bytes(reader.config, calib)
        check_free_space(out.parent, needed)
        if cfg.allocation == "alpha":  # hashes the source first: the spectra are cached under its content
            run.shares = alpha_shares(cfg, units, reader.infos, SpectrumCache(src, reader.files),
                                      lambda names: _finite(reader, names), progress)
        # The source's hashes follow the pruning's reads: no second read of the files.
        with SourceHasher(src, reader.files, reader.header_ends()) as run.hasher:
            extra = prune_sequential(run) if calib is not None else _prune_data_free(run)
            file_hashes = run.hasher.digests()
        if run.tables is not None:
            run.tables.save(file_hashes)
    except UserError:
        writer.abort()  # bad data: nothing half-written stays behind
        raise
    report = {**build_report(run, source_name or str(src), file_hashes, t0), **extra, **(extra_report or {})}
    weight_map = {n: rec["file"] for rec in writer.records().values() for n in rec["tensors"]}
    index = {"metadata": {"total_size": report["run"]["output_bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
    if save_mask:
        report["masks"] = MASK_FILE
    writer.finish(index, src, {"sparsity.json": report}, before_publish=_write_masks if save_mask else None,
                  manifest=writer.manifest)
    return report


def _finite(reader: CheckpointReader, names: list[str]):
    """(name, tensor) of ``names`` one at a time, refusing a damaged one by name."""
    pairs = ((n, reader.read([n])[n]) for n in names) if reader.pickle else reader.read_mapped(names)
    return finite(pairs, lambda n: reader.infos[n].file)


def _write_masks(directory: Path) -> None:
    """The keep-masks of the finished export's targets, read back one at a time (any format)."""
    from .study.compare import CheckpointMasks
    from .study.similarity import MaskWriter

    source = CheckpointMasks(directory)
    meta = {k: v for k, v in source.info.items() if v is not None}
    with MaskWriter(directory / MASK_FILE, source.shapes, {k: str(v) for k, v in meta.items()}) as masks:
        for name in source.shapes:
            masks.add(name, source.keep(name))


def check_format(units: list[Unit], infos: dict[str, TensorInfo], arch, cfg: PruneConfig, fmt: str) -> None:
    """Refuse, from headers alone, a storage format that cannot hold the pruned targets."""
    if fmt == "packed24" and (cfg.sparsity.n, cfg.sparsity.m) != (2, 4):
        raise UserError(f"--format packed24 stores 2:4 weights; this run prunes to {cfg.sparsity} (use --format bitmask)")
    if fmt == "packed24" and arch.weight_in_first:
        raise UserError(f"--format packed24 groups along the last dimension; {arch.family} stores weights "
                        "[in, out] (use --format bitmask)")
    if fmt == "dense":
        return
    from .kernels.formats import check_encodable  # numba: only the compressed formats need it

    for unit in units:
        for name in unit.targets:
            check_encodable(name, infos[name].shape, infos[name].dtype, fmt)


def index_name(fmt: str) -> str:
    """Compressed checkpoints get their own index name so that transformers refuses them loudly
    (instead of loading a model with its weights missing); llm_prune.load reads both."""
    return SAFE_INDEX if fmt == "dense" else SPARSE_INDEX


def _prune_data_free(run: Run) -> dict:
    # The hashing of the source and of each finished shard, the copies, the writes and (layer
    # scope, first contact) the key tables run in threads beside the pruning's kernels; kernels
    # on every core would leave them none (BENCHMARKS.md, sessions 18 and 25). The global pass
    # comes before all of them: it has every core.
    from .kernels.magnitude import all_cores_but_one

    # N:M patterns need no threshold: no tables read, none made.
    run.tables = RunTables(run.reader, run.method,
                           [] if run.cfg.sparsity.is_nm else [n for u in run.units for n in u.targets])
    layer = run.cfg.scope != "global"
    ahead = [u.targets for u in run.units if u.targets and not run.writer.done(u)] if layer else []
    threshold = None if layer else _global_threshold(run)
    with all_cores_but_one(), run.tables.made_ahead(ahead, run.method.score):
        _prune_units(run, threshold, _layer_thresholds(run) if threshold is None else {})
    return {}


def _layer_thresholds(run: Run) -> dict[str, tuple[int, int]]:
    """Layer scope: each target's (key, ties) off its cached key table, where there is one; the
    others are found as the target is read (``_prune_targets``)."""
    found = {n: run.tables.layer_threshold(n, run.sparsity_of(n).ratio) for n in run.tables.names}
    return {n: t for n, t in found.items() if t is not None}


def _global_threshold(run: Run) -> Threshold:
    """One exact threshold on the method's score over every target, kept in progress.jsonl for --resume."""
    if "threshold" in run.writer.state:
        return Threshold(**run.writer.state["threshold"])
    targets = [u for u in run.units if u.targets]
    dtypes = set()

    def visit():
        for unit in tqdm(targets, desc="global threshold", unit="block", disable=not run.progress, leave=False):
            for name, t in run.reader.read(unit.targets).items():
                score = run.method.score(t)
                dtypes.add(str(score.dtype).removeprefix("torch."))
                yield name, score

    total = sum(run.reader.infos[n].numel for u in targets for n in u.targets)
    k = int(round(run.cfg.sparsity.ratio * total))
    order = [n for u in targets for n in u.targets]
    tables = run.tables.cached
    if tables is None:  # one pass, its tables kept (cached at the end under the source's hashes)
        tables = {name: run.tables.make(name, score, checked=False) for name, score in visit()}
        threshold = table_threshold([tables[n] for n in order], k,
                                    lambda high: (bucket_table(score, high) for _, score in visit()))[0]
    else:  # no pass: the tables were cached by an earlier export or load
        dtypes.update(str(run.reader.infos[n].dtype).removeprefix("torch.") for n in order)  # nested: scores are weights
        if k > 0 and tables[order[0]].wide:  # fp32: one look at the targets for the low bits of one bin
            key, ties, _ = run.tables.cache.wide_threshold(order, tables, k, run.progress)
            threshold = Threshold(key, ties, k, total)
        else:
            threshold = table_threshold([tables[n] for n in order], k)[0]
    run.writer.progress["state"] = {"threshold": threshold.__dict__, "ties_left": threshold.ties,
                                    "score_dtype": min(dtypes)}
    return threshold


def _prune_units(run: Run, threshold: Threshold | None, layer: dict[str, tuple[int, int]]) -> None:
    """Prune unit by unit, in file order; tensors that are not pruned are copied file to file.

    Dense output (the default): each target is read from the source file's pages and pruned a
    few MiB at a time into a small buffer written to its place in the output shard
    (``ShardFile``), so the weights cross memory once and no block is ever held. An export of
    ``DIRECT_MIN_BYTES`` or more, where the file system allows, assembles each shard whole in a
    reused buffer instead and writes it past the page cache (``writer.Stage``): one block held,
    no copy into fresh cache pages, the bound of large exports on the VMs measured. Compressed
    formats prune into a reused buffer (``Arena``), encode, and write from a thread while the
    next unit is pruned. Units with nothing to prune (embeddings, head) are copied by the kernel
    from that thread from the start, beside the kernels' start-up and the pruning. ``layer``:
    layer-scope (key, ties) already known per target (``_layer_thresholds``).
    """
    reader, writer = run.reader, run.writer
    ties_left = writer.state.get("ties_left", 0)  # carried in unit order, into progress.jsonl
    todo = [(run.shard_name(pos), u) for pos, u in enumerate(run.units) if not writer.done(u)]
    copied = [(file, u) for file, u in todo if not u.targets and not reader.pickle]
    arenas, in_flight = [Arena(), Arena()], None  # alternate: a write in flight holds the other
    # Dense shards are assembled whole and written past the page cache where the file system
    # allows it (``Stage``); elsewhere each target is pruned in pieces into its place in the file.
    big = sum(reader.infos[n].nbytes for _, u in todo for n in u.names) >= DIRECT_MIN_BYTES
    stage = Stage(writer.tmp) if run.fmt == "dense" and not reader.pickle and DIRECT_IO and big else None
    if run.fmt != "dense" or reader.pickle:  # the units that go through an arena are encoded
        from .kernels.formats import encode_all  # numba: only the compressed formats need it
    with ThreadPoolExecutor(1, thread_name_prefix="llm-prune-writer") as pool:
        copies = [pool.submit(writer.write, u, file, reader.sources(u.names), {"stats": {}}) for file, u in copied]
        for _, u in copied:
            run.mark_read(u.names)
        try:
            bar = tqdm([t for t in todo if t not in copied], desc=f"{run.cfg.method} {run.cfg.sparsity}", unit="block",
                       disable=not run.progress)
            for file, unit in bar:
                run.mark_read(unit.names)  # read now by the pruning (targets) and the copies (the rest)
                for f in copies:  # a copy that failed (a full disk) stops the run now, not at the end
                    if f.done() and f.exception() is not None:
                        f.result()
                others = reader.sources([n for n in unit.names if n not in unit.targets])
                if run.fmt == "dense" and not reader.pickle:
                    specs = {n: (reader.infos[n].dtype, reader.infos[n].shape) for n in unit.names}
                    if stage is not None and stage.direct:
                        with writer.staged(file, specs, stage) as shard:
                            for name, src in others.items():
                                shard.copy_from(name, src)
                            stats, ties_left = _prune_targets(run, unit, threshold, ties_left, layer, out_of=shard.tensor,
                                                              filled=shard.done)
                        writer.commit(unit, file, list(specs), {"stats": stats}, _state(writer, threshold, ties_left))
                        continue
                    with writer.open(file, specs) as shard:
                        for name, src in others.items():
                            shard.copy_from(name, src)
                        stats, ties_left = _prune_targets(run, unit, threshold, ties_left, layer, shard=shard)
                    writer.commit(unit, file, list(specs), {"stats": stats}, _state(writer, threshold, ties_left))
                    continue
                arenas.reverse()
                views = dict(zip(unit.targets, arenas[0].carve([reader.infos[n].nbytes for n in unit.targets])))
                out = lambda n: views[n].view(reader.infos[n].dtype).view(reader.infos[n].shape)  # noqa: E731
                stats, ties_left = _prune_targets(run, unit, threshold, ties_left, layer, out_of=out)
                if in_flight is not None:
                    in_flight.result()  # one write at a time, in order
                stored, meta = encode_all({n: out(n) for n in unit.targets}, {n: run.fmt for n in unit.targets})
                stored.update(others)
                in_flight = pool.submit(writer.write, unit, file, stored, {"stats": stats},
                                        _state(writer, threshold, ties_left), metadata=meta)
            for f in copies + ([in_flight] if in_flight is not None else []):
                f.result()
        finally:
            # Never leave a write running into a directory being removed.
            wait(copies + ([in_flight] if in_flight is not None else []))
            if stage is not None:
                stage.close()


def _prune_targets(run: Run, unit: Unit, threshold: Threshold | None, ties_left: int, layer: dict, *, out_of=None,
                   shard=None, filled=None):
    """Prune each target of ``unit`` from the source, into ``out_of(name)`` or into ``shard``;
    ``filled(name)`` is told when a target's pruned bytes are in place.

    Into a shard, a fast path's ``Plan`` prunes a few MiB at a time into one small buffer that
    is written with ``pwrite``: less system time than faulting in a mapping of the output one
    page at a time, and the output never occupies memory. Returns ({name: [numel, zeros]}, the
    global threshold's ties left)."""
    reader, wif = run.reader, run.arch.weight_in_first
    stats, buf = {}, None
    pickled = reader.read(unit.targets) if reader.pickle else None
    for name in unit.targets:  # in name order: the order a global threshold's ties are pruned in
        sparsity = run.sparsity_of(name)
        src = pickled.pop(name) if pickled is not None else next(reader.read_mapped([name]))[1]
        at = (threshold.key, ties_left) if threshold is not None else layer.get(name)
        try:
            if at is None and run.tables is not None:  # the plan's own threshold, its table kept for the cache
                at = run.tables.layer_threshold_of(name, run.method.score(src), sparsity.ratio)
            plan = run.method.plan(src, sparsity, wif, at) if run.method.plan is not None else None
            if shard is not None and plan is not None:
                if buf is None or buf.dtype != src.dtype:
                    buf = torch.empty(PIECE_BYTES // src.element_size(), dtype=src.dtype)
                zeros = _prune_in_pieces(plan, src, buf, lambda pos, piece: shard.write(name, piece, pos))
                used = plan.used
            else:
                out = shard.tensor(name) if shard is not None else out_of(name)
                if plan is not None and plan.fits(out):
                    zeros = plan.apply(src, out)
                    used = plan.used
                else:
                    zeros, used = prune_(run.method, src, sparsity, wif, threshold=at, out=out)
                del out
        except NonFinite:
            raise UserError(f"{name} (in {reader.infos[name].file}) has inf or nan values: "
                            "the checkpoint is damaged") from None
        if filled is not None:
            filled(name)
        if threshold is not None:
            ties_left -= used
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


def _state(writer: ShardWriter, threshold: Threshold | None, ties_left: int) -> dict | None:
    return {**writer.state, "ties_left": ties_left} if threshold is not None else None


def _run_key(reader: CheckpointReader, cfg: PruneConfig, fmt: str, calib: CalibConfig | None) -> dict:
    """What a resumed run must share with the one that left the partial directory."""
    files = {f: [os.stat(reader.path / f).st_size, os.stat(reader.path / f).st_mtime_ns] for f in reader.files}
    return {"config": cfg.to_json(), "format": fmt, "calibration": calib.to_json() if calib else None,
            "source": str(reader.path.resolve()), "files": files, "version": __version__}


def _written_bytes(writer: ShardWriter) -> int:
    return writer.written_bytes()
