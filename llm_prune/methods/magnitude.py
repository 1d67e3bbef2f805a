"""One-shot magnitude pruning (OMP): drop the weights of smallest |w|.

Layer scope prunes each matrix to the target ratio; N:M keeps the N largest of every M weights
along the input dimension. Global scope (one threshold across all targets) needs every
target's magnitudes first, so the pipeline computes that threshold with
``masks.find_threshold`` and applies it with ``threshold_prune_``.

``magnitude_keep`` is the mask (the reference, pure torch); ``magnitude_prune_`` and
``threshold_prune_`` prune a tensor in place with the fused kernels of
``llm_prune.kernels.magnitude`` where they apply (CPU, fp16/bf16/fp32), giving the same bits as
applying the mask, in two passes instead of seven and with no temporaries.
"""

from __future__ import annotations

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


def magnitude_prune_(w: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> int:
    """Layer-scope OMP (or N:M) of ``w`` in place; returns the number of zeros it ends with."""
    if not K.supported(w) or (sparsity.is_nm and weight_in_first):
        _check_finite(w)
        _apply(w, magnitude_keep(w, sparsity, weight_in_first))
        return w.numel() - int(torch.count_nonzero(w))
    hist = checked_histogram(w)
    if sparsity.is_nm:
        K.prune_nm_(w, sparsity.n, sparsity.m)
        return w.numel() - int(torch.count_nonzero(w))
    t = threshold_from_counts(torch.from_numpy(hist), prune_count(w.numel(), sparsity.ratio), w.numel(),
                              lambda: [w], wide=w.dtype == torch.float32)
    K.prune_below_(w, t.key, t.ties)
    if w.dtype == torch.float32:  # bin 0 holds tiny fp32 values too, not only zeros
        return w.numel() - int(torch.count_nonzero(w))
    # 16-bit: bin 0 is exactly the zeros; the k pruned include them all unless k is smaller.
    return max(t.k, int(hist[0]))


def threshold_prune_(w: torch.Tensor, key: int, ties: int) -> tuple[int, int]:
    """Prune in place what ``masks.threshold_keep(w, key, ties)`` prunes.

    Returns (zeros ``w`` ends with, ties used)."""
    if not K.supported(w):
        _check_finite(w)
        keep, used = threshold_keep(w, key, ties)
        _apply(w, keep)
        return w.numel() - int(torch.count_nonzero(w)), used
    checked_histogram(w)
    used = K.prune_below_(w, key, ties)
    return w.numel() - int(torch.count_nonzero(w)), used


def checked_histogram(w: torch.Tensor):
    """``kernels.magnitude.key_histogram``, refusing inf and nan (``NonFinite``)."""
    hist = K.key_histogram(w)
    first_bad = inf_key(w.dtype) >> (16 if w.dtype == torch.float32 else 0)
    if hist[first_bad:].any():
        raise NonFinite()
    return hist


def _check_finite(w: torch.Tensor) -> None:
    if w.numel() and int(magnitude_key(w).max()) >= inf_key(w.dtype):
        raise NonFinite()


def _apply(w: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero ``w`` where ``keep`` is False, in place, writing +0 (exact: integer view times mask)."""
    if w.is_floating_point() and w.element_size() in (2, 4):
        iv = w.view({2: torch.int16, 4: torch.int32}[w.element_size()])
        iv.mul_(keep)
    else:
        w.masked_fill_(~keep, 0)


register(Method("omp", "one-shot magnitude pruning: remove the smallest |w|", False, magnitude_keep,
                prune_=magnitude_prune_))
