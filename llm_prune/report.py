"""Human-readable summaries of a run's report (the same data is in sparsity.json)."""

from __future__ import annotations

from pathlib import Path


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


def format_summary(report: dict, out: Path) -> str:
    ach, run = report["achieved"], report["run"]
    rows = [[kind, f"{v['params']:,}", f"{v['sparsity']:.4f}"] for kind, v in ach["by_type"].items()]
    rows.append(["all targets", f"{ach['targeted_params']:,}", f"{ach['targeted']:.4f}"])
    rows.append(["all parameters", f"{ach['all_params']:,}", f"{ach['all_parameters']:.4f}"])
    what = f"{report['method']} {report['pattern'] or report['target_sparsity']} ({report['scope']} scope)"
    lines = [
        f"pruned {report['source']['name']} with {what}",
        table(rows, ["module", "params", "sparsity"]),
        f"time {run['time_s']:.1f} s   peak RSS {human_bytes(run['peak_rss_bytes'])}   "
        f"output {human_bytes(run['output_bytes'])} ({report['format']})"
        + (f"   resumed after {run['resumed_units']} of {run['units']} units" if run["resumed_units"] else ""),
    ]
    if "threshold" in report:
        lines.append(f"global threshold |w| = {report['threshold']['magnitude']:.6g}")
    lines.append(f"wrote {out} (details in {Path(out) / 'sparsity.json'})")
    return "\n".join(lines)
