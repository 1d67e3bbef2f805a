"""Pruning methods: one file each, registered by name, and the contract the pipelines call.

A method is one reference function of tensors:

* ``score(weight) -> tensor`` of the weight's shape, for methods that need no data. The weights
  whose score has the smallest magnitude go first, ties to the earlier weight; how many and
  where is ``llm_prune.magnitude``'s rule for every such method alike: each matrix to the
  sparsity (``--scope layer``), the N largest of every M along the input dimension (N:M), or one
  exact threshold on the score across all targets (``--scope global``). OMP's score is the
  weight itself. Scores run in the loader's reading thread while transformers builds the model
  (which changes torch's process-wide default dtype meanwhile): give every new tensor its dtype.
* ``solve(weight, stat, sparsity, *, weight_in_first, calib) -> (new weight, keep-mask)``, for
  methods that choose from calibration statistics (``stat``, made by ``observer(columns, device)``
  and fed each target's inputs through ``add(x)``) or change the weights they keep. A calibrated
  score exists one block at a time, so these refuse ``--scope global``.

Optionally, a fast path that gives the same bits as the reference (tests check it):
``plan(weight, sparsity, weight_in_first, threshold) -> Plan | None``, where ``threshold`` is a
global ``(key, ties)`` or None for layer scope; a ``Plan`` applies the pruning to the whole
tensor or piece by piece in flat order (``apply(src, out) -> zeros``, ``used`` ties,
``align``, ``fits(out)``). None means the fast path cannot take this tensor: the reference runs.

A method file registers itself with ``register(Method(...))``; every module in this package is
imported when the package is, so adding a method is adding a file (or calling ``register`` from
your own code before running the pipeline).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import PruneConfig, Sparsity
from ..errors import UserError
from ..magnitude import apply_keep_, check_finite, magnitude_keep, threshold_keep


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    solve: Callable | None = None
    observer: Callable | None = None
    plan: Callable | None = None
    # Masks nested across sparsities, and a pruned weight scores lowest (|0| = 0 for OMP): a model
    # pruned at s is raised to s' > s from its current weights alone (``llm_prune.set_sparsity``).
    nested: bool = False
    # The ``CalibConfig`` fields ``solve`` reads, recorded in sparsity.json beside the calibration.
    calib_fields: tuple[str, ...] = ()
    # ``--permute``: the score [out, in] a permutation of input channels tries to keep under N:M,
    # from a weight [out, in] and its statistic (which then has ``permuted(perm)``). None: no --permute.
    channel_score: Callable | None = None

    def __post_init__(self):
        if (self.score is None) == (self.solve is None):
            raise ValueError(f"method {self.name!r} must give exactly one of score and solve")
        if (self.solve is None) != (self.observer is None):
            raise ValueError(f"method {self.name!r}: a solve needs an observer, and only a solve has one")

    @property
    def needs_calibration(self) -> bool:
        return self.solve is not None

    def check(self, cfg: PruneConfig) -> None:
        """Refuse settings this method cannot honour, before any work."""
        if cfg.scope == "global" and self.score is None:
            raise UserError(f"--scope global does not apply to {self.name}: it is one threshold on a data-free "
                            f"score across all targets, and {self.name} prunes each matrix from its own "
                            "calibration statistics (use --scope layer)")
        if cfg.permute and self.channel_score is None:
            with_it = ", ".join(sorted(m.name for m in METHODS.values() if m.channel_score is not None))
            raise UserError(f"--permute does not apply to {self.name}: it keeps a calibrated score under N:M "
                            f"(methods: {with_it})")
        if cfg.allocation == "owl" and self.score is not None:
            raise UserError(f"--allocation owl weighs blocks by their calibration activations, which {self.name} "
                            "never reads (use --allocation alpha: data-free, from each matrix's spectrum)")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# -- applying a score method to one tensor ------------------------------------------------------------------
def score_keep(method: Method, weight: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> torch.Tensor:
    """The reference keep-mask of a score method at layer scope (or N:M along the input dimension)."""
    return magnitude_keep(method.score(weight), sparsity, weight_in_first)


def prune_(method: Method, w: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False, *,
           threshold: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> tuple[int, int]:
    """Prune ``w`` with a score method into ``out`` (default: in place): to the sparsity, or at a
    known global ``threshold`` (key, ties). Returns (zeros the result holds, ties used).
    Raises ``magnitude.NonFinite`` for inf or nan weights."""
    plan = method.plan(w, sparsity, weight_in_first, threshold) if method.plan is not None else None
    if plan is not None and plan.fits(out):
        zeros = plan.apply(w, out)
        return zeros, plan.used
    if out is not None and out is not w:
        out.copy_(w.reshape(out.shape))
        w = out
    check_finite(w)
    if threshold is None:
        return apply_keep_(w, score_keep(method, w, sparsity, weight_in_first)), 0
    keep, used = threshold_keep(method.score(w), *threshold)
    return apply_keep_(w, keep), used


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
