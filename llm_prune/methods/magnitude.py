"""One-shot magnitude pruning (OMP): drop the weights of smallest |w|.

Layer scope prunes each matrix to the target ratio; N:M keeps the N largest of every M weights
along the input dimension. Global scope (one threshold across all targets) needs every
target's magnitudes first, so the pipeline computes that threshold with
``masks.find_threshold`` and applies it with ``threshold_prune_``.

``magnitude_keep`` is the mask (the reference, pure torch); ``magnitude_prune_`` and
``threshold_prune_`` prune a tensor in place with the fused kernels of
``llm_prune.kernels.magnitude`` where they apply (CPU, fp16/bf16/fp32), giving the same bits as
applying the mask, in two passes instead of seven and with no temporaries. ``layer_plan`` and
``threshold_plan`` return the same pruning as a ``Plan`` that can be applied piece by piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Sparsity
from ..kernels import magnitude as K
from ..masks import (inf_key, magnitude_key, nm_keep, prune_count, threshold_from_counts, threshold_keep,
                     unstructured_keep)
from . import Method, register


def magnitude_keep(weight: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> torch.Tensor:
    if not sparsity.is_nm:
        return unstructured_keep(weight, sparsity.ratio)
    if weight_in_first:  # Conv1D stores [in, out]: groups run along dim 0
        return nm_keep(weight.t(), sparsity.n, sparsity.m).t()
    return nm_keep(weight, sparsity.n, sparsity.m)


class NonFinite(ValueError):
    """The tensor holds inf or nan (the caller names the tensor and its file)."""


@dataclass
class Plan:
    """How the kernels prune one tensor, decided once (threshold, ties, or N:M) and then applied
    to the whole tensor or piece by piece in flat order: the exporter prunes a tensor a few MiB at
    a time into a small buffer it writes out, instead of faulting in the output's pages.
    Pieces must follow one another in flat order and hold a multiple of ``align`` weights."""

    key: int = -1  # unstructured: prune every key below, and the first `ties` equal to it
    ties: int = 0
    nm: tuple[int, int] | None = None
    used: int = 0  # ties pruned so far

    @property
    def align(self) -> int:
        return self.nm[1] if self.nm else 1

    def apply(self, src: torch.Tensor, out: torch.Tensor | None = None) -> int:
        """Prune the next piece ``src`` into ``out`` (default: in place); returns the zeros written."""
        if self.nm:
            return K.prune_nm_(src, *self.nm, out)
        used, zeros = K.prune_below_(src, self.key, self.ties - self.used, out)
        self.used += used
        return zeros


def layer_plan(w: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> Plan | None:
    """Layer-scope OMP (or N:M) of ``w`` as a ``Plan``; None when the kernels cannot take ``w``
    (not CPU-contiguous fp16/bf16/fp32, or N:M along dim 0 of a Conv1D weight)."""
    if not K.supported(w) or (sparsity.is_nm and weight_in_first):
        return None
    if sparsity.is_nm:
        _check_max_key(w)
        return Plan(nm=(sparsity.n, sparsity.m))
    hist = checked_histogram(w)
    t = threshold_from_counts(torch.from_numpy(hist), prune_count(w.numel(), sparsity.ratio), w.numel(),
                              lambda: [w], wide=w.dtype == torch.float32)
    return Plan(key=t.key, ties=t.ties)


def threshold_plan(w: torch.Tensor, key: int, ties: int) -> Plan | None:
    """A known threshold (a global one) as a ``Plan``; None when the kernels cannot take ``w``."""
    if not K.supported(w):
        return None
    _check_max_key(w)
    return Plan(key=key, ties=ties)


def magnitude_prune_(w: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False,
                     out: torch.Tensor | None = None) -> int:
    """Layer-scope OMP (or N:M) of ``w``, into ``out`` (default: in place); returns the zeros the
    result holds."""
    plan = layer_plan(w, sparsity, weight_in_first) if out is None or K.supported(out) else None
    if plan is not None:
        return plan.apply(w, out)
    w = _into(w, out)
    _check_finite(w)
    _apply(w, magnitude_keep(w, sparsity, weight_in_first))
    return w.numel() - int(torch.count_nonzero(w))


def threshold_prune_(w: torch.Tensor, key: int, ties: int, out: torch.Tensor | None = None) -> tuple[int, int]:
    """Prune what ``masks.threshold_keep(w, key, ties)`` prunes, into ``out`` (default: in place).

    Returns (zeros the result holds, ties used)."""
    plan = threshold_plan(w, key, ties) if out is None or K.supported(out) else None
    if plan is not None:
        zeros = plan.apply(w, out)
        return zeros, plan.used
    w = _into(w, out)
    _check_finite(w)
    keep, used = threshold_keep(w, key, ties)
    _apply(w, keep)
    return w.numel() - int(torch.count_nonzero(w)), used


def checked_histogram(w: torch.Tensor):
    """``kernels.magnitude.key_histogram``, refusing inf and nan (``NonFinite``)."""
    hist = K.key_histogram(w)
    first_bad = inf_key(w.dtype) >> (16 if w.dtype == torch.float32 else 0)
    if hist[first_bad:].any():
        raise NonFinite()
    return hist


def _check_max_key(w: torch.Tensor) -> None:
    if K.max_key(w) >= inf_key(w.dtype):
        raise NonFinite()


def _check_finite(w: torch.Tensor) -> None:
    if w.numel() and int(magnitude_key(w).max()) >= inf_key(w.dtype):
        raise NonFinite()


def _into(w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The tensor the torch path prunes in place: ``w``, or ``out`` holding a copy of it."""
    if out is None or out is w:
        return w
    out.copy_(w.reshape(out.shape))
    return out


def _apply(w: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero ``w`` where ``keep`` is False, in place, writing +0 (exact: integer view times mask)."""
    if w.is_floating_point() and w.element_size() in (2, 4):
        iv = w.view({2: torch.int16, 4: torch.int32}[w.element_size()])
        iv.mul_(keep)
    else:
        w.masked_fill_(~keep, 0)


register(Method("omp", "one-shot magnitude pruning: remove the smallest |w|", False, magnitude_keep,
                prune_=magnitude_prune_, plan=layer_plan))
