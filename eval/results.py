"""Dense vs pruned rows, the dense-baseline cache, and the writers (table, results.json, report.md)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from ..fingerprint import checkpoint_fingerprint, file_digest
from ..paths import atomic_write_text, cache_dir
from ..report import table
from .mmlu import CATEGORIES

LOWER_IS_BETTER = {"ppl"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Settings that change a task's numbers; batch size and device do not (beyond float noise).
KEY_SETTINGS = ("fewshot", "task_fewshot", "limit", "dtype", "load_in", "seqlen", "ppl_windows", "mmlu_subjects", "seed")


def metric_rows(entry: dict, task: str) -> list[tuple[str, str, float]]:
    """(task, metric, value) for one task's result entry; MMLU adds one row per category."""
    rows = [(task, m, v) for m, v in entry["metrics"].items()]
    for cat in CATEGORIES:
        if cat in entry.get("categories", {}):
            rows.append((f"{task}/{cat}", "acc", entry["categories"][cat]["acc"]))
    return rows


def compare(dense: dict | None, pruned: dict) -> list[dict]:
    """Rows {task, metric, dense, pruned, drop}; drop > 0 means the pruned model is worse
    (dense - pruned for accuracies, pruned - dense for perplexity). ``dense`` may be None."""
    rows = []
    for task, entry in pruned["tasks"].items():
        base = {(t, m): v for t, m, v in metric_rows(dense["tasks"][task], task)} if dense and task in dense["tasks"] else {}
        for t, m, v in metric_rows(entry, task):
            d = base.get((t, m))
            drop = None if d is None else (v - d if m in LOWER_IS_BETTER else d - v)
            rows.append({"task": t, "metric": m, "dense": d, "pruned": v, "drop": drop})
    return rows


def _cells(r: dict) -> list[str]:
    lower = r["metric"] in LOWER_IS_BETTER
    val = lambda v: "-" if v is None else (f"{v:.3f}" if lower else f"{100 * v:.2f}")
    drop = "-" if r["drop"] is None else (f"{r['drop']:+.3f}" if lower else f"{100 * r['drop']:+.2f}")
    return [r["task"], r["metric"] + ("" if lower else " %"), val(r["dense"]), val(r["pruned"]), drop]


def format_rows(rows: list[dict], pruned_label: str = "pruned") -> str:
    """The printed table: accuracies in %, perplexity as is."""
    return table([_cells(r) for r in rows], ["task", "metric", "dense", pruned_label, "drop (+ = worse)"])


def protocol_lines(result: dict) -> list[str]:
    """One line per task saying exactly what was measured."""
    lines = []
    for task, entry in result["tasks"].items():
        p = entry.get("protocol", {})
        if task == "ppl":
            lines.append(f"ppl: token perplexity on {p['source']}, split {p['split']}, seqlen {p['seqlen']}, "
                         f"{p['windows']} windows = {p['predicted_tokens']:,} predicted tokens")
        else:
            n = f", n={entry['n']}" if "n" in entry else ""
            lines.append(f"{task}: lm-eval task {p.get('lm_eval_task')} v{entry.get('version')}, {p.get('data')}, "
                         f"{p.get('fewshot')}-shot, limit {p.get('limit')}{n}")
    return lines


def checkpoint_id(path: Path) -> str:
    """Fingerprint of a checkpoint directory: the hash of its weight files' hashes."""
    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files in {path}")
    return checkpoint_fingerprint({f.name: file_digest(f) for f in files})


# Bump when our own task definitions change what they measure (local task configs, the offline
# perplexity text), so cached dense baselines from the old definition are not reused.
# 2: offline perplexity uses only the passages held out from calibration.
LOCAL_PROTOCOL = 2


def baseline_key(fingerprint: str, task: str, settings_json: dict, data: str, lm_eval_version: str) -> str:
    key = {"fingerprint": fingerprint, "task": task, "data": data, "lm_eval": lm_eval_version,
           "protocol": LOCAL_PROTOCOL, **{k: settings_json.get(k) for k in KEY_SETTINGS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def baseline_path(key: str) -> Path:
    return cache_dir() / "eval-baselines" / f"{key}.json"


def load_baseline(key: str) -> dict | None:
    try:
        return json.loads(baseline_path(key).read_text())
    except (OSError, ValueError):
        return None


def store_baseline(key: str, entry: dict) -> None:
    atomic_write_text(baseline_path(key), json.dumps(entry, indent=1))


def write_outputs(out_dir: Path, pruned: dict, dense: dict | None = None, *, labels: dict | None = None) -> dict:
    """results.json + report.md in ``out_dir``; returns the results.json payload."""
    out_dir = Path(out_dir)
    rows = compare(dense, pruned)
    payload = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "labels": labels or {},
               "rows": rows, "evaluated": pruned, "dense_baseline": dense}
    atomic_write_text(out_dir / "results.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out_dir / "report.md", markdown_report(rows, pruned, dense, labels or {}))
    return payload


def markdown_report(rows: list[dict], pruned: dict, dense: dict | None, labels: dict) -> str:
    name = labels.get("pruned", "model")
    md = [f"# Evaluation: {name}", ""]
    if dense is not None:
        md.append(f"Dense baseline: {labels.get('dense', 'dense')}")
        md.append("")
    md += ["| task | metric | dense | " + name + " | drop (+ = worse) |", "|---|---|---:|---:|---:|"]
    md += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    s = pruned["settings"]
    md += ["", "## Protocol", "", *[f"- {p}" for p in protocol_lines(pruned)], "",
           f"lm-eval {pruned['versions']['lm_eval']}, llm-prune {pruned['versions']['llm_prune']}; model "
           f"{pruned['model']['class']} {pruned['model']['dtype']} on {pruned['model']['device']}; "
           f"batch size {s['batch_size']}, seed {s['seed']}, data {s['data_resolved']}.", ""]
    tp = [(t, e["throughput"]) for t, e in pruned["tasks"].items() if e.get("throughput", {}).get("requests_per_s")]
    if tp:
        md += ["## Throughput", "", "| task | requests | model seconds | requests/s |", "|---|---:|---:|---:|"]
        md += [f"| {t} | {v['requests']} | {v['model_seconds']:.1f} | {v['requests_per_s']:.2f} |" for t, v in tp]
        md.append("")
    return "\n".join(md)
