"""RIA (Zhang et al., ICLR 2024): relative importance times activations, compared within each output row.

    score_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ||X_j||₂ ^ a,   a = 0.5

Wanda's |W_ij| · ||X_j|| favours a weight that is large in absolute terms; RIA first divides it by
the total weight of its row (the output it feeds) and of its column (the input it reads), so that
no output channel or input channel loses all its weights to channels that are merely larger
everywhere, and then damps the activation factor by the power a (the paper's 0.5). As in the
paper's code the smallest scores of each output row go (the smallest M-N of every M inputs for
N:M), the kept weights unchanged; ties prune the earlier weight first. The paper's channel
permutation for N:M is ``--permute`` (``llm_prune.permute``), applied where the checkpoint can
absorb it.
"""

from __future__ import annotations

import torch

from ..config import Sparsity
from . import Method, register
from .wanda import InputNorms, row_keep

ALPHA = 0.5  # the power of the activation norm (the paper's a; 0.5 is its default and best)


def ria_scores(weight: torch.Tensor, norms: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """The RIA score of ``weight`` [out, in] in fp32, given the input feature norms ||X_j|| (length in)."""
    w = weight.to(torch.float32).abs()
    # A row or column of zeros has relative importance 0 (not 0/0).
    rows = w.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    cols = w.sum(0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    act = norms.to(weight.device, torch.float32).pow(alpha).unsqueeze(0)
    return ((w / rows + w / cols) * act).contiguous()


def ria_keep(weight: torch.Tensor, norms: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False,
             alpha: float = ALPHA) -> torch.Tensor:
    """Keep-mask for ``weight`` given the input feature norms ``norms`` (length = input dim)."""
    W = weight.t() if weight_in_first else weight
    if W.shape[1] != norms.numel():
        raise ValueError(f"{norms.numel()} input norms for a weight with {W.shape[1]} input columns")
    keep = row_keep(ria_scores(W, norms, alpha), sparsity)
    return keep.t().contiguous() if weight_in_first else keep


def _solve(weight, stat: InputNorms, sparsity: Sparsity, *, weight_in_first: bool, calib) -> tuple[torch.Tensor, torch.Tensor]:
    keep = ria_keep(weight, stat.norms, sparsity, weight_in_first)
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)), keep


register(Method("ria", "RIA: prune the smallest (|W|/row sum + |W|/column sum)·||X||^0.5 in each output row "
                "(calibration activations)", solve=_solve, observer=InputNorms,
                channel_score=lambda w, stat: ria_scores(w, stat.norms)))
