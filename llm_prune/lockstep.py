"""Every calibration sample through one block in lockstep: ``--true-sequential`` in one forward.

    for each target, in forward order:
        every sample runs up to the target     its input is added to the target's statistic
        solve(target)                          the weight is replaced while all samples wait
    every sample runs on to the block's end    the next block's inputs

Each sample's forward runs in its own greenlet (a coroutine on this thread, so torch's
thread-local state - no_grad, autocast - is the scheduler's, and samples run one at a time in
sample order, as ``blocks.run_block`` runs them). A target's forward pre-hook adds the sample's
input to the target's statistic and switches back to the scheduler; once every sample waits at
the target, the scheduler solves it and resumes them all. So each target is observed with every
target before it already pruned, in a single forward of the block, where solving group by group
(``blocks.observe`` per group) runs one forward per group and then one more for the outputs. The
bytes are the same: every sample meets the same ops on the same weights in the same order.

The price is memory: every sample's live activations are held at once (``held_bytes``), not one
sample's. ``sequential`` takes this path only where that fits.
"""

from __future__ import annotations

import weakref

import torch
from greenlet import getcurrent, greenlet
from torch import nn

from .blocks import never_ran

_DONE = object()  # what a sample's greenlet hands back when its forward is over


class Lockstep:
    """Run ``x``'s samples through ``block`` in lockstep, pausing at every target of ``rels``.

    ``make(columns, device)`` makes a target's statistic (its method's ``observer``); targets that
    receive the very same input tensor share one statistic, as ``blocks.Observers`` decides it:
    by object identity within one sample's forward, never by address.
    """

    def __init__(self, block: nn.Module, rels: list[str], make, device):
        self.block, self.make, self.device, self.rels = block, make, device, list(rels)
        self.leader: dict[str, str] = {}
        self.stats: dict[str, object] = {}
        self._sample: dict[greenlet, int] = {}
        self._seen: dict[int, list[tuple[weakref.ref, str]]] = {}
        self._handles = [block.get_submodule(rel.rsplit(".", 1)[0]).register_forward_pre_hook(self._hook(rel))
                         for rel in rels]

    def _hook(self, rel: str):
        def pre(module, args):
            me = getcurrent()
            if me not in self._sample:  # a forward outside ``run``: nothing to wait for
                return
            j, x = self._sample[me], args[0]
            seen = self._seen.setdefault(j, [])
            leader = next((name for ref, name in seen if ref() is x), rel)
            if j == 0:
                self.leader[rel] = leader
                if leader == rel:
                    self.stats[rel] = self.make(x.shape[-1], self.device)
            elif self.leader.get(rel) != leader:
                raise RuntimeError(f"sample {j} reached {rel} with another input than sample 0: "
                                   "the block's forward differs between samples")
            if leader == rel:
                seen.append((weakref.ref(x), rel))
                with torch.autocast(x.device.type, enabled=False):  # statistics in fp32 under bf16-mixed
                    self.stats[rel].add(x.detach())
            me.parent.switch(rel)
        return pre

    def stat(self, rel: str):
        return self.stats[self.leader[rel]]

    def run(self, x: torch.Tensor, kwargs: dict, dtype, solve, until: set[str] | None = None) -> list[str]:
        """Run every sample of ``x`` through the block; at each target, once all samples have
        reached it, call ``solve(rel)`` (which replaces its weight). The block's outputs replace
        ``x`` sample by sample, as each forward ends; with ``until``, the forwards stop once those
        targets are solved instead (the outputs are not needed). Returns the targets in the order
        solved."""
        def forward(j: int):
            y = self.block(x[j:j + 1].to(self.device, dtype), **kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            x[j] = y[0].to(x.device, x.dtype)  # sample j is consumed before it is overwritten
            return _DONE

        samples = [greenlet(lambda j=j: forward(j)) for j in range(x.shape[0])]
        self._sample = {g: j for j, g in enumerate(samples)}
        solved = []
        try:
            while True:
                at = [g.switch() for g in samples]  # each runs to its next target, or to its end
                other = next((a for a in at if a != at[0]), None)
                if other is not None:
                    where = ["the block's end" if a is _DONE else a for a in (at[0], other)]
                    raise RuntimeError(f"the samples' forwards went different ways ({where[0]} / {where[1]}): "
                                       "the block's forward differs between samples")
                if at[0] is _DONE:
                    missing = [rel for rel in self.rels if rel not in self.leader]
                    if missing:
                        raise never_ran(missing[0])
                    return solved
                with torch.autocast(torch.device(self.device).type, enabled=False):  # solves run in fp32
                    solve(at[0])
                solved.append(at[0])
                if until is not None and until <= set(solved):
                    return solved
        finally:
            self._sample = {}
            for g in samples:  # a failed run leaves the others parked: unwind them now
                if g and not g.dead:
                    g.throw()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def held_bytes(config: dict, nsamples: int, seqlen: int, hidden: int, act_bytes: int, matmul_bytes: int) -> int:
    """What a lockstep run holds beyond the block inputs, an estimate with a margin: per token of
    every sample, the widest of a Llama block's waits - at the output projection the residual, the
    normalised input, the rotated queries and keys and the values (activation dtype), and the
    attention output; at the down projection the residual, the MLP's input and the gated product
    (matmul dtype) - taken as 4 × hidden in the activation dtype plus the wider of the MLP and 2 ×
    hidden in the matmuls' dtype. The MLP's width comes from the config (Llama, OPT and GPT-2
    names; GPT-2's default of 4 × hidden). The process's peak grows by more than the samples hold
    (the allocator cannot reuse the gaps between held tensors): SmolLM2 Wanda at 128 × 2048 in
    bf16-mixed, 3.2 GB estimated, peak RSS 3.6 GB above the default's (BENCHMARKS.md, session 19),
    which is why ``sequential`` asks for twice the estimate free."""
    inner = config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner") or 4 * hidden
    return nsamples * seqlen * (4 * hidden * act_bytes + max(inner, 2 * hidden) * matmul_bytes)
