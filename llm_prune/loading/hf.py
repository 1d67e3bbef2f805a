"""The one place llm-prune builds a model through transformers' private loading API.

``llm_prune.from_pretrained`` and ``llm_prune.load`` fill a model tensor by tensor, which
transformers' public ``from_pretrained`` cannot do, so they reuse the pieces it is built from:
an empty model from a config, the per-module dtype plan, device-map expansion, offloading, weight
tying and dispatch. Every such call is here, so a transformers release that moves one is fixed
in one file. Tested with transformers 5.23 and 5.24 (accelerate 1.15).
"""

from __future__ import annotations

from ..errors import UserError


def model_class(config):
    """The class named in the config's ``architectures``, else the auto class's mapping."""
    import transformers

    for arch_name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch_name, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise UserError(f"transformers has no model class for model_type {config.model_type!r}")


def empty_model(cls, config, dtype):
    """The model with every parameter on the meta device; buffers computed from the config
    (rotary tables) are real. Weight initialisation is skipped, as transformers' own load skips
    it: on meta tensors it runs torch's Python reference kernels, ~0.3 s for SmolLM2, for
    values that are replaced anyway."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    with init_empty_weights(), no_init_weights():
        return cls._from_config(config, dtype=dtype)


def model_names(model, checkpoint_names) -> dict[str, str]:
    """Checkpoint name -> the model's name for that tensor, as transformers' own load renames it
    (transformers 5 renames some families' weights when loading, e.g. ViT's
    ``encoder.layer.0.attention.attention.query`` to ``layers.0.attention.q_proj``; a base-model
    prefix is added or dropped). Names the model has no place for are left out. A family whose
    load merges or splits tensors cannot be filled one tensor at a time: refused in one line."""
    keys = set(model.state_dict())
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: no renaming at load
        from .build import model_key

        return {n: k for n in checkpoint_names if (k := model_key(n, keys, model.base_model_prefix))}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out = {}
    for name in checkpoint_names:
        key, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if converter is not None:
            raise UserError(f"transformers merges or splits {name} when it loads a {model.config.model_type} model; "
                            "llm-prune fills models one tensor at a time and cannot load this family")
        if key in keys:
            out[name] = key
    return out


def dtype_plan(model, dtype) -> dict:
    """Modules the model keeps in a dtype of their own (``_keep_in_fp32_modules``)."""
    return model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}


def placement(model, device_map, max_memory, keys: list[str]):
    """(the device map as transformers resolves it, or None; {parameter name: device})."""
    from transformers.integrations.accelerate import _get_device_map, check_and_set_device_map, expand_device_map

    device_map = check_and_set_device_map(device_map)
    if device_map is not None:
        device_map = _get_device_map(model, device_map, max_memory, None)
    return device_map, expand_device_map(device_map, keys)


def offload_weight(w, key: str, folder: str, index: dict) -> None:
    from transformers.integrations.accelerate import offload_weight as offload

    offload(w, key, folder, index)


def tie_weights(model, missing: set[str], offload_index: dict) -> None:
    """Tie the model's shared weights; a tied weight offloaded to disk is served from its source's entry."""
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    for target, src in tied.items():
        if src in offload_index and target not in offload_index:
            offload_index[target] = offload_index[src]
    model.tie_weights(missing_keys=missing, recompute_mapping=False)


def dispatch(model, device_map, offload_folder, offload_index: dict) -> None:
    """Hooks that move weights between devices and disk, when the map spans more than one."""
    from transformers.integrations.accelerate import accelerate_dispatch

    if device_map is not None and (len(set(device_map.values())) > 1 or "disk" in set(device_map.values())):
        accelerate_dispatch(model, None, device_map, offload_folder, offload_index, False)
