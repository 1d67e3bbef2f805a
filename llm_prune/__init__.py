"""llm-prune: one-shot pruning of large pre-trained transformers, streamed one block at a time."""

__version__ = "0.1.0"

import gc as _gc

# torch, transformers and numba create ~10^6 long-lived objects on import, and the cyclic GC
# would walk them again and again while they load; paused, they are walked once, after. Nothing
# is lost: cycles made meanwhile are found then. (The CLI also freezes them: cli.main.)
_gc_on = _gc.isenabled()
_gc.disable()
try:
    from .config import PruneConfig, Sparsity  # noqa: E402
    from .errors import UserError  # noqa: E402
    from .pipeline import prune_checkpoint  # noqa: E402
    from .models import resolve_model  # noqa: E402
    from .loading import from_pretrained, load, set_sparsity  # noqa: E402  (module llm_prune.loading; load is the function)
finally:
    if _gc_on:
        _gc.enable()

__all__ = ["PruneConfig", "Sparsity", "UserError", "prune_checkpoint", "resolve_model", "from_pretrained", "load",
           "set_sparsity", "__version__"]
