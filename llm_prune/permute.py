"""Input-channel permutation for N:M patterns, absorbed into the checkpoint (``--permute``).

An N:M pattern keeps N of every M consecutive input channels of a row; which channels share a
group is an accident of the checkpoint's order. Choosing the groups after permuting the input
channels keeps more of the method's score: RIA (Zhang et al., 2024) deals the channels out by
importance (``reallocation``: every group gets one channel of each importance quantile), then
improves the deal slot by slot with a linear sum assignment (``refine``).

RIA's code leaves every matrix in a permuted order that a runtime must undo by permuting the
activations before each matrix. Here a permutation is used only where the checkpoint can absorb
it, as NVIDIA's ASP does: a matrix whose input channels are produced one for one by earlier
matrices of its block (the MLP's down projection reads gate·up's outputs; ``Arch.permutable``),
or by the value projection through attention, head by head (``Arch.permutable_heads``).
The producers' output rows are permuted the same way, so the block computes the same function,
every matrix is N:M in storage order (packed 2:4 included) and inference changes nothing.
Matrices that read the residual stream (q/k/v, gate/up) share their input order with the whole
model and keep it.
"""

from __future__ import annotations

import torch

def kept_score(scores: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Score an N:M mask keeps, [out, in] scores, the input channels taken in ``perm``'s order."""
    s = scores if perm is None else scores[:, perm]
    return float(s.reshape(s.shape[0], -1, m).topk(n, dim=2).values.sum(dtype=torch.float64))


def channel_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = 1) -> torch.Tensor:
    """An order of the input channels of ``scores`` [out, in] whose N:M groups keep at least as
    much score as the stored order (which is returned when nothing beats it)."""
    s = scores.detach().to("cpu", torch.float32)
    identity = torch.arange(s.shape[1])
    perm = refine(s, reallocation(s.sum(0), m), n, m, rounds)
    return perm if kept_score(s, n, m, perm) > kept_score(s, n, m) else identity


def reallocation(importance: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's deal: channels sorted by importance, cut into M quantiles; slot k of group g takes
    quantile k's g-th channel, every other quantile taken in reverse (so strong meets weak)."""
    order = torch.sort(importance, stable=True).indices
    groups = order.numel() // m
    perm = torch.empty_like(order)
    for k in range(m):
        chunk = order[k * groups:(k + 1) * groups]
        perm[k::m] = chunk.flip(0) if k % 2 else chunk
    return perm


def refine(s: torch.Tensor, perm: torch.Tensor, n: int, m: int, rounds: int) -> torch.Tensor:
    """Reassign each slot's channels among the groups by a linear sum assignment, the other slots
    held: the best assignment is at least the current one, so the kept score never drops."""
    from scipy.optimize import linear_sum_assignment

    from .kernels.permute import gain_table

    perm = perm.clone()
    rows, groups = s.shape[0], s.shape[1] // m
    for _ in range(rounds):
        for k in range(m):
            g = perm.view(groups, m)
            S = s[:, perm].view(rows, groups, m)
            others = torch.cat([S[:, :, :k], S[:, :, k + 1:]], dim=2)
            top = others.topk(n, dim=2).values  # n < m: the others always hold n
            base, nth = top.sum(2), top[:, :, n - 1]
            cand = S[:, :, k]  # candidate c is the channel now in slot k of group c
            # gain[c, g]: what group g keeps with candidate c in slot k = base + max(0, cand - nth)
            gain = base.sum(0, dtype=torch.float64).unsqueeze(0) + gain_table(cand, nth).to(torch.float64)
            rows_c, cols_g = linear_sum_assignment(gain.numpy(), maximize=True)
            slot = g[:, k].clone()
            g[torch.as_tensor(cols_g), k] = slot[torch.as_tensor(rows_c)]
    return perm


def head_permutation(scores: torch.Tensor, n: int, m: int, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of the attention output projection's input channels, order of the value projection's
    output channels). Attention mixes positions, never the dimensions of a head, so each value
    head's dimensions may be reordered, and the output projection's columns of every query head
    that reads it (grouped-query attention: query head h reads value head h // (heads / kv_heads))
    the same way; one order per value head, chosen for all of its query heads' columns at once."""
    hd, per = scores.shape[1] // heads, heads // kv_heads
    into, out = torch.empty(heads * hd, dtype=torch.long), torch.empty(kv_heads * hd, dtype=torch.long)
    for g in range(kv_heads):
        reading = range(g * per, (g + 1) * per)
        order = channel_permutation(torch.cat([scores[:, h * hd:(h + 1) * hd] for h in reading]), n, m)
        out[g * hd:(g + 1) * hd] = g * hd + order
        for h in reading:
            into[h * hd:(h + 1) * hd] = h * hd + order
    return into, out


def permute_inputs(tensors: dict[str, torch.Tensor], consumer: str, producers: list[str], perm: torch.Tensor,
                   weight_in_first: bool, producer_perm: torch.Tensor | None = None) -> None:
    """Reorder ``consumer``'s input channels by ``perm`` and its ``producers``' output channels by
    ``producer_perm`` (default: ``perm``), weights and biases, in place in ``tensors``: the block
    computes the same function."""
    tensors[consumer] = tensors[consumer].index_select(0 if weight_in_first else 1, perm).contiguous()
    order = perm if producer_perm is None else producer_perm
    for name in producers:
        t = tensors[name]
        tensors[name] = t.index_select(1 if weight_in_first and t.dim() == 2 else 0, order).contiguous()
