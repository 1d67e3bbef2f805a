"""One-shot magnitude pruning (OMP): drop the weights of smallest |w|.

The reference is the method's score, the weight itself (its magnitude key is |w|'s), under the
rules of ``llm_prune.magnitude``. The fast path is a ``Plan`` for the fused kernels of
``llm_prune.kernels.magnitude``: the threshold (or N:M) decided once per tensor, then applied
to the whole tensor or piece by piece, giving the same bits as the reference with no
temporaries. OMP's masks are nested across sparsities, so a loaded model's sparsity can be
raised in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Sparsity
from ..magnitude import bucket_table, check_finite, kernels_for, key_table, prune_count, table_threshold
from . import Method, register


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight


@dataclass
class Plan:
    """How the kernels prune one tensor, decided once (threshold and ties, or N:M), then applied
    whole or piece by piece in flat order: the exporter prunes a tensor a few MiB at a time into
    a small buffer it writes out. Pieces must follow one another and hold a multiple of ``align``
    weights."""

    key: int = -1  # unstructured: prune every key below, and the first `ties` equal to it
    ties: int = 0
    nm: tuple[int, int] | None = None
    used: int = 0  # ties pruned so far

    @property
    def align(self) -> int:
        return self.nm[1] if self.nm else 1

    def fits(self, out: torch.Tensor | None) -> bool:
        return out is None or kernels_for(out) is not None

    def apply(self, src: torch.Tensor, out: torch.Tensor | None = None) -> int:
        """Prune the next piece ``src`` into ``out`` (default: in place); returns the zeros written."""
        if self.nm:
            from ..kernels.nm import prune_nm_

            return prune_nm_(src, *self.nm, out)
        used, zeros = kernels_for(src).prune_below_(src, self.key, self.ties - self.used, out)
        self.used += used
        return zeros


def plan(w: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False,
         threshold: tuple[int, int] | None = None) -> Plan | None:
    """OMP of ``w`` for the kernels: at a known ``threshold`` (key, ties), else each matrix to the
    sparsity or N:M. None where the kernels cannot take ``w`` (not a contiguous fp16/bf16/fp32
    CPU tensor, or N:M along dim 0 of a Conv1D weight). Raises ``NonFinite`` for inf or nan (at a
    known threshold, when the plan is applied)."""
    if kernels_for(w) is None or (threshold is None and sparsity.is_nm and weight_in_first):
        return None
    if threshold is not None:  # the kernel refuses inf/nan as it prunes: no pass of its own
        return Plan(key=threshold[0], ties=threshold[1])
    if sparsity.is_nm:
        check_finite(w)
        return Plan(nm=(sparsity.n, sparsity.m))
    t, _ = table_threshold([key_table(w, checked=True)], prune_count(w.numel(), sparsity.ratio),
                           lambda high: [bucket_table(w, high)])
    return Plan(key=t.key, ties=t.ties)


register(Method("omp", "one-shot magnitude pruning: remove the smallest |w|", score=magnitude_score, plan=plan,
                nested=True))
