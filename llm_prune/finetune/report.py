"""finetune.json as a section of a study report."""

from __future__ import annotations


def markdown(payload: dict) -> list[str]:
    from ..study.report import md_table

    s = payload["settings"]
    what = f"{s['method']}" + (f" ({s['rounds']} rounds)" if s["method"] == "lth" else "")
    sparsity = s["pattern"] or f"{s['sparsity']:g}"
    rows = []
    for metric, r in payload["metrics"].items():
        d, p = r["dense"], r["pruned"]
        spread = lambda x: f" ± {100 * x['std']:.2f}" if x["std"] is not None else ""  # noqa: E731
        rows.append([metric, f"{100 * d['mean']:.2f}{spread(d)}", f"{100 * p['mean']:.2f}{spread(p)}",
                     f"{100 * r['drop']:+.2f}"])
    return [f"## Fine-tuned {payload['model']} on {payload['task']['name']}: {what} at {sparsity} ({s['scope']} scope)",
            "", f"Data: {payload['task']['described']}.", "",
            f"Seeds {', '.join(map(str, s['seeds']))}; mean ± standard deviation over seeds (%); achieved sparsity "
            f"{payload['achieved']:.4f}.", "",
            *md_table(["metric", "dense", "pruned", "drop (+ = worse)"], rows)]
