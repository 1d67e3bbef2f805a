"""llm-prune: one-shot pruning of large pre-trained transformers, streamed one block at a time."""

__version__ = "0.1.0"

from .config import PruneConfig, Sparsity  # noqa: E402
from .errors import UserError  # noqa: E402
from .pipeline import prune_checkpoint  # noqa: E402
from .models import resolve_model  # noqa: E402
from .loading import from_pretrained, load, set_sparsity  # noqa: E402  (module named loading: llm_prune.load is the function)

__all__ = ["PruneConfig", "Sparsity", "UserError", "prune_checkpoint", "resolve_model", "from_pretrained", "load",
           "set_sparsity", "__version__"]
