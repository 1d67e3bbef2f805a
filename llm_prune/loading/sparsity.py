"""Raising the sparsity of a model pruned at load time, in memory, without a reload.

A nested method's masks (OMP's) grow with the sparsity, and a pruned weight scores lowest
(|0| = 0), so the weights to remove at a higher sparsity are among those still kept: the result
equals ``from_pretrained(..., sparsity=new)`` bit for bit. The key tables kept from loading give
each threshold without a pass; without them one histogram pass over the weights in memory finds
it, exact all the same.
"""

from __future__ import annotations

import weakref

import torch

from ..config import PruneConfig, Sparsity
from ..errors import UserError
from ..magnitude import deal_ties, find_threshold, own_threshold, table_threshold, threshold_keep
from ..methods import get_method, prune_
from .prune import PruneState

# Upcasts that keep every value (and so every magnitude order and tie): raising stays exact.
_LOSSLESS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}
# Which model was pruned how: recorded by ``from_pretrained`` for the model it returns, and gone
# with the model (weak keys: a model is never kept alive by this record, nor given attributes).
_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, PruneState]" = weakref.WeakKeyDictionary()


def remember(model: torch.nn.Module, state: PruneState) -> None:
    _STATES[model] = state


def prune_state(model: torch.nn.Module) -> PruneState | None:
    """How ``from_pretrained`` pruned ``model`` (None for any other model)."""
    return _STATES.get(model)


def set_sparsity(model, sparsity: float) -> None:
    """Raise a model from ``llm_prune.from_pretrained`` (nested method, unstructured) to ``sparsity``, in place."""
    state = prune_state(model)
    if state is None:
        raise UserError("set_sparsity needs a model from llm_prune.from_pretrained (it records how it was pruned)")
    cfg = state.config
    method = get_method(cfg.method)
    if not method.nested or cfg.sparsity.is_nm:
        raise UserError(f"set_sparsity raises unstructured OMP masks; this model was pruned with {cfg.method} "
                        f"{cfg.sparsity}: load it again with the new setting")
    if cfg.allocation != "uniform":
        raise UserError(f"set_sparsity raises every matrix by one rule; this model's sparsity was shared out by "
                        f"--allocation {cfg.allocation}: load it again with the new setting")
    new = Sparsity.parse(sparsity)
    if new.ratio < cfg.sparsity.ratio:
        raise UserError(f"lowering sparsity from {cfg.sparsity.ratio:g} to {new.ratio:g} needs the dense weights, "
                        f"which are gone: load again with from_pretrained(..., sparsity={new.ratio:g})")
    if new.ratio == cfg.sparsity.ratio:
        return
    params = dict(model.named_parameters())
    weights = [params[n] for n in state.order]
    for n, p in zip(state.order, weights):
        if p.device.type == "meta":
            raise UserError(f"{n} is offloaded to disk; set_sparsity needs the weights in memory: "
                            "load again with from_pretrained(..., sparsity=...)")
        if p.dtype != state.prune_dtype and (state.prune_dtype, p.dtype) not in _LOSSLESS:
            raise UserError(f"the model holds {p.dtype} weights cast from {state.prune_dtype}; that cast merged "
                            "magnitudes, so raising sparsity exactly needs a new load at the new sparsity")
    with torch.no_grad():
        current = lambda p: p.detach().to("cpu", state.prune_dtype)  # noqa: E731  (exact, see _LOSSLESS)
        tables = [state.tables.get(n) for n in state.order]
        have_tables = all(t is not None and not t.wide for t in tables)
        if have_tables:
            target, plan = _raised_plan(state, new)
        elif cfg.scope == "global":
            k = int(round(new.ratio * sum(p.numel() for p in weights)))
            t = find_threshold(lambda: (method.score(current(p)) for p in weights), k)
            plan, ties = {}, t.ties
            for n, p in zip(state.order, weights):
                used = threshold_keep(method.score(current(p)), t.key, ties)[1]
                plan[n], ties = (t.key, used), ties - used
        else:
            plan = None
        for n, p in zip(state.order, weights):
            w = current(p)  # p itself when it is on the CPU in the pruning dtype: pruned in place
            prune_(method, w, new, state.weight_in_first, threshold=plan[n] if plan is not None else None)
            if w.data_ptr() != p.data_ptr():
                p.data.copy_(w.to(p.device, p.dtype))
    state.config = PruneConfig(cfg.method, new, cfg.scope, cfg.targets, cfg.exclude)  # uniform: checked above
    if have_tables:
        state.applied = target  # thresholds are recorded against the original weights


def _raised_plan(state: PruneState, new: Sparsity):
    """(thresholds on the original weights, (key, ties) to apply to each *current* tensor so that
    it ends as the original pruned at ``new``).

    On the original tensor the new threshold prunes keys < key1 and the first ties1 at key1. In
    memory the weights pruned before are +0.0 (key 0). If the old key equals the new one (and is
    not 0), the first old ties at that key are zeros now, so only ties1 - ties0 of the remaining
    ones go; otherwise every weight at key1 is still in place (key 0: zeros stay first in order).
    """
    order = state.order
    if state.config.scope == "global":
        tables = [state.tables[n] for n in order]
        t, counts = table_threshold(tables, int(round(new.ratio * sum(t.numel for t in tables))))
        target = deal_ties(order, t.key, t.ties, dict(zip(order, counts)))
    else:
        target = {n: own_threshold(state.tables[n], new.ratio) for n in order}
    plan = {}
    for n, (key1, ties1) in target.items():
        key0, ties0 = state.applied.get(n, (-1, 0))
        plan[n] = (key1, ties1 - ties0 if key0 == key1 and key1 > 0 else ties1)
    return target, plan
