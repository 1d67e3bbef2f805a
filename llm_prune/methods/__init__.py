"""Pruning methods: a registry of small, pure functions that return keep-masks.

A method module registers a ``Method``; the pipeline looks methods up by name and never
branches on a method's identity beyond ``needs_calibration``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import Sparsity
from ..errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_calibration: bool
    # keep(weight, sparsity, weight_in_first) -> bool mask of weight's shape (True = keep)
    keep: Callable[[torch.Tensor, Sparsity, bool], torch.Tensor]
    # Calibration methods only. observer(columns, device) -> an object whose ``add(x)`` takes a
    # Linear's inputs [..., in]; solve(weight, observer, sparsity, *, weight_in_first, calib)
    # -> (new weight in the weight's dtype, keep-mask). ``calib`` is a CalibConfig.
    observer: Callable | None = None
    solve: Callable | None = None
    # Methods without calibration may prune in place, faster than applying ``keep``:
    # prune_(weight, sparsity, weight_in_first) -> number of zeros the weight ends with.
    prune_: Callable[[torch.Tensor, Sparsity, bool], int] | None = None
    # ... and may decide their pruning once per tensor, to apply piece by piece (the exporter):
    # plan(weight, sparsity, weight_in_first) -> a ``methods.magnitude.Plan``, or None when the
    # kernels cannot take the weight (then ``prune_`` does it whole).
    plan: Callable | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import magnitude, sparsegpt, wanda  # noqa: E402,F401  (register themselves)
