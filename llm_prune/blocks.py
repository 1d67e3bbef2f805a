"""A transformer block as a module, for calibrated pruning: built empty, filled from the stream, run, observed.

``build_skeleton`` makes the whole model on the meta device (nothing allocated);
``capture_block_inputs`` runs only the embedding modules (``arch.embed_modules``) to get block 0's
inputs and the kwargs the model's forward passes to its blocks (attention mask, rotary
embeddings, position ids), so families differ only by the data in ``llm_prune.arch``;
``load_block`` fills one block from checkpoint tensors; ``run_block`` runs calibration samples
through it; ``Observers`` feed each target's inputs to its method's statistic through hooks.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Arch
from .errors import UserError
from .reader import CheckpointReader


class _StopForward(Exception):
    """Raised by the block-0 pre-hook: the rest of the model is never run."""


def build_skeleton(model_dir) -> nn.Module:
    """The whole model with every parameter on the meta device (no memory); buffers that are
    computed rather than stored (rotary ``inv_freq``) are real, because the forward needs them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise UserError(f"calibrated pruning needs a causal LM; transformers cannot build one from "
                        f"{model_dir}/config.json ({e})") from None
    return model.eval()


def check_uniform(blocks: nn.ModuleList) -> None:
    # The kwargs captured at block 0 (e.g. the attention mask) serve every block; models that
    # alternate sliding-window and full attention per layer would need one capture per type.
    kinds = {getattr(b, "attention_type", None) for b in blocks}
    if len(kinds) > 1:
        raise UserError(f"blocks use different attention types ({sorted(map(str, kinds))}); "
                        "calibrated pruning supports one type per model so far")


def capture_block_inputs(skeleton: nn.Module, reader: CheckpointReader, arch: Arch, block0: nn.Module,
                         windows: torch.Tensor, device, dtype, store, progress: bool = False):
    """([nsamples, seqlen, hidden] inputs of block 0 on ``store``, the kwargs block 0 receives).

    Only ``arch.embed_modules`` are filled from the checkpoint; a pre-hook on block 0 records its
    inputs and stops the forward there, and the embeddings go back to the meta device after.
    """
    loaded = _load_embeddings(skeleton, reader, arch, device, dtype)
    for m in skeleton.modules():  # computed buffers (rotary frequencies) follow the device
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                m._buffers[k] = b.to(device)
    seen: dict = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    x = None
    try:
        with torch.no_grad():
            for j in tqdm(range(windows.shape[0]), desc="block 0 inputs", unit="sample", disable=not progress,
                          leave=False):
                try:
                    skeleton(input_ids=windows[j:j + 1].to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError(f"the forward of {type(skeleton).__name__} never reached block 0")
                if x is None:
                    x = torch.empty((windows.shape[0], *seen["h"].shape[1:]), dtype=dtype, device=store)
                x[j] = seen["h"][0]
    finally:
        handle.remove()
        for module in loaded:
            module.to("meta")
    return x, seen["kwargs"]


def _load_embeddings(skeleton, reader, arch, device, dtype) -> list[nn.Module]:
    prefix = getattr(skeleton, "base_model_prefix", "") + "."
    loaded = []
    for path in arch.embed_modules:
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            continue  # optional part this configuration does not have (OPT's project_in)
        names = {}
        for key in module.state_dict():
            full = f"{path}.{key}"
            name = full if full in reader.infos else full.removeprefix(prefix)
            if name not in reader.infos:
                raise UserError(f"the checkpoint has no {full}, which computes the calibration inputs")
            names[key] = name
        tensors = reader.read(list(names.values()))
        module.load_state_dict({k: _cast(tensors[n], device, dtype) for k, n in names.items()}, assign=True)
        loaded.append(module)
    return loaded


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    # Always a copy: reader tensors are copy-on-write mmaps that must never be written.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)


def load_block(module: nn.Module, tensors: dict[str, torch.Tensor], arch: Arch, device, dtype,
               matmul: torch.dtype | None = None) -> nn.Module:
    """Fill a meta-device block with its checkpoint tensors (cast to ``dtype``) on ``device``.
    ``matmul`` (bf16-mixed): the weights of its matmul layers are stored in that dtype instead,
    the values autocast would give them at every call, cast once."""
    matmul_weights = {f"{name}.weight" for name, m in module.named_modules() if _is_matmul(m)} if matmul else set()
    state = {rel: _cast(t, device, matmul if rel in matmul_weights else dtype)
             for rel, t in ((arch.block_of(n)[1], t) for n, t in tensors.items())}
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"the checkpoint's block holds tensors the model's block does not have: "
                        f"{', '.join(result.unexpected_keys[:3])}")
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"the checkpoint's block lacks {', '.join(missing[:3])}")
    return module.to(device).eval()


