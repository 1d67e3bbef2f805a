"""A run's report: ``sparsity.json``'s payload, and the short summary the terminal shows."""

from __future__ import annotations

import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .fingerprint import checkpoint_fingerprint
from .magnitude import Threshold, key_to_value


def build_report(run, source_name: str, file_hashes: dict[str, str], t0: float) -> dict:
    """``sparsity.json`` of a finished ``pipeline.Run``: settings, achieved sparsity (per tensor,
    per module type, over targets and over all parameters), the source and the run's costs."""
    reader, cfg, writer = run.reader, run.cfg, run.writer
    per_tensor: dict[str, list[int]] = {}
    for rec in writer.records().values():
        per_tensor.update(rec.get("stats", {}))
    by_type: dict[str, list[int]] = {}
    for name, (numel, zeros) in per_tensor.items():
        acc = by_type.setdefault(run.arch.block_of(name)[1].removesuffix(".weight"), [0, 0])
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
        "format": run.fmt,  # of the targets; every other tensor is stored dense
        "formats": {n: run.fmt for u in run.units for n in u.targets},
        "source": {"name": source_name, "path": str(Path(reader.path).resolve()), "files": file_hashes,
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
            "output_bytes": writer.written_bytes(),
            "units": len(run.units),
            "resumed_units": writer.resumed,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(),
        },
    }
    if cfg.permute:
        pairs = run.arch.permutable + run.arch.permutable_heads
        present = {b[1] for b in map(run.arch.block_of, reader.infos) if b is not None}
        report["permuted"] = {
            "inputs_of": [c for c, _ in pairs if c in present],
            "outputs_of": sorted({t for _, ps in pairs for t in ps if t in present}),
            "how": "per block, input channels reordered (RIA's channel permutation) to choose the N:M groups, "
                   "and their producers' output channels the same way (value heads: within each head, for "
                   "every query head that reads it): the same function, N:M in storage order"}
    if getattr(run, "shares", None) is not None:
        report["allocation"] = run.shares.report(per_tensor, cfg.owl_m if cfg.allocation == "owl" else None)
    if cfg.scope == "global":
        t = Threshold(**writer.state["threshold"])
        dtype = reader.infos[next(n for u in run.units for n in u.targets)].dtype  # OMP: the score is the weight
        dtype = getattr(torch, writer.state.get("score_dtype", ""), dtype)
        report["threshold"] = {"magnitude": key_to_value(t.key, dtype) if t.k else 0.0, "pruned": t.k, "of": t.total}
    return report


def environment() -> dict:
    """What the output's bytes may depend on besides the inputs and settings: the versions, and the
    thread count (SparseGPT's solver runs BLAS, whose sums depend on it; the magnitude kernels,
    Wanda and the formats give the same bytes on any number of threads; ``--permute``'s gain sums
    are vectorised for the CPU, so a near-tie may resolve differently on another CPU)."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:  # without importing it: transformers alone takes ~1 s
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": installed("transformers"),
           "safetensors": installed("safetensors"), "torch_threads": torch.get_num_threads()}
    numba = sys.modules.get("numba")  # the kernels ran only if it was imported
    if numba is not None:
        env |= {"numba": numba.__version__, "numba_threads": numba.get_num_threads()}
    if "scipy.linalg.lapack" in sys.modules:  # SparseGPT's triangular inverse runs there; its sums follow these
        env["blas_threads"] = _blas_threads()
    return env


def _blas_threads() -> dict[str, int] | None:
    """Thread count of each BLAS library loaded in this process (scipy's OpenBLAS among them), by
    ``threadpoolctl``; None where it is not installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return {f"{i.get('internal_api')} ({Path(i.get('filepath', '')).name})": i.get("num_threads")
            for i in threadpool_info() if i.get("user_api") == "blas"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _allocation_table(alloc: dict) -> list[str]:
    """Per block: its metric, and the sparsity it got (the targets' average is the requested one)."""
    metric = alloc["metric"]
    rows = [[f"block {b}", f"{v['params']:,}", f"{v[metric]:.4g}", f"{v['sparsity']:.4f}"]
            for b, v in sorted(alloc["blocks"].items(), key=lambda kv: int(kv[0]))]
    band = f"spread 2×{alloc['band']:g}, unclipped" if alloc.get("clipped") is False else f"band ±{alloc['band']:g}"
    return [f"allocation {alloc['name']} ({band}):",
            table(rows, ["block", "params", metric, "sparsity"])]


def format_summary(report: dict, out: Path) -> str:
    ach, run = report["achieved"], report["run"]
    rows = [[kind, f"{v['params']:,}", f"{v['sparsity']:.4f}"] for kind, v in ach["by_type"].items()]
    rows.append(["all targets", f"{ach['targeted_params']:,}", f"{ach['targeted']:.4f}"])
    rows.append(["all parameters", f"{ach['all_params']:,}", f"{ach['all_parameters']:.4f}"])
    how = f"{report['scope']} scope"
    cal = report.get("calibration")
    if cal and "activation_dtype" in cal:  # calibrated: the data and the precision it ran in
        how += f"; calibration {cal['nsamples']} × {cal['seqlen']} tokens on {cal['device']}, {cal['activation_dtype']}"
        if "true_sequential_forwards" in cal:
            how += f"; true-sequential, {cal['true_sequential_forwards']}"
    what = f"{report['method']} {report['pattern'] or report['target_sparsity']} ({how})"
    lines = [
        f"pruned {report['source']['name']} with {what}",
        table(rows, ["module", "params", "sparsity"]),
        f"time {run['time_s']:.1f} s   peak RSS {human_bytes(run['peak_rss_bytes'])}   "
        f"output {human_bytes(run['output_bytes'])} ({report['format']})"
        + (f"   resumed after {run['resumed_units']} of {run['units']} units" if run["resumed_units"] else ""),
    ]
    if "allocation" in report:
        lines[2:2] = _allocation_table(report["allocation"])
    if "threshold" in report:
        lines.append(f"global threshold |w| = {report['threshold']['magnitude']:.6g}")
    lines.append(f"wrote {out} (details in {Path(out) / 'sparsity.json'})")
    return "\n".join(lines)
