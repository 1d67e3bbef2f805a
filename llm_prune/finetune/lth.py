"""Lottery tickets: iterative magnitude pruning on the task, rewinding to the pre-trained weights.

    round r = 1..K:  rewind to the pre-trained weights (and the seeded head), apply the mask,
                     fine-tune with the mask held, then prune by magnitude to sparsity
                     1 - (1 - p)^r, p = 1 - (1 - S)^(1/K): the same fraction p of the weights
                     still kept goes every round, and after K rounds the sparsity is S
    final:           rewind, apply the round-K mask, fine-tune, evaluate

Each round's pruning is this project's magnitude pruner on the trained weights (pruned weights
are exactly zero, so they sort first and the masks nest), at layer or global scope; each round's
keep-mask is saved (the bit-packed files ``llm-prune masks compare`` reads). With one round the
ticket's mask is OMP applied to the fine-tuned dense weights.

A ticket can also start from a sparser one (``start``): the rounds then go from that ticket's
sparsity s0 to S, each pruning the same fraction of what is kept, and round 1 prunes the start
ticket's trained weights. A sweep chains its levels this way (dense -> 0.2 -> 0.4 -> ...), the
way iterative-magnitude-pruning curves are drawn: one chain of rounds, every level a point on it.
"""

from __future__ import annotations

import torch

from ..config import Sparsity
from ..errors import UserError
from ..magnitude import find_threshold, threshold_keep
from ..methods import METHODS, score_keep
from .mask_keeper import MaskKeeper


def round_sparsities(sparsity: float, rounds: int, start: float = 0.0) -> list[float]:
    """The sparsity after each round from ``start``; the last is ``sparsity`` exactly."""
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    if not 0 <= start < sparsity:
        raise UserError(f"a lottery ticket goes from sparsity {start:g} up to {sparsity:g}: give a higher sparsity")
    keep = (1 - sparsity) / (1 - start)  # of the start's kept weights, kept at the end
    return [1 - (1 - start) * keep ** (r / rounds) for r in range(1, rounds)] + [sparsity]


def per_round_fraction(sparsity: float, rounds: int, start: float = 0.0) -> float:
    """The fraction of the still-kept weights that each round prunes."""
    return 1 - ((1 - sparsity) / (1 - start)) ** (1 / rounds)


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str,
                    weight_in_first: bool = False) -> dict[str, torch.Tensor]:
    """Keep-masks of the weights at ``sparsity`` by magnitude: per matrix, or one exact threshold
    over all of them (ties to the earliest, in the order given)."""
    omp = METHODS["omp"]
    if scope == "layer":
        return {n: score_keep(omp, w.detach().cpu(), Sparsity(sparsity), weight_in_first) for n, w in weights.items()}
    tensors = [w.detach().cpu() for w in weights.values()]
    t = find_threshold(lambda: iter(tensors), int(round(sparsity * sum(w.numel() for w in tensors))))
    masks, ties = {}, t.ties
    for name, w in zip(weights, tensors):
        masks[name], used = threshold_keep(w, t.key, ties)
        ties -= used
    return masks


def lottery_ticket(model, initial: dict[str, torch.Tensor], targets: dict[str, str], sparsity: float, rounds: int,
                   scope: str, train_round, save_mask, first_round: tuple[dict, dict] | None = None,
                   keep_first=None, start: float = 0.0) -> dict:
    """Run the rounds on ``model`` (a classifier), rewinding to ``initial`` (its state dict before
    any training). ``targets`` maps model parameter names to checkpoint names; ``train_round(model,
    keeper) -> metrics`` fine-tunes with the mask kept; ``save_mask(round, {checkpoint name: mask})``
    stores each round's mask. ``first_round`` is (metrics, state dict) of the dense fine-tune from
    ``initial`` with the same settings, when it was done before: round 1 is that run (nothing is
    pruned before it), so it is taken instead of trained again; otherwise ``keep_first(model)``, when
    given, keeps round 1's trained model for later tickets. With ``start`` > 0, ``first_round`` is
    the trained ticket at sparsity ``start`` (its pruned weights exactly zero), and round 1 prunes it
    further. Returns each round's results and the final ticket's."""
    if start > 0 and first_round is None:
        raise ValueError("a ticket that starts sparser than dense needs the trained start ticket (first_round)")
    keep = {n: torch.ones_like(dict(model.named_parameters())[n], dtype=torch.bool) for n in targets}
    history = []
    for r, level in enumerate(round_sparsities(sparsity, rounds, start), start=1):
        rewind(model, initial, keep)
        if r == 1 and first_round is not None:
            metrics, trained = first_round
            with torch.no_grad():
                model.load_state_dict(trained)
        else:
            metrics = train_round(model, MaskKeeper(keep))
            if r == 1 and keep_first is not None:
                keep_first(model)
        params = dict(model.named_parameters())
        keep = magnitude_masks({n: params[n] for n in targets}, level, scope)
        save_mask(r, {targets[n]: m for n, m in keep.items()})
        history.append({"round": r, "metrics": metrics, "sparsity_after": level, "achieved_after": 1 - kept_fraction(keep)})
    rewind(model, initial, keep)
    final = train_round(model, MaskKeeper(keep))
    return {"rounds": history, "final": final, "per_round_fraction": per_round_fraction(sparsity, rounds, start),
            "start": start}


def rewind(model, initial: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> None:
    """Every weight back to ``initial`` (bit for bit), then the pruned ones to +0."""
    with torch.no_grad():
        model.load_state_dict(initial)
        params = dict(model.named_parameters())
        for name, mask in keep.items():
            params[name].masked_fill_(~mask.to(params[name].device), 0)


def kept_fraction(keep: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in keep.values())
    return sum(int(m.sum()) for m in keep.values()) / max(total, 1)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}

