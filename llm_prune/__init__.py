"""llm-prune: one-shot pruning of large pre-trained transformers, streamed one block at a time.

    import llm_prune
    llm_prune.prune_checkpoint(src, llm_prune.PruneConfig(sparsity=llm_prune.Sparsity(0.4)), out)
    model = llm_prune.from_pretrained("vicuna-7b", sparsity=0.4)

Importing the package imports nothing heavy: each name below is imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PruneConfig": ".config",
    "Sparsity": ".config",
    "UserError": ".errors",
    "prune_checkpoint": ".pipeline",
    "resolve_model": ".models",
    "from_pretrained": ".loading",
    "load": ".loading",
    "set_sparsity": ".loading",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
