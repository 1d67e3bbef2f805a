"""Source digests computed from the byte ranges a run reads (``SourceHasher``) are the files' BLAKE3;
digests name their algorithm, and sha256 ones (hub blobs, manifests and memos of older versions) still count."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import blake3
from hypothesis import HealthCheck, given, settings, strategies as st

from llm_prune import fingerprint
from llm_prune.fingerprint import SourceHasher, known_digest
from llm_prune.pipeline import prune_checkpoint
from llm_prune.config import PruneConfig, Sparsity


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))


def _b3(path) -> str:
    return "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), size=st.integers(0, 300_000))
def test_any_reads_in_any_order_give_the_files_digest(tmp_path, data, size):
    # Ranges read in pieces, out of order, overlapping, with holes and a piece never read.
    # A file of its own per example: an example hypothesis abandons half-way must not have its
    # hashing thread read a file the next example rewrites.
    path = tmp_path / f"shard-{os.urandom(6).hex()}.safetensors"
    path.write_bytes(os.urandom(size))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, size), max_size=12)) + [0, size]))
    ranges = list(zip(cuts, cuts[1:]))
    order = data.draw(st.permutations(ranges))
    skipped = data.draw(st.sets(st.integers(0, max(len(order) - 1, 0)), max_size=3))
    again = [data.draw(st.booleans()) for _ in order]
    with SourceHasher(tmp_path, [path.name]) as hasher:
        for i, (a, b) in enumerate(order):
            if i not in skipped:
                hasher.read(path.name, a, b - a)
                if again[i]:  # read again, in part
                    hasher.read(path.name, a, max(0, (b - a) // 2))
        assert hasher.digests() == {path.name: _b3(path)}
    path.unlink()


def test_large_file_read_block_by_block(tmp_path):
    # Past one hashing chunk (64 MiB), read in the interleaved order of a block-by-block run.
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom((64 << 20) * 2 + 12_345))
    size = path.stat().st_size
    step = size // 7
    ranges = [(a, min(a + step, size)) for a in range(0, size, step)]
    hasher = SourceHasher(tmp_path, [path.name], {path.name: 100})
    for a, b in ranges[1::2] + ranges[::2]:
        hasher.read(path.name, a, b - a)
    assert hasher.digests()[path.name] == _b3(path)


def test_digests_are_remembered_and_known_files_are_not_hashed(tmp_path, monkeypatch):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y" * 1000)
    first = SourceHasher(tmp_path, [a.name, b.name]).digests()
    assert first == {a.name: _b3(a), b.name: _b3(b)}
    assert known_digest(a) == _b3(a)  # remembered for later runs

    def never(*_):
        raise AssertionError("a known file was hashed again")

    monkeypatch.setattr(fingerprint._Prefix, "add", never)
    monkeypatch.setattr(fingerprint._Prefix, "finish", never)
    again = SourceHasher(tmp_path, [a.name, b.name])
    again.read(a.name, 0, 1000)
    assert again.digests() == first


def test_an_error_keeps_nothing(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"z" * 5000)
    with pytest.raises(RuntimeError):
        with SourceHasher(tmp_path, [path.name]) as hasher:
            hasher.read(path.name, 0, 2000)
            raise RuntimeError("the run failed")
    assert known_digest(path) is None


def test_export_hashes_the_source_without_a_second_read(tmp_path, tiny_llama, monkeypatch):
    # First contact: nothing known; the export records every source file's sha256 without
    # hashing any file on its own (file_digest / sha256_of), and remembers them.
    def own_read(*_):
        raise AssertionError("the source was hashed by a separate read")

    monkeypatch.setattr(fingerprint, "digest_of", own_read)
    files = sorted(p.name for p in tiny_llama.glob("*.safetensors"))
    assert len(files) > 1 and all(known_digest(tiny_llama / f) is None for f in files)
    for scope, out in (("layer", "o1"), ("global", "o2")):
        report = prune_checkpoint(tiny_llama, PruneConfig(sparsity=Sparsity.parse(0.5), scope=scope), tmp_path / out,
                                  progress=False)
        assert report["source"]["files"] == {f: _b3(tiny_llama / f) for f in files}
        recorded = json.loads((tmp_path / out / "sparsity.json").read_text())["source"]["files"]
        assert recorded == report["source"]["files"]
    assert all(known_digest(tiny_llama / f) == _b3(tiny_llama / f) for f in files)


def test_memo_is_parsed_once_and_again_when_it_changes(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first"), b.write_bytes(b"second")
    fingerprint.file_digest(a)
    parses = []
    real_loads = json.loads
    monkeypatch.setattr(fingerprint.json, "loads", lambda s: parses.append(1) or real_loads(s))
    for _ in range(3):
        assert known_digest(a) == _b3(a)
    assert len(parses) == 1  # one parse, then the in-process copy
    assert known_digest(b) is None
    fingerprint.file_digest(b)  # rewrites the memo (unchanged since its parse: not parsed again)
    assert known_digest(b) == _b3(b) and known_digest(a) == _b3(a)
    assert len(parses) == 2  # the rewritten file, once
    memo = tmp_path / "cache" / "hashes.json"  # another process adds an entry
    memo.write_text(json.dumps({**real_loads(memo.read_text()), "x|1|2": "0" * 64}))
    assert fingerprint._load(memo)["x|1|2"] == "0" * 64


def test_memo_drops_entries_of_files_gone_or_changed(tmp_path):
    a, b, c = (tmp_path / f"{n}.bin" for n in "abc")
    for f in (a, b, c):
        f.write_bytes(f.name.encode())
    fingerprint.file_digest(a), fingerprint.file_digest(b)
    b.unlink()
    a.write_bytes(b"a, longer now")  # another size: another key
    fingerprint.file_digest(c)
    memo = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    assert [k.rpartition("|")[0].rpartition("|")[0] for k in memo] == [os.path.realpath(c)]


def test_sha256_digests_still_count(tmp_path):
    # A hub blob's name is its sha256; a memo entry written before BLAKE3 is a bare sha256.
    data = b"weights" * 100
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "hub" / "blobs" / sha
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = tmp_path / "hub" / "model.safetensors"
    link.symlink_to(blob)
    assert known_digest(link) == f"sha256:{sha}"
    old = tmp_path / "old.safetensors"
    old.write_bytes(data)
    fingerprint._remember({fingerprint._memo_key(old)[1]: sha})
    assert known_digest(old) == f"sha256:{sha}" == fingerprint.file_digest(old)
    for digest in (sha, f"sha256:{sha}"):
        assert fingerprint.matches(old, digest) and fingerprint.matches(link, digest)
    assert fingerprint.matches(old, _b3(old), threads=-1)
    assert not fingerprint.matches(old, "blake3:" + "0" * 64)
    with pytest.raises(ValueError, match="unknown digest algorithm 'md5'"):
        fingerprint.matches(old, "md5:" + "0" * 32)


def test_fingerprints_of_sha256_digests_are_those_made_before_blake3():
    # Caches keyed by a checkpoint's fingerprint (dense evaluations that took hours) still hit.
    old = hashlib.sha256("a.safetensors {}\nb.safetensors {}".format("1" * 64, "2" * 64).encode()).hexdigest()
    assert fingerprint.checkpoint_fingerprint({"b.safetensors": "sha256:" + "2" * 64,
                                               "a.safetensors": "sha256:" + "1" * 64}) == old
    assert fingerprint.checkpoint_fingerprint({"a.safetensors": "blake3:" + "1" * 64,
                                               "b.safetensors": "sha256:" + "2" * 64}) != old


def _local_dir_record(local_dir, repo_path, etag, stamp):
    record = local_dir / ".cache" / "huggingface" / "download" / (repo_path + ".metadata")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{'c' * 40}\n{etag}\n{stamp}\n")
    return record


def test_a_hub_local_dir_download_records_the_sha256(tmp_path):
    # `hf download --local-dir` leaves (commit, etag, timestamp) per file; an LFS file's etag is
    # its sha256, trusted while the file is no newer than the record (huggingface_hub's rule).
    root = tmp_path / "vicuna"
    (root / "sub").mkdir(parents=True)
    top, nested = root / "model.safetensors", root / "sub" / "model.safetensors"
    for f in (top, nested):
        f.write_bytes(os.urandom(5000))
    sha = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in (top, nested)}
    stamp = top.stat().st_mtime + 0.5
    record = _local_dir_record(root, "model.safetensors", sha[top], stamp)
    _local_dir_record(root, "sub/model.safetensors", sha[nested], stamp)
    before = record.read_text()
    assert known_digest(top) == f"sha256:{sha[top]}" and known_digest(nested) == f"sha256:{sha[nested]}"
    assert fingerprint.matches(top, known_digest(top))
    assert record.read_text() == before and not list(record.parent.glob("*.lock"))  # nothing written
    # A file changed after its download is hashed again; so is one whose etag is a git blob id.
    os.utime(top, (stamp + 5, stamp + 5))
    assert known_digest(top) is None
    _local_dir_record(root, "sub/model.safetensors", "b" * 40, stamp)
    assert known_digest(nested) is None
    _local_dir_record(root, "sub/model.safetensors", "not a record", "never")
    assert known_digest(nested) is None


def test_export_from_a_local_dir_download_hashes_nothing(tmp_path, tiny_llama, monkeypatch):
    import shutil

    from huggingface_hub._local_folder import write_download_metadata

    src = tmp_path / "downloaded"
    shutil.copytree(tiny_llama, src)
    files = sorted(p.name for p in src.glob("*.safetensors"))
    for f in files:  # the record as huggingface_hub itself writes it after a download
        write_download_metadata(src, f, "c" * 40, hashlib.sha256((src / f).read_bytes()).hexdigest())

    hash_file = fingerprint._Prefix.__init__

    def outputs_only(self, path, *args):
        assert src not in Path(path).parents, f"{path} has a download record, yet was hashed"
        hash_file(self, path, *args)

    monkeypatch.setattr(fingerprint._Prefix, "__init__", outputs_only)
    report = prune_checkpoint(src, PruneConfig(sparsity=Sparsity.parse(0.5)), tmp_path / "out", progress=False)
    assert report["source"]["files"] == {f: "sha256:" + hashlib.sha256((src / f).read_bytes()).hexdigest()
                                         for f in files}
