"""The shard writer: its files are ordinary safetensors, whatever mix of memory and file ranges fed it."""

import errno
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm_prune import writer as writer_module
from llm_prune.errors import UserError
from llm_prune.reader import FileBytes
from llm_prune.writer import save_safetensors

from .helpers import assert_same_tensors as _equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
          torch.uint8, torch.bool, torch.float64]


def _sample():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        x = torch.randn(3, 5 + i, generator=g) * 100
        out[f"t.{i}"] = x > 0 if dt == torch.bool else x.to(dt)
    out["empty"] = torch.empty(0, 4)
    out["scalar"] = torch.tensor(2.5)
    return out


def test_round_trip_through_the_library(tmp_path):
    tensors = _sample()
    save_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt", "b": "2", "a": "1"})
    _equal(load_file(tmp_path / "a.safetensors"), tensors)
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "a": "1", "b": "2"}


def test_header_is_aligned_sorted_and_deterministic(tmp_path):
    tensors = _sample()
    save_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt", "z": "1", "a": "2"})
    save_safetensors(tmp_path / "b.safetensors", dict(reversed(list(tensors.items()))), {"a": "2", "z": "1", "format": "pt"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert list(header["__metadata__"]) == ["a", "format", "z"]
    for name, spec in header.items():
        if name != "__metadata__":  # every tensor starts at a multiple of its element size
            assert spec["data_offsets"][0] % tensors[name].element_size() == 0, name


def test_file_ranges_are_copied_and_mixed_with_memory(tmp_path):
    src = _sample()
    save_file(src, str(tmp_path / "src.safetensors"), metadata={"format": "pt"})
    reader_offsets = {}
    with open(tmp_path / "src.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    for name, spec in header.items():
        if name != "__metadata__":
            reader_offsets[name] = 8 + n + spec["data_offsets"][0]
    mixed = {k: (FileBytes(tmp_path / "src.safetensors", reader_offsets[k], v.numel() * v.element_size(), v.dtype,
                           tuple(v.shape)) if i % 2 else v) for i, (k, v) in enumerate(src.items())}
    save_safetensors(tmp_path / "out.safetensors", mixed, {"format": "pt"})
    _equal(load_file(tmp_path / "out.safetensors"), src)


def test_copy_falls_back_to_read_and_write(tmp_path, monkeypatch):
    src = {"w": torch.arange(1 << 16, dtype=torch.float32)}
    save_file(src, str(tmp_path / "src.safetensors"))
    with open(tmp_path / "src.safetensors", "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]

    def cross_device(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writer_module.os, "copy_file_range", cross_device)
    save_safetensors(tmp_path / "out.safetensors", {"w": FileBytes(tmp_path / "src.safetensors", start, 1 << 18,
                                                                   torch.float32, (1 << 16,))}, {})
    _equal(load_file(tmp_path / "out.safetensors"), src)


def test_truncated_source_is_a_user_error(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="truncated"):
        save_safetensors(tmp_path / "out.safetensors", {"w": FileBytes(tmp_path / "short.bin", 0, 400, torch.float32,
                                                                       (100,))}, {})


def test_without_kernel_copy_and_allocation(tmp_path, monkeypatch):
    # Platforms without copy_file_range / posix_fallocate (macOS) or pwrite (Windows) take the plain paths.
    src = _sample()
    save_file(src, str(tmp_path / "src.safetensors"))
    with open(tmp_path / "src.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    ranges = {k: FileBytes(tmp_path / "src.safetensors", 8 + n + v["data_offsets"][0],
                           v["data_offsets"][1] - v["data_offsets"][0], src[k].dtype, tuple(src[k].shape))
              for k, v in header.items() if k != "__metadata__"}
    monkeypatch.delattr(writer_module.os, "copy_file_range")
    monkeypatch.delattr(writer_module.os, "posix_fallocate")
    monkeypatch.delattr(writer_module.os, "pwrite")
    save_safetensors(tmp_path / "out.safetensors", ranges, {"format": "pt"})
    _equal(load_file(tmp_path / "out.safetensors"), src)


def test_progress_log_survives_a_torn_line(tmp_path):
    # A kill mid-append leaves a partial last line: resume keeps the whole lines before it,
    # drops the torn one (that unit is redone) and appends after the good prefix.
    from llm_prune.reader import Unit
    from llm_prune.writer import ShardWriter

    key = {"config": 1}
    w = ShardWriter(tmp_path / "o", key)
    for i in range(2):
        w.commit(Unit(f"block.{i}", i, ["t"]), _touch(w, f"s{i}"), ["t"], {"stats": {"t": [4, i]}}, {"ties_left": i})
    log = w.tmp / ShardWriter.PROGRESS
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"unit": "block.2", "fi')
    r = ShardWriter(tmp_path / "o", key, resume=True)
    assert sorted(r.records()) == ["block.0", "block.1"] and r.state == {"ties_left": 1} and r.resumed == 2
    assert r.records()["block.1"]["stats"] == {"t": [4, 1]}
    assert log.read_bytes() == whole
    r.commit(Unit("block.2", 2, ["t"]), _touch(r, "s2"), ["t"], {"stats": {}})
    again = ShardWriter(tmp_path / "o", key, resume=True)
    assert sorted(again.records()) == ["block.0", "block.1", "block.2"] and again.state == {"ties_left": 1}
    with pytest.raises(UserError, match="other settings"):
        ShardWriter(tmp_path / "o", {"config": 2}, resume=True)


def _touch(writer, name: str) -> str:
    (writer.tmp / f"{name}.tmp").write_bytes(b"x")
    return name


def test_files_written_through_a_rename_get_the_permissions_open_gives(tmp_path):
    # mkstemp makes owner-only files and a rename keeps that: an index or sparsity.json nobody else
    # could read would make a shared checkpoint unusable.
    import os

    from llm_prune.paths import atomic_write_text

    atomic_write_text(tmp_path / "renamed.json", "{}")
    (tmp_path / "opened.json").write_text("{}")
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "renamed.json") == mode(tmp_path / "opened.json")


def _direct_or_skip(directory):
    stage = writer_module.Stage(directory)
    if not stage.direct:
        pytest.skip(f"{directory}'s file system refuses O_DIRECT")
    return stage


@pytest.mark.parametrize("piece", [None, 4096])  # handed on at the end only, or as each tensor is done
@pytest.mark.parametrize("scale", [1, 700])  # under one page, and many pages with an unaligned tail
def test_a_staged_shard_is_the_shard_file_byte_for_byte(tmp_path, monkeypatch, scale, piece):
    from llm_prune.fingerprint import digest_of

    if piece is not None:
        monkeypatch.setattr(writer_module.StagedShard, "PIECE", piece)

    tensors = {**_sample(), "big": torch.randn(scale, 11)}
    save_file(tensors, str(tmp_path / "src.safetensors"), metadata={"format": "pt"})
    with safe_open(tmp_path / "src.safetensors", "pt") as f:
        header_len = struct.unpack("<Q", (tmp_path / "src.safetensors").read_bytes()[:8])[0]
        offsets = {n: json.loads((tmp_path / "src.safetensors").read_bytes()[8:8 + header_len])[n]["data_offsets"][0]
                   for n in f.keys()}
    from_file = {n: FileBytes(tmp_path / "src.safetensors", 8 + header_len + offsets[n],
                              t.numel() * t.element_size(), t.dtype, tuple(t.shape))
                 for n, t in tensors.items() if n.startswith("t.")}
    in_memory = {n: t for n, t in tensors.items() if not n.startswith("t.")}
    save_safetensors(tmp_path / "a.safetensors", {**from_file, **in_memory}, {"format": "pt"})
    stage = _direct_or_skip(tmp_path)
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    shard = writer_module.StagedShard(tmp_path / "b.safetensors", specs, {"format": "pt"}, stage)
    for n, src in from_file.items():
        shard.copy_from(n, src)
    for n, t in reversed(in_memory.items()):  # done out of file order: handed on once what precedes is
        shard.tensor(n).copy_(t)
        shard.done(n)
    digest = shard.finish()
    stage.close()
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert digest == digest_of(tmp_path / "a.safetensors")


def test_a_file_system_that_refuses_direct_io_gets_no_stage(tmp_path, monkeypatch):
    real = writer_module.os.open

    def refusing(path, flags, *a):
        if flags & getattr(writer_module.os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)

    monkeypatch.setattr(writer_module.os, "open", refusing)
    assert not writer_module.Stage(tmp_path).direct
    assert not list(tmp_path.iterdir())  # no probe left behind


def _staged_export(tmp_path):
    """A ShardWriter and a staged shard of two tensors, for the failure tests below."""
    stage = _direct_or_skip(tmp_path)
    w = writer_module.ShardWriter(tmp_path / "out", {"k": 1})
    specs = {"a": (torch.float16, (3, 1000)), "b": (torch.float32, (7,))}
    return w, stage, specs


def test_a_full_disk_while_staging_is_one_line_and_leaves_no_shard(tmp_path, monkeypatch):
    w, stage, specs = _staged_export(tmp_path)

    def full(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_allocate", full)
    with pytest.raises(UserError, match="no space left"):
        with w.staged("s.safetensors", specs, stage) as shard:
            shard.tensor("a").fill_(1)
    assert not list(w.tmp.glob("s.safetensors*"))
    stage.close()


def test_a_failure_while_staging_waits_for_the_writes_in_flight(tmp_path, monkeypatch):
    # The block's first tensor is being written by the stage's thread when the second one fails:
    # the shard is given up only once that write has let go of the file and the stage.
    import threading

    w, stage, specs = _staged_export(tmp_path)
    monkeypatch.setattr(writer_module.StagedShard, "PIECE", 4096)
    started, release, real = threading.Event(), threading.Event(), writer_module._pwrite_all

    def slow(fd, data, at):
        started.set()
        release.wait(5)
        return real(fd, data, at)

    monkeypatch.setattr(writer_module, "_pwrite_all", slow)
    with pytest.raises(RuntimeError, match="damaged"):
        with w.staged("s.safetensors", specs, stage) as shard:
            for name in ("b", "a"):  # in file order (b, the wider dtype, comes first)
                shard.tensor(name).fill_(1)
                shard.done(name)
            assert started.wait(5)
            threading.Timer(0.2, release.set).start()
            raise RuntimeError("the next tensor is damaged")
    assert release.is_set()  # abort waited for the write
    assert not list(w.tmp.glob("s.safetensors*"))
    stage.close()


@pytest.mark.parametrize("piece", [None, 4096])
def test_direct_writes_refused_after_open_go_through_the_page_cache(tmp_path, monkeypatch, piece):
    if piece is not None:
        monkeypatch.setattr(writer_module.StagedShard, "PIECE", piece)
    w, stage, specs = _staged_export(tmp_path)
    real = writer_module._pwrite_all
    direct = getattr(writer_module.os, "O_DIRECT", 0)

    def picky(fd, data, at):
        if fcntl_flags(fd) & direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    monkeypatch.setattr(writer_module, "_pwrite_all", picky)
    with w.staged("s.safetensors", specs, stage) as shard:
        shard.tensor("b").fill_(2.5)
        shard.done("b")
        shard.tensor("a").copy_(torch.arange(3000).reshape(3, 1000).half())
        shard.done("a")
    loaded = load_file(w.tmp / "s.safetensors.tmp")
    assert torch.equal(loaded["a"], torch.arange(3000).reshape(3, 1000).half()) and bool((loaded["b"] == 2.5).all())
    assert w.digests["s.safetensors"] == writer_module.digest_of(w.tmp / "s.safetensors.tmp")
    stage.close()


def fcntl_flags(fd):
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)
