"""Helpers shared by the tests: bit views, the reference keep, 2:4 fixtures, shard decoding, OMP in place."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llm_prune.calibration import embedded_passages
from llm_prune.config import Sparsity
from llm_prune.kernels.formats import decode_all
from llm_prune.magnitude import nm_keep
from llm_prune.methods import METHODS, prune_

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as integers (so -0.0 != +0.0 and nan == nan); others as they are."""
    return t.detach().contiguous().view(_INT[t.element_size()]) if t.is_floating_point() else t


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(bits(a[k]), bits(b[k])), k


def assert_bitwise(a, b) -> None:
    """Two models hold the same parameters and buffers, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(bits(sa[k]), bits(sb[k])), f"{k} differs"
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert na == nb and torch.equal(ba, bb), na


def reference_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """The simple way: prune the k smallest |x|, ties broken by flat index (stable sort)."""
    order = torch.argsort(x.abs().flatten().float(), stable=True)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view_as(x)


def masked(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype))


def pruned_24(rows: int, cols: int, dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    """A random matrix pruned to 2:4 along its rows."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return masked(w, nm_keep(w, 2, 4)).to(device)


def magnitude_prune_(w: torch.Tensor, sparsity: Sparsity, weight_in_first: bool = False, out=None) -> int:
    """OMP of one matrix in place (or into ``out``), through the method's fast path where it applies."""
    return prune_(METHODS["omp"], w, sparsity, weight_in_first, out=out)[0]


def threshold_prune_(w: torch.Tensor, key: int, ties: int, out=None) -> tuple[int, int]:
    """OMP at a known threshold: (zeros, ties used)."""
    return prune_(METHODS["omp"], w, Sparsity(0.0), threshold=(key, ties), out=out)


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as stored."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def read_decoded(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, decoded shard by shard with the formats' own metadata."""
    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update(decode_all({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    return out


def digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(path).glob("*.safetensors"))}


def add_tokenizer(model_dir: Path) -> Path:
    """A 128-token BPE trained on a few embedded passages, so the tiny models read real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=128, limit_alphabet=90, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator(embedded_passages("calib")[:100], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    return model_dir


@contextlib.contextmanager
def interrupted_after_writes(monkeypatch, n: int = 2):
    """Inside, the writer raises KeyboardInterrupt once ``n`` units are written (a run stopped
    mid-way); yields the keys of the units written. The real writer is back on exit."""
    from llm_prune.writer import ShardWriter

    real, written = ShardWriter.write, []

    def write(self, unit, *args, **kw):
        if len(written) == n:
            raise KeyboardInterrupt
        real(self, unit, *args, **kw)
        written.append(unit.key)

    monkeypatch.setattr(ShardWriter, "write", write)
    try:
        yield written
    finally:
        monkeypatch.setattr(ShardWriter, "write", real)
