"""One page for a study: the tables and pictures of every result in a directory, as GitHub markdown.

    llm-prune report DIR        (or --report on any study command)

Each study command writes its payload as ``NAME.json`` with the pictures it drew listed in it;
the module that made it renders its section (``markdown(payload) -> lines``).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import UserError
from ..paths import atomic_write_text

# result file -> the study module that renders it, in the order sections appear
SECTIONS = {
    "sweep.json": "llm_prune.study.sweep",
    "inspect.json": "llm_prune.study.inspect",
    "distributions.json": "llm_prune.study.distributions",
    "masks.json": "llm_prune.study.compare",
    "trace.json": "llm_prune.study.trace",
    "finetune.json": "llm_prune.finetune.report",
}


def write_report(directory: str | Path, title: str | None = None) -> Path:
    """Render every known result in ``directory`` into ``directory/report.md``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory of llm-prune results")
    found = [(name, module) for name, module in SECTIONS.items() if (directory / name).is_file()]
    if not found:
        raise UserError(f"{directory} holds no llm-prune results ({', '.join(SECTIONS)})")
    md = [f"# llm-prune report: {title or directory.name}", ""]
    for name, module in found:
        payload = json.loads((directory / name).read_text())
        md += importlib.import_module(module).markdown(payload)
        md += [f"![{p}]({p})" for p in payload.get("pictures") or []]
        if payload.get("no_pictures"):
            md.append(f"_No pictures: {payload['no_pictures']}_")
        md += ["", f"Data: [`{name}`]({name})", ""]
    path = directory / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in r) + " |" for r in rows], ""]
