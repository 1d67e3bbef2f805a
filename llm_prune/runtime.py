"""What this process can reach and run on: the hub, a device, a checkpoint's tokenizer.

One answer to each question, shared by calibration, evaluation and the model resolver.
"""

from __future__ import annotations

import functools
import os
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


def _set(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def offline() -> bool:
    """True when the user switched the Hugging Face hub off (HF_HUB_OFFLINE)."""
    return _set("HF_HUB_OFFLINE")


def datasets_offline() -> bool:
    """True when datasets may not be fetched (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return offline() or _set("HF_DATASETS_OFFLINE")


@functools.lru_cache(maxsize=None)  # one probe per process
def hub_reachable() -> bool:
    """The hub answers within a few seconds (never probed when switched off): a quick probe
    instead of the datasets library's retries on a machine without network."""
    if datasets_offline():
        return False
    try:
        urllib.request.urlopen("https://huggingface.co/api/datasets/cais/mmlu", timeout=3).close()
        return True
    except Exception:
        return False


# module -> (its package on PyPI, the llm-prune extra that installs it)
OPTIONAL = {
    "lm_eval": ("lm-eval", "eval"),
    "datasets": ("datasets", "eval"),
    "pyarrow": ("pyarrow", "eval"),  # installed with datasets
    "gguf": ("gguf", "gguf"),
    "matplotlib": ("matplotlib", "plot"),
    "bitsandbytes": ("bitsandbytes", "quant"),
    "sklearn": ("scikit-learn", "vision"),
    "PIL": ("pillow", "vision"),
}


def require(module: str, what: str) -> None:
    """One line saying which extra to install when an optional package is missing (never a
    traceback from deep inside a command)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        package, extra = OPTIONAL[module]
        raise UserError(f"{what} needs {package}: pip install 'llm-prune[{extra}]'")


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device (refused when it is none or this torch cannot use it); None picks
    CUDA when present, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this torch build sees no CUDA device; use --device cpu")
    return device


def free_memory(device: torch.device) -> int:
    """Bytes ``device`` can still allocate: CUDA's free memory, or the system's available memory
    (MemAvailable: free pages plus the page cache it can drop) for the CPU; 0 when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return 0
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_tokenizer(path: str | Path, purpose: str, hint: str = "copy the tokenizer files next to the weights"):
    """The tokenizer saved with a checkpoint (or at ``path``), or one line saying what needs it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"no usable tokenizer in {path} ({type(e).__name__}); {purpose} needs one: {hint}") from None
