"""The memory a load keeps its pruned and cast weights in (``loading.memory``).

Every tensor must be its own storage, as ``torch.empty``'s are (code that tells tied weights by
their storage must not take neighbours for ties), outlive the arena that carved it, and be laid
out like ``torch.empty``'s; the huge-page advice is given only where ``/proc/buddyinfo`` shows the
free huge pages for it, and then takes effect.
"""

from __future__ import annotations

import gc

import pytest
import torch

from llm_prune.loading import from_pretrained, load, memory
from llm_prune.loading.memory import PageArena, free_huge_bytes

from .helpers import assert_bitwise


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_carved_tensors_are_distinct_storages_that_outlive_the_arena(dtype):
    arena = PageArena(chunk=1 << 20)
    shapes = [(3, 5), (700, 300), (1,), (0, 4), (128, 1024)]  # the second and last overflow the chunk
    ts = [arena.empty(s, dtype) for s in shapes]
    del arena
    gc.collect()
    for i, (t, s) in enumerate(zip(ts, shapes)):
        assert t.shape == s and t.dtype == dtype and t.is_contiguous()
        t.fill_(i + 1)
    ptrs = [t.untyped_storage().data_ptr() for t in ts if t.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(p % memory.PAGE == 0 for p in ptrs)
    for i, t in enumerate(ts):  # no tensor overlaps another
        assert bool((t == i + 1).all())


def test_free_huge_bytes_reads_the_free_blocks_of_a_huge_page_and_more(tmp_path):
    f = tmp_path / "buddyinfo"
    f.write_text("Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n"
                 "Node 0, zone   Normal  12166   6784   3591   1809    885    470    322    113     14    162     75\n")
    order9, page = memory.HUGE // memory.PAGE, memory.PAGE  # pages in a huge page
    assert free_huge_bytes(str(f)) == ((1 + 162) * order9 + (3 + 75) * 2 * order9) * page
    assert free_huge_bytes(str(tmp_path / "absent")) == 0


@pytest.mark.parametrize("free, advised", [(0, False), (2 * memory.CHUNK - 1, False), (2 * memory.CHUNK, True)])
def test_huge_pages_advised_only_when_free(monkeypatch, free, advised):
    calls = []
    monkeypatch.setattr(memory, "free_huge_bytes", lambda: free)
    monkeypatch.setattr(memory, "advise_huge_pages", calls.append)
    PageArena().empty((4, 4), torch.float32)
    assert len(calls) == int(advised)


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def test_advised_chunks_fault_in_huge_pages():
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[never]" in thp or free_huge_bytes() < 4 * memory.CHUNK:
        pytest.skip(f"transparent huge pages off or too few free ({thp.strip()}, {free_huge_bytes() >> 20} MiB free)")
    before = _anon_huge_kib()
    t = PageArena().empty((memory.CHUNK,), torch.uint8)
    t.fill_(1)
    assert _anon_huge_kib() - before >= memory.CHUNK // 2 // 1024  # at least half of it (alignment, races)


def test_a_pruned_load_saves_and_reloads_as_itself(tmp_path, tiny_llama):
    """Weights in the arena (pruned in place of the checkpoint's dtype, or cast) save and reload as they are."""
    from transformers import AutoModelForCausalLM

    for dtype in (torch.bfloat16, torch.float32):  # kept as pruned; cast into the arena
        model = from_pretrained(tiny_llama, sparsity=0.5, scope="global", dtype=dtype, progress=False)
        model.save_pretrained(tmp_path / f"saved-{dtype}")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / f"saved-{dtype}", dtype=dtype)
        assert_bitwise(model, again)
        plain = load(tmp_path / f"saved-{dtype}", dtype=torch.float32)
        assert_bitwise(plain, again.to(torch.float32))
