"""Evaluation hand-off: lm-eval tasks (MMLU categories, ARC-Easy, PIQA, HellaSwag) and token
perplexity, for in-memory models or checkpoint directories, beside a cached dense baseline.

The names below load their module on first use (PEP 562): the CLI builds its parser from
``llm_prune.eval.cli`` and ``settings`` without importing torch, so ``--help`` and a bad
argument answer at once."""

from __future__ import annotations

import importlib

_HOMES = {"dense_results": "api", "evaluate_path": "api", "evaluate_pruned": "api", "evaluate": "harness",
          "CATEGORIES": "mmlu", "SUBJECTS": "mmlu", "aggregate_categories": "mmlu", "token_perplexity": "perplexity",
          "compare": "results", "format_rows": "results", "write_outputs": "results", "EvalSettings": "settings"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