def _is_matmul(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is an addmm, which autocast casts like a Linear
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, device, dtype, *, collect: bool,
              after_each=None, matmul: torch.dtype | None = None) -> torch.Tensor | None:
    """Run every sample through ``block``, one at a time (as the reference code does: memory is
    one sample's activations). Returns the outputs, in place of ``x``, when ``collect``.
    ``matmul``: the dtype the forward's matmuls autocast to (None: ``dtype`` throughout)."""
    with matmul_autocast(device, matmul):
        for j in range(x.shape[0]):
            y = block(x[j:j + 1].to(device, dtype), **kwargs)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if after_each is not None:
                after_each()
            if collect:
                x[j] = y[0].to(x.device, x.dtype)  # sample j is consumed before it is overwritten
    return x if collect else None


def matmul_autocast(device, matmul: torch.dtype | None):
    return torch.autocast(torch.device(device).type, dtype=matmul, enabled=matmul is not None)


def observe(block, rels, method, device, x, kwargs, dtype, first_group_only=False,
            matmul: torch.dtype | None = None) -> "Observers":
    """One forward of every sample through ``block`` with ``rels`` observed. The block's output
    is not needed: after the first sample each forward stops once the last observed input has
    been seen (the down projection and what follows it never run)."""
    observers = Observers(block, rels, method.observer, device, first_group_only=first_group_only, stop_early=True)
    with torch.no_grad(), matmul_autocast(device, matmul):
        for j in range(x.shape[0]):
            try:
                block(x[j:j + 1].to(device, dtype), **kwargs)
            except _Enough:
                pass
            observers.end_forward()
    observers.remove()
    return observers


def never_ran(rel: str) -> UserError:
    """The error for a target no forward of its block reached (so it has no statistics)."""
    return UserError(f"{rel} never ran in the block's forward, so it has no calibration statistics "
                     "(leave it out with --exclude)")


class _Enough(Exception):
    """Raised by the last observer's hook: the rest of the forward is not needed."""


class Observers:
    """Forward pre-hooks feeding each target's inputs to its method's observer.

    Targets that receive the very same input tensor (q/k/v projections; gate/up) share one
    observer: the statistic is a function of the input alone, so computing it once is exact.
    Sharing is decided on the first forward by object identity, never by address (a freed
    activation's memory can be reused by the next one).
    """

    def __init__(self, block: nn.Module, rel_names: list[str], make, device, first_group_only: bool = False,
                 stop_early: bool = False):
        self.first_group_only = first_group_only  # accumulate only the first input group's statistics
        self.stop_early = stop_early  # forwards after the first end at the last observed input (``observe``)
        self.leader: dict[str, str] = {}
        self.stats: dict[str, object] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._first = True
        self._last: str | None = None  # the last input observed in a forward (learnt from the first)
        self._handles = []
        for rel in rel_names:
            module = block.get_submodule(rel.rsplit(".", 1)[0])
            self._handles.append(module.register_forward_pre_hook(self._hook(rel, make, device)))

    def _hook(self, rel, make, device):
        def pre(module, args):
            x = args[0]
            if self._first:
                leader = next((name for t, name in self._seen if t is x), None)
                if leader is not None:
                    self.leader[rel] = leader
                    return
                self._seen.append((x, rel))
                self.leader[rel] = rel
                if self.first_group_only and self.stats:
                    return  # a later group: observed in its own forward, after the earlier ones are pruned
                self.stats[rel] = make(x.shape[-1], device)
                self._last = rel
            if rel in self.stats:
                with torch.autocast(x.device.type, enabled=False):  # statistics in fp32 under bf16-mixed
                    self.stats[rel].add(x.detach())
                if self.stop_early and not self._first and rel == self._last:
                    raise _Enough
        return pre

    def end_forward(self) -> None:
        self._first = False
        self._seen.clear()

    def groups(self, rel_names: list[str]) -> list[list[str]]:
        """``rel_names`` grouped by shared input, the groups in forward order."""
        for rel in rel_names:
            if rel not in self.leader:
                self.stat(rel)  # refuses a target that never ran
        return [[r for r in rel_names if self.leader[r] == leader] for leader in dict.fromkeys(self.leader.values())]

    def stat(self, rel: str):
        if rel not in self.leader:
            raise never_ran(rel)
        return self.stats[self.leader[rel]]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
