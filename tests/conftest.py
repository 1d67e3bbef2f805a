"""Shared fixtures: tiny random checkpoints for structure, the real SmolLM2 for behaviour.

Tests never reach a hub (HF_HUB_OFFLINE=1). The llm-prune cache (the converted SmolLM2, file
hashes) lives in the user's cache as in normal use, so CI converts SmolLM2 at most once.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


def save_tiny(path, config, *, dtype=torch.bfloat16, shard="40KB", seed=0):
    """A randomly initialised model saved as a sharded safetensors checkpoint (with tokenizer-free
    side files only). Small shards make blocks straddle files, as in real hub checkpoints."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


def tiny_opt_config(**kw):
    from transformers import OPTConfig

    base = dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTConfig(**{**base, **kw})


@pytest.fixture
def tiny_llama(tmp_path):
    return save_tiny(tmp_path / "tiny-llama", tiny_llama_config())


@pytest.fixture
def tiny_opt(tmp_path):
    return save_tiny(tmp_path / "tiny-opt", tiny_opt_config())


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M checkpoint (bf16, 5 shards), converted once from the packaged GGUF."""
    from llm_prune.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture
def calib_text(tmp_path):
    """A small calibration text file: 12 of the embedded calibration passages."""
    from llm_prune.calibration import embedded_passages

    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(embedded_passages("calib")[:12]))
    return path


@pytest.fixture
def llama_dir(tiny_llama):
    """The tiny random Llama with a tokenizer beside it (what calibrated runs need)."""
    from .helpers import add_tokenizer

    return add_tokenizer(tiny_llama)
