"""Per-family checkpoint layouts, as data.

An entry says where the transformer blocks live in a checkpoint's tensor names, whether its
2-D block weights are stored [out, in] (nn.Linear) or [in, out] (GPT-2's Conv1D, which matters
for N:M groups), and how to reach the block modules in the transformers model. Adding a family
is one entry; nothing else in the pipeline knows model names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Arch:
    family: str
    # Regex matching a tensor name inside block i; group 1 is the block prefix, group 2 the index.
    block_re: str
    # Attribute path of the ModuleList of blocks in the transformers model (for calibration).
    blocks_attr: str
    # GPT-2 style Conv1D keeps weights as [in, out]; everyone else [out, in].
    weight_in_first: bool = False
    # Calibration (sequential methods): attribute paths, in the transformers *ForCausalLM model, of
    # the modules that compute block 0's inputs from token ids; only these are materialised to
    # capture them. The block kwargs (attention mask, rotary embeddings, position ids) come from
    # the model's own forward, captured at block 0, so they need no entry here. Empty: the family
    # has no calibration path yet.
    embed_modules: tuple[str, ...] = ()
    # ``--permute``: matrices whose input channels are produced one for one by earlier tensors of
    # the block (names relative to the block), so that permuting both keeps the block's function
    # (``llm_prune.permute``). Producers a configuration lacks (biases) are skipped.
    permutable: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The same for the attention output projection and the value projection: reordered within each
    # value head (and every query head that reads it), from the config's head counts.
    permutable_heads: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def block_of(self, name: str) -> tuple[int, str] | None:
        """(block index, name relative to the block) or None for non-block tensors."""
        m = re.match(self.block_re, name)
        if m is None:
            return None
        return int(m.group(2)), name[m.end(1):]


_LLAMA_LIKE = dict(block_re=r"^((?:model\.)?layers\.(\d+)\.)", blocks_attr="model.layers",
                   embed_modules=("model.embed_tokens",))
_GATED_MLP = (("mlp.down_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias",
                                        "mlp.up_proj.bias")),)
_ENCODER_MLP = (("output.dense.weight", ("intermediate.dense.weight", "intermediate.dense.bias")),)
_VALUE_HEADS = (("self_attn.o_proj.weight", ("self_attn.v_proj.weight", "self_attn.v_proj.bias")),)
_ENCODER_HEADS = (("attention.output.dense.weight", ("attention.self.value.weight", "attention.self.value.bias")),)

ARCHS: dict[str, Arch] = {
    a.family: a
    for a in [
        Arch("llama", **_LLAMA_LIKE, permutable=_GATED_MLP, permutable_heads=_VALUE_HEADS),
        Arch("mistral", **_LLAMA_LIKE, permutable=_GATED_MLP, permutable_heads=_VALUE_HEADS),
        Arch("qwen2", **_LLAMA_LIKE, permutable=_GATED_MLP, permutable_heads=_VALUE_HEADS),
        Arch("qwen3", **_LLAMA_LIKE, permutable=_GATED_MLP, permutable_heads=_VALUE_HEADS),
        Arch("gemma", **_LLAMA_LIKE, permutable=_GATED_MLP, permutable_heads=_VALUE_HEADS),
        Arch("phi3", **_LLAMA_LIKE),  # gate_up_proj is fused: no --permute entry yet
        Arch("opt", block_re=r"^((?:model\.)?decoder\.layers\.(\d+)\.)", blocks_attr="model.decoder.layers",
             embed_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
             permutable=(("fc2.weight", ("fc1.weight", "fc1.bias")),),
             permutable_heads=(("self_attn.out_proj.weight", ("self_attn.v_proj.weight", "self_attn.v_proj.bias")),)),
        Arch("gpt2", block_re=r"^((?:transformer\.)?h\.(\d+)\.)", blocks_attr="transformer.h", weight_in_first=True,
             embed_modules=("transformer.wte", "transformer.wpe"),
             permutable=(("mlp.c_proj.weight", ("mlp.c_fc.weight", "mlp.c_fc.bias")),)),
        Arch("bert", block_re=r"^((?:bert\.)?encoder\.layer\.(\d+)\.)", blocks_attr="bert.encoder.layer",
             permutable=_ENCODER_MLP, permutable_heads=_ENCODER_HEADS),
        Arch("vit", block_re=r"^((?:vit\.)?encoder\.layer\.(\d+)\.)", blocks_attr="vit.encoder.layer",
             permutable=_ENCODER_MLP, permutable_heads=_ENCODER_HEADS),
    ]
}


def arch_for(config: dict) -> Arch:
    """The entry for a checkpoint's ``config.json``; one clear line when the family is unknown."""
    model_type = config.get("model_type")
    if model_type in ARCHS:
        return ARCHS[model_type]
    if config.get("auto_map"):  # a family defined by code in the checkpoint: never run (no remote code)
        raise UserError(f"model_type {model_type!r} is defined by code shipped with the checkpoint (auto_map), "
                        "which llm-prune never runs; add a layout entry in llm_prune/arch.py for its family")
    known = ", ".join(sorted(ARCHS))
    raise UserError(f"model_type {model_type!r} has no layout entry (known: {known}); add one in llm_prune/arch.py")
