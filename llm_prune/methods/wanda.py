"""Wanda (Sun et al., 2023): prune by |W_ij| · ||X_j||₂, compared within each output row.

The norm of input feature j over every calibration token scales how much weight (i, j) can
move the output; Wanda removes the smallest products per output row (or the smallest M-N of
every M along the input dimension for N:M) and leaves the surviving weights unchanged.
Ties prune the earlier weight first (stable ascending sort), the same rule as ``llm_prune.magnitude``.
"""

from __future__ import annotations

import torch

from ..config import Sparsity
from ..magnitude import nm_keep, prune_count, select_kernels
from . import Method, register


class InputNorms:
    """Sum of x_j² over every input row (token), per input feature; fp64 totals of fp32 partial sums."""

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sq.device, torch.float32)
        self.sq += x.square().sum(0).to(torch.float64)
        self.count += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt().to(torch.float32)

    def permuted(self, perm: torch.Tensor) -> "InputNorms":
        """The same statistic with the input features in ``perm``'s order."""
        other = InputNorms(0, self.sq.device)
        other.sq, other.count = self.sq[perm.to(self.sq.device)], self.count
        return other


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W| · ||X_j|| in fp32, [out, in]."""
    return (weight.to(torch.float32).abs() * norms.to(weight.device, torch.float32).unsqueeze(0)).contiguous()


def wanda_keep(weight: torch.Tensor, norms: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False) -> torch.Tensor:
    """Keep-mask for ``weight`` given the input feature norms ``norms`` (length = input dim)."""
    W = weight.t() if weight_in_first else weight
    if W.shape[1] != norms.numel():
        raise ValueError(f"{norms.numel()} input norms for a weight with {W.shape[1]} input columns")
    keep = row_keep(wanda_scores(W, norms), sparsity)
    return keep.t().contiguous() if weight_in_first else keep


def row_keep(score: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Keep-mask [out, in] that prunes the smallest scores of each output row (N:M: of every M inputs)."""
    if sparsity.is_nm:
        return nm_keep(score, sparsity.n, sparsity.m)
    if sparsity.count is not None:
        return _exact_row_keep(score, sparsity.count)
    k = prune_count(score.shape[1], sparsity.ratio)
    select = select_kernels(score) if 0 < k < score.shape[1] else None
    return select.row_smallest_keep(score, k) if select is not None else ~smallest_per_row(score, k)


def smallest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest scores of each row, ties to the earlier column: the first ``k``
    of a stable ascending sort, found by selection instead (each row's k-th smallest value,
    everything below it, then its ties in column order), in about half the sort's time."""
    if k <= 0 or k >= score.shape[1]:
        return torch.full_like(score, k > 0, dtype=torch.bool)
    kth = score.kthvalue(k, dim=1, keepdim=True).values
    below = score < kth
    ties = score == kth
    return below | (ties & (ties.cumsum(1) <= k - below.sum(1, keepdim=True)))


def _exact_row_keep(score: torch.Tensor, count: int) -> torch.Tensor:
    """Prune exactly ``count`` weights, compared within rows (a share of a non-uniform allocation).

    Every row prunes its ``count // rows`` smallest; the ``count % rows`` weights left to go are
    the smallest among each row's next candidate (ties to the earlier row), so rows differ by
    one weight at most and the extra ones go where they cost least."""
    rows, cols = score.shape
    q, r = divmod(count, rows)
    order = torch.sort(score, dim=1, stable=True).indices
    keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, order[:, :q], False)
    if r:
        nxt = score.gather(1, order[:, q:q + 1]).squeeze(1)
        extra = torch.sort(nxt, stable=True).indices[:r]
        keep[extra, order[extra, q]] = False
    return keep


def _solve(weight, stat: InputNorms, sparsity: Sparsity, *, weight_in_first: bool, calib) -> tuple[torch.Tensor, torch.Tensor]:
    keep = wanda_keep(weight, stat.norms, sparsity, weight_in_first)
    return torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)), keep


register(Method("wanda", "Wanda: prune the smallest |W|·||X|| in each output row (calibration activations)",
                solve=_solve, observer=InputNorms, channel_score=lambda w, stat: wanda_scores(w, stat.norms)))
