"""One-shot magnitude pruning (OMP): drop the weights of smallest |w|.

Layer scope prunes each matrix to the target ratio; N:M keeps the N largest of every M weights
along the input dimension. Global scope (one threshold across all targets) needs every
target's magnitudes first, so the pipeline computes that threshold with
``masks.find_threshold`` and applies it with ``masks.threshold_keep``.
"""

from __future__ import annotations

import torch

from ..config import Sparsity
from ..masks import nm_keep, unstructured_keep
from . import Method, register


def magnitude_keep(weight: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> torch.Tensor:
    if not sparsity.is_nm:
        return unstructured_keep(weight, sparsity.ratio)
    if weight_in_first:  # Conv1D stores [in, out]: groups run along dim 0
        return nm_keep(weight.t(), sparsity.n, sparsity.m).t()
    return nm_keep(weight, sparsity.n, sparsity.m)


register(Method("omp", "one-shot magnitude pruning: remove the smallest |w|", False, magnitude_keep))
