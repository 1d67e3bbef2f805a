"""Memory for the pruned weights a load keeps: large anonymous chunks, in huge pages where the kernel allows.

A pruned or cast weight is written once, into new memory that becomes the model's parameter.
Taken from the general allocator, every 4 KiB page of it costs a page fault on its first write
(hundreds of thousands per 7B block), and the allocator hands the pages back to the kernel when
a model is freed, so every load pays them again. Chunks of 64 MiB advised ``MADV_HUGEPAGE``
fault in 2 MiB pages instead, where transparent huge pages are enabled ("always" or "madvise").

Only where the kernel has that memory free in whole huge pages (``/proc/buddyinfo``): otherwise
the default ``defrag`` setting makes each fault of an advised region compact memory first, which
costs more than the faults it saves (measured in BENCHMARKS.md, issue 19). Without the advice a
chunk is plain fresh memory, no worse than the allocator's.

Each tensor is its own storage (``torch.frombuffer`` over its slice of a chunk), as one from
``torch.empty`` is: code that tells tied weights by their storage never takes neighbours for ties. A chunk is unmapped when the last
tensor carved from it is gone: a model freed as a whole frees it all; one that drops a few of
its weights keeps their chunks. Only for tensors that are kept: a tensor that is cast or moved
and then dropped belongs in the general allocator, which reuses its memory at once.
"""

from __future__ import annotations

import math
import mmap

import torch

CHUNK = 64 << 20
HUGE = 2 << 20
PAGE = mmap.PAGESIZE


class PageArena:
    """``empty(shape, dtype)``: an uninitialised tensor carved from the current chunk."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._map: mmap.mmap | None = None
        self._at = self._size = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        span = -(-nbytes // PAGE) * PAGE
        if self._map is None or self._at + span > self._size:
            self._new_chunk(max(self.chunk, -(-span // HUGE) * HUGE))
        t = torch.frombuffer(self._map, dtype=torch.uint8, offset=self._at, count=nbytes)
        self._at += span
        return t.view(dtype).view(shape)

    def _new_chunk(self, size: int) -> None:
        # The previous chunk lives on in the tensors carved from it; its untouched tail costs
        # address space only.
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if free_huge_bytes() >= 2 * size:  # a margin for everyone else's needs
            advise_huge_pages(self._map)
        self._at, self._size = 0, size


def advise_huge_pages(m: mmap.mmap) -> None:
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: plain pages
            pass


def free_huge_bytes(buddyinfo: str = "/proc/buddyinfo") -> int:
    """Free memory in blocks of at least a huge page (0 where the kernel does not say)."""
    order = (HUGE // PAGE).bit_length() - 1
    try:
        with open(buddyinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    blocks = 0
    for line in lines:  # "Node 0, zone   Normal  <free blocks of order 0> <order 1> ..."
        counts = line.split()[4:]
        blocks += sum(int(c) << o for o, c in enumerate(counts) if o >= order and c.isdigit())
    return blocks * PAGE
