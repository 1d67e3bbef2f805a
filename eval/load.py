"""Load a checkpoint directory (dense or exported) for evaluation: device, dtype, 8/4-bit.

Defaults, and why: on CUDA bf16 (fp16 where the GPU lacks bf16), the dtype the models are
published in; on CPU fp32, because CPU bf16 matmuls are slow on most CPUs and lose precision
for perplexity.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from .. import runtime
from ..errors import UserError
from ..runtime import resolve_device
from ..reader import SPARSE_INDEX
from .settings import EvalSettings

log = logging.getLogger(__name__)


def pick_device(device: str | None) -> str:
    """The device evaluation runs on, as transformers and lm-eval name it."""
    return str(resolve_device(device))


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(load_in: str | None, device: str):
    """bitsandbytes config for --load-in, or a UserError where it cannot run."""
    if load_in is None:
        return None
    if not device.startswith("cuda"):
        raise UserError(f"--load-in {load_in} is unsupported on {device}: bitsandbytes 8-/4-bit loading needs a CUDA GPU here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--load-in {load_in} needs bitsandbytes: pip install 'llm-prune[quant]'")
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")


def model_kwargs(settings: EvalSettings) -> dict:
    """``from_pretrained`` keyword arguments for these settings (shared with lm-eval's own loader)."""
    device = pick_device(settings.device)
    kw = {"dtype": pick_dtype(settings.dtype, device)}
    quant = quantization_config(settings.load_in, device)
    if quant is not None:
        kw["quantization_config"] = quant
        kw["device_map"] = {"": device}
    return kw


def load_tokenizer(path: Path, tokenizer: str | Path | None = None):
    return runtime.load_tokenizer(tokenizer or path, "evaluation",
                                  "copy the tokenizer files next to the weights or pass --tokenizer DIR")


def load_model(path: Path, settings: EvalSettings, tokenizer: str | Path | None = None):
    """(model, tokenizer) for a checkpoint directory, on the settings' device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    device = pick_device(settings.device)
    kw = model_kwargs(settings)
    log.info("loading %s on %s as %s%s", path, device, kw["dtype"], f" ({settings.load_in})" if settings.load_in else "")
    try:
        if (path / SPARSE_INDEX).is_file():  # bitmask / packed24 export: decode while loading
            if settings.load_in is not None:
                raise UserError(f"--load-in does not apply to {path}, a compressed export (load it dense)")
            from ..loading import load

            model = load(path, dtype=kw["dtype"], progress=settings.progress)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from None
    if settings.load_in is None:
        model.to(device)
    return model.eval(), load_tokenizer(path, tokenizer)
