"""Prototype, not llm-prune's code: OMP 0.5 (layer scope) of a checkpoint with each output shard
staged whole in one reused page-aligned buffer, hashed from it (BLAKE3), and written with O_DIRECT:
no copy into the page cache. Measures what an O_DIRECT shard writer would save.

    python direct_export.py CKPT OUT [--buffered] [--overlap]

--buffered writes the same staged bytes with a plain pwrite instead (the page-cache path);
--overlap stages into two buffers in turn and writes one from a thread while the next is pruned."""
import json, math, mmap, os, struct, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

from llm_prune.arch import arch_for
from llm_prune.config import Sparsity
from llm_prune.methods.omp import plan
from llm_prune.reader import CheckpointReader, safetensors_dtype_name

ALIGN = 4096


def layout(specs):
    header, spans, end = {"__metadata__": {"format": "pt"}}, {}, 0
    for name, (dtype, shape) in sorted(specs.items(), key=lambda kv: (-kv[1][0].itemsize, kv[0])):
        n = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": safetensors_dtype_name(dtype), "shape": list(shape), "data_offsets": [end, end + n]}
        spans[name] = (end, n)
        end += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans, 8 + len(raw) + end


def write(out, file, stage_map, size, buffered):
    body = size // ALIGN * ALIGN
    fd = os.open(out / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if buffered else os.O_DIRECT), 0o644)
    try:
        view, pos = memoryview(stage_map)[:body], 0
        while pos < body:
            pos += os.pwrite(fd, view[pos:], pos)
    finally:
        os.close(fd)
    if size > body:  # the unaligned tail through the page cache
        fd = os.open(out / file, os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(stage_map)[body:size], body)
        finally:
            os.close(fd)


def main():
    src, out, buffered, overlap = Path(sys.argv[1]), Path(sys.argv[2]), "--buffered" in sys.argv, "--overlap" in sys.argv
    pool, pending, stages = ThreadPoolExecutor(1), [None, None], [None, None]
    t0 = time.perf_counter()
    reader = CheckpointReader(src)
    arch = arch_for(reader.config)
    out.mkdir(parents=True)
    digests = {}
    for i, unit in enumerate(reader.units(arch)):
        slot = i % 2 if overlap else 0
        if pending[slot] is not None:
            pending[slot].result()
        stage, stage_map = stages[slot] or (None, None)
        specs = {n: (reader.infos[n].dtype, reader.infos[n].shape) for n in unit.names}
        head, spans, size = layout(specs)
        need = -(-size // ALIGN) * ALIGN
        if stage is None or stage.numel() < need:
            stage_map = mmap.mmap(-1, need)  # anonymous: page aligned
            stage = torch.frombuffer(stage_map, dtype=torch.uint8)
            stages[slot] = (stage, stage_map)
        stage[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        data = len(head)
        targets = [n for n in unit.names if n.endswith("_proj.weight")]  # a Llama block's Linear weights
        others = [n for n in unit.names if n not in targets]
        with torch.no_grad():
            for name, t in reader.read_mapped(others):
                at, n = spans[name]
                stage[data + at:data + at + n].copy_(t.reshape(-1).view(torch.uint8))
            for name, t in reader.read_mapped(sorted(targets)):
                at, n = spans[name]
                view = stage[data + at:data + at + n].view(t.dtype)
                p = plan(t, Sparsity(0.5))
                p.apply(t, view)
                del t
        file = f"shard-{i:05d}.safetensors"
        digests[file] = blake3.blake3(memoryview(stage_map)[:size]).hexdigest()
        pending[slot] = pool.submit(write, out, file, stage_map, size, buffered)
        if not overlap:
            pending[slot].result()
    for f in pending:
        if f is not None:
            f.result()
    (out / "digests.json").write_text(json.dumps(digests, indent=1))
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "buffered": buffered, "overlap": overlap}))


if __name__ == "__main__":
    main()
