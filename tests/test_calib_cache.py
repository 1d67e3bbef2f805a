"""The calibration-window cache: a hit gives the very windows a miss made, without the tokenizer;
anything that decides the windows changes the key; a damaged or unwritable cache costs only time."""

from __future__ import annotations

import os

import pytest
import torch

from llm_prune import calib_cache
from llm_prune.calib_cache import cached_windows, windows_key
from llm_prune.calibration import CalibConfig, calibration_windows, embedded_passages
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.pipeline import prune_checkpoint
from llm_prune.runtime import load_tokenizer

from .helpers import add_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration"


@pytest.fixture
def model(tiny_llama):
    return add_tokenizer(tiny_llama)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(embedded_passages("calib")[:12]))
    return path


def calib(text, **kw) -> CalibConfig:
    return CalibConfig(**{"source": str(text), "nsamples": 6, "seqlen": 32, "seed": 0, **kw})


def no_tokenizer(*a, **k):
    raise AssertionError("a cache hit must not load the tokenizer")


def test_a_hit_gives_the_windows_of_the_miss_without_the_tokenizer(cache, model, text, monkeypatch):
    c = calib(text)
    expected, info = calibration_windows(c, load_tokenizer(model, "calibration"), 32)
    first, first_info = cached_windows(c, model, 32)
    assert torch.equal(first, expected) and first_info == info
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]  # no temporary left behind
    monkeypatch.setattr(calib_cache, "load_tokenizer", no_tokenizer)
    again, again_info = cached_windows(c, model, 32)
    assert torch.equal(again, expected) and again.dtype == torch.long and again_info == info


def test_everything_that_decides_the_windows_changes_the_key(cache, model, text, monkeypatch):
    base = windows_key(calib(text), model, 32)
    assert base == windows_key(calib(text, damp=0.1, blocksize=8, dtype="float32"), model, 32)  # the solve's own
    others = {windows_key(calib(text, nsamples=7), model, 32), windows_key(calib(text, seed=1), model, 32),
              windows_key(calib(text), model, 16)}
    text.write_text(text.read_text() + " more")  # the text: its size and time
    others.add(windows_key(calib(text), model, 32))
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text().replace("[UNK]", "[unk]"))
    others.add(windows_key(calib(text), model, 32))  # the tokenizer's files
    monkeypatch.setattr(calib_cache, "WINDOWS_VERSION", calib_cache.WINDOWS_VERSION + 1)
    others.add(windows_key(calib(text), model, 32))  # the code that draws them
    assert base not in others and len(others) == 6
    # a folder of texts: adding a file changes the key
    folder = text.parent / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(text.read_text())
    before = windows_key(calib(folder), model, 32)
    (folder / "b.md").write_text("another document")
    assert windows_key(calib(folder), model, 32) != before
    assert windows_key(calib(text, source="hf:some/dataset"), model, 32) is None  # the hub: never cached


def test_the_weights_are_not_part_of_the_key(cache, model, text):
    before = windows_key(calib(text), model, 32)
    shard = next(model.glob("*.safetensors"))
    os.utime(shard, ns=(1, 1))
    assert windows_key(calib(text), model, 32) == before


def test_a_damaged_entry_is_made_again(cache, model, text):
    c = calib(text)
    good, _ = cached_windows(c, model, 32)
    (entry,) = cache.iterdir()
    entry.write_bytes(b"not a safetensors file")
    again, _ = cached_windows(c, model, 32)
    assert torch.equal(again, good)
    assert torch.equal(cached_windows(c, model, 32)[0], good)  # and the entry was replaced
    assert entry.stat().st_size > 100


def test_a_cache_that_cannot_be_written_only_costs_time(cache, model, text):
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the cache's folder would go")  # fails for root too, unlike a mode
    windows, _ = cached_windows(calib(text), model, 32)
    assert windows.shape == (6, 32) and cache.read_text().startswith("a file")
    assert sorted(p.name for p in cache.parent.iterdir()) == ["calibration"]  # no temporary left


def test_a_run_from_cached_windows_writes_the_same_bytes(cache, model, text, tmp_path, monkeypatch):
    cfg, c = PruneConfig(method="wanda", sparsity=Sparsity(0.5)), calib(text)
    prune_checkpoint(model, cfg, tmp_path / "miss", calib=c, progress=False)
    monkeypatch.setattr(calib_cache, "load_tokenizer", no_tokenizer)
    prune_checkpoint(model, cfg, tmp_path / "hit", calib=c, progress=False)
    shards = sorted(p.name for p in (tmp_path / "miss").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "hit").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "miss" / name).read_bytes() == (tmp_path / "hit" / name).read_bytes()
