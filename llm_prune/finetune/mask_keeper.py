"""Fine-tuning with a fixed mask: pruned weights stay exactly zero through every optimizer step.

    keeper = MaskKeeper.from_zeros(model, names)        # or MaskKeeper({name: keep_bool_tensor})
    trainer = transformers.Trainer(..., callbacks=[keeper.callback()])    # a user's own Trainer
    # or, in a plain loop:
    keeper.attach(model)
    loss.backward(); optimizer.step(); keeper.after_step(model, optimizer); optimizer.zero_grad()

Three things keep the mask, each for a reason:

* gradients are masked by a hook on each parameter before they accumulate, so no optimizer ever
  sees a gradient for a pruned weight: AdamW's moments and SGD's momentum stay exactly zero
  there (no hidden mass that would come back if the mask were lifted), gradient clipping sees
  the norm of the trained weights only, and data-parallel all-reduces carry zeros;
* after every step the pruned weights are written +0 again (``masked_fill``), which holds whatever
  the optimizer does with a zero gradient (decoupled weight decay keeps 0 at 0, but a custom
  optimizer need not);
* the optimizer's per-weight state (moments, momentum buffers) is zeroed where pruned after every
  step, for optimizers that could put something there anyway. torch's SGD, Adam and AdamW
  cannot: their state is a running combination of gradients (and of the weight, for decay),
  all zero there, so for them the pass runs once (for state from before the mask, as when
  training resumes) and is skipped after (tests check the state stays zero).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class MaskKeeper:
    def __init__(self, masks: dict[str, torch.Tensor]):
        """``masks``: parameter name -> keep-mask (bool, True = kept) of that parameter's shape."""
        self.masks = {n: m.to(torch.bool) for n, m in masks.items()}
        self._drop: dict[str, torch.Tensor] = {}  # ~mask, computed once per device
        self._handles: list = []
        # zero-keeping optimizers already cleaned once; weak, so a new optimizer that reuses a
        # collected one's id() is never taken for it
        self._cleaned = weakref.WeakSet()

    @classmethod
    def from_zeros(cls, model: nn.Module, names) -> "MaskKeeper":
        """Keep-masks of the named parameters as they are now: every zero is pruned."""
        params = dict(model.named_parameters())
        return cls({n: params[n].detach() != 0 for n in names})

    def _params(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        missing = [n for n in self.masks if n not in params]
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]} ({len(missing)} masked names missing)")
        out = []
        for name, keep in self.masks.items():
            p = params[name]
            if p.shape != keep.shape:
                raise ValueError(f"{name}: mask of shape {tuple(keep.shape)} for a parameter of shape {tuple(p.shape)}")
            if keep.device != p.device:
                keep = self.masks[name] = keep.to(p.device)
            drop = self._drop.get(name)
            if drop is None or drop.device != p.device:
                drop = self._drop[name] = ~keep
            out.append((p, drop))
        return out

    def attach(self, model: nn.Module) -> "MaskKeeper":
        """Mask the weights now, and every gradient from now on (until ``detach``)."""
        self.detach()
        for p, drop in self._params(model):
            self._handles.append(p.register_hook(lambda g, drop=drop: g.masked_fill(drop, 0)))
        self.apply_(model)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Write +0 into every pruned weight."""
        for p, drop in self._params(model):
            p.masked_fill_(drop, 0)

    @torch.no_grad()
    def clean_optimizer_(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state (moments, momentum) where pruned."""
        for p, drop in self._params(model):
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(drop, 0)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Call after each ``optimizer.step()`` in a plain training loop."""
        self.apply_(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if isinstance(inner, _ZERO_KEEPING):
            if inner in self._cleaned:
                return
            self._cleaned.add(inner)
        self.clean_optimizer_(model, optimizer)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def callback(self):
        """A ``transformers.TrainerCallback`` that keeps this mask in any ``Trainer``."""
        return _callback_class()(self)


# Optimizers whose per-weight state stays zero wherever the gradient is always zero (see the module doc).
_ZERO_KEEPING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _callback_class():
    from transformers import TrainerCallback

    class MaskKeeperCallback(TrainerCallback):
        """Keeps a ``MaskKeeper``'s mask through a ``Trainer``'s training (add it to ``callbacks``)."""

        def __init__(self, keeper: MaskKeeper):
            self.keeper = keeper

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.keeper.attach(model)

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.keeper.after_step(model, optimizer)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.keeper.apply_(model)
            self.keeper.detach()

    return MaskKeeperCallback
