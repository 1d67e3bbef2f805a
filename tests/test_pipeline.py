"""The streaming pipeline against the simple in-memory way, and the exported checkpoint in transformers."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune.writer import ShardWriter
from tests.test_masks import reference_keep


def inmemory_prune(path, cfg: PruneConfig, block_attr: str):
    """The simple way: from_pretrained, then prune every block Linear with a stable argsort."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    blocks = model.get_submodule(block_attr)
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        if cfg.scope == "global":
            # Visiting order of the pipeline: blocks in order, tensor names sorted within a block.
            named = sorted(((i, n + ".weight", m) for i, b in enumerate(blocks) for n, m in b.named_modules()
                            if isinstance(m, torch.nn.Linear)), key=lambda t: (t[0], t[1]))
            flat = torch.cat([m.weight.flatten() for _, _, m in named])
            keep = reference_keep(flat, int(round(cfg.sparsity.ratio * flat.numel())))
            start = 0
            for _, _, m in named:
                m.weight.mul_(keep[start:start + m.weight.numel()].view_as(m.weight))
                start += m.weight.numel()
        else:
            for m in linears:
                w = m.weight
                if cfg.sparsity.is_nm:
                    g = w.float().abs().view(w.shape[0], -1, cfg.sparsity.m)
                    top = torch.argsort(-g, dim=-1, stable=True)[..., :cfg.sparsity.n]
                    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).view_as(w)
                else:
                    keep = reference_keep(w, int(round(cfg.sparsity.ratio * w.numel())))
                w.mul_(keep)
    return model


CASES = [
    PruneConfig(sparsity=Sparsity(0.4)),
    PruneConfig(sparsity=Sparsity(0.5), scope="global"),
    PruneConfig(sparsity=Sparsity.parse(None, "2:4")),
]


@pytest.mark.parametrize("cfg", CASES, ids=["layer-0.4", "global-0.5", "2:4"])
def test_streaming_equals_inmemory_and_loads(tiny_llama, tmp_path, cfg):
    out = tmp_path / "out"
    report = prune_checkpoint(tiny_llama, cfg, out, progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    reference = inmemory_prune(tiny_llama, cfg, "model.layers")
    ref_state = reference.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    assert report["achieved"]["targeted"] == pytest.approx(cfg.sparsity.ratio, abs=1e-3)
    saved = json.loads((out / "sparsity.json").read_text())
    assert saved["method"] == "omp" and saved["scope"] == cfg.scope
    assert set(saved["source"]["files"]) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert all(re.fullmatch(r"blake3:[0-9a-f]{64}", h) for h in saved["source"]["files"].values())
    assert not list(tmp_path.glob(".*partial"))
    # Untargeted tensors (embeddings, norms, head) pass through bit for bit.
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).state_dict()
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight"]:
        assert torch.equal(exported.state_dict()[name], dense[name])


def test_opt_layout(tiny_opt, tmp_path):
    report = prune_checkpoint(tiny_opt, PruneConfig(sparsity=Sparsity(0.5)), tmp_path / "o", progress=False)
    assert set(report["achieved"]["by_type"]) == {"fc1", "fc2", "self_attn.k_proj", "self_attn.out_proj",
                                                  "self_attn.q_proj", "self_attn.v_proj"}
    assert all(v["sparsity"] == 0.5 for v in report["achieved"]["by_type"].values())
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # loads unchanged


def test_targets_and_exclude(tiny_llama, tmp_path):
    cfg = PruneConfig(sparsity=Sparsity(0.5), targets=("mlp.*",), exclude=("*down_proj*",))
    report = prune_checkpoint(tiny_llama, cfg, tmp_path / "o", progress=False)
    assert set(report["achieved"]["by_type"]) == {"mlp.gate_proj", "mlp.up_proj"}


@pytest.mark.parametrize("cfg", CASES + [PruneConfig(sparsity=Sparsity.parse(None, "4:8"))],
                         ids=["layer-0.4", "global-0.5", "2:4", "4:8"])
def test_pieces_equal_whole_tensors(tiny_llama, tmp_path, cfg, monkeypatch):
    # Where the file system takes O_DIRECT the exporter prunes whole tensors into a staged shard
    # (``writer.Stage``); elsewhere piece by piece through a small buffer. 40-byte pieces (20
    # weights: not a multiple of 8, so N:M pieces round down to whole groups) cut every tensor
    # into hundreds, with ties and tie quotas straddling them. Same bytes and digests either way.
    # Staged shards are handed to the writing threads a page at a time as tensors are done.
    import llm_prune.pipeline as P

    import llm_prune.writer as W

    monkeypatch.setattr(P, "DIRECT_MIN_BYTES", 0)  # staged even though the model is tiny
    monkeypatch.setattr(W.StagedShard, "PIECE", 4096)
    staged, finish = [], W.StagedShard.finish
    monkeypatch.setattr(W.StagedShard, "finish", lambda self: staged.append(self.path) or finish(self))
    prune_checkpoint(tiny_llama, cfg, tmp_path / "whole", progress=False)
    assert bool(staged) == W.Stage(tmp_path).direct  # every block staged where O_DIRECT works
    monkeypatch.setattr(P, "PIECE_BYTES", 40)
    monkeypatch.setattr(P, "DIRECT_IO", False)
    prune_checkpoint(tiny_llama, cfg, tmp_path / "pieces", progress=False)
    files = sorted(f.name for f in (tmp_path / "whole").glob("*.safetensors"))
    assert files and all((tmp_path / "whole" / f).read_bytes() == (tmp_path / "pieces" / f).read_bytes() for f in files)
    manifests = [json.loads((tmp_path / d / "sparsity.json").read_text())["output"] for d in ("whole", "pieces")]
    assert manifests[0] == manifests[1]


def interrupted_after_two_units(src, cfg, out, monkeypatch) -> None:
    """An export of ``src`` into ``out`` killed after committing two units (Ctrl-C)."""
    real_commit, calls = ShardWriter.commit, []

    def commit_then_die(self, *a, **kw):  # every shard, however written, is committed
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_commit(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(src, cfg, out, progress=False)
    monkeypatch.setattr(ShardWriter, "commit", real_commit)


def test_resume_after_interruption(tiny_llama, tmp_path, monkeypatch):
    cfg = PruneConfig(sparsity=Sparsity(0.5), scope="global")
    prune_checkpoint(tiny_llama, cfg, tmp_path / "full", progress=False)
    interrupted_after_two_units(tiny_llama, cfg, tmp_path / "out", monkeypatch)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.partial" / "progress.jsonl").is_file()

    report = prune_checkpoint(tiny_llama, cfg, tmp_path / "out", resume=True, progress=False)
    assert report["run"]["resumed_units"] == 2
    full = json.loads((tmp_path / "full" / "sparsity.json").read_text())
    assert report["achieved"]["tensors"] == full["achieved"]["tensors"]
    for f in sorted((tmp_path / "full").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name


@pytest.mark.parametrize("fmt", ["dense", "bitmask", "packed24"])
def test_same_input_same_bytes(tiny_llama, tmp_path, fmt):
    import subprocess
    import sys

    # Separate processes: hash-map ordering (e.g. of safetensors metadata) changes between them.
    code = ("import sys; from llm_prune import *; prune_checkpoint(sys.argv[1], PruneConfig(sparsity="
            "Sparsity.parse(None, '2:4')), sys.argv[2], fmt=sys.argv[3], progress=False)")
    for name in ["a", "b"]:
        subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(tmp_path / name), fmt], check=True)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_repeat_exports_take_thresholds_from_cached_tables(tiny_llama, tmp_path, monkeypatch, scope):
    # First contact: the thresholds come from the tensors as the run reads them, and the key
    # tables made on the way are cached under the hashes the run computed. Every later export, at
    # any sparsity, reads its thresholds off them: each target read once, to prune it, and still
    # the reference's bytes.
    from llm_prune import magnitude
    from llm_prune.loading import keytables
    from llm_prune.methods import omp

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    tables = tmp_path / "cache" / "keytables"
    prune_checkpoint(tiny_llama, PruneConfig(sparsity=Sparsity(0.3), scope=scope), tmp_path / "first", progress=False)
    assert len(list(tables.glob("*.safetensors"))) == 1

    def no_pass(*a, **k):
        raise AssertionError("the cached tables should have given the thresholds")

    for module in (magnitude, keytables, omp):
        monkeypatch.setattr(module, "key_table", no_pass)
    for ratio in (0.6, 0.3):
        cfg = PruneConfig(sparsity=Sparsity(ratio), scope=scope)
        out = tmp_path / f"again-{ratio}"
        prune_checkpoint(tiny_llama, cfg, out, progress=False)
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
        reference = inmemory_prune(tiny_llama, cfg, "model.layers").state_dict()
        for name, tensor in exported.items():
            assert torch.equal(tensor, reference[name]), name
    # Byte for byte the first contact's shards at the same setting.
    for shard in sorted((tmp_path / "first").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "again-0.3" / shard.name).read_bytes()
    # A load then finds the exporter's tables too.
    from llm_prune.loading import from_pretrained

    from_pretrained(tiny_llama, sparsity=0.5, scope=scope, progress=False)


def test_first_contact_makes_layer_tables_one_block_ahead(tiny_llama, tmp_path, monkeypatch):
    # Layer scope, nothing cached: a thread makes each target's table, in pieces, a block ahead
    # of the pruning (never further: the source pages it reads must still be in the page cache
    # when the pruning reads them), and the pruning takes every threshold from them.
    import threading

    from llm_prune.run_tables import RunTables

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    events, lock = [], threading.Lock()
    make, ask = RunTables._make_from_source, RunTables.layer_threshold_of

    def logged(kind, f):
        def call(self, name, *a):
            with lock:
                events.append((kind, int(name.split(".")[2]), threading.current_thread().name))
            return f(self, name, *a)
        return call

    monkeypatch.setattr(RunTables, "_make_from_source", logged("make", make))
    monkeypatch.setattr(RunTables, "layer_threshold_of", logged("ask", ask))
    prune_checkpoint(tiny_llama, PruneConfig(sparsity=Sparsity(0.5)), tmp_path / "out", progress=False)
    made = [block for kind, block, thread in events if kind == "make"]
    assert made == sorted(made) and len(set(made)) == 3 and len(made) == 3 * 7
    assert {thread for kind, _, thread in events if kind == "make"} == {"llm-prune-tables_0"}
    for i, (kind, block, _) in enumerate(events):
        if kind == "make" and block >= 2:  # block b starts once the pruning asked about block b - 1
            assert ("ask", block - 1) in [(k, b) for k, b, _ in events[:i]]
    assert len(list((tmp_path / "cache" / "keytables").glob("*.safetensors"))) == 1
    reference = inmemory_prune(tiny_llama, PruneConfig(sparsity=Sparsity(0.5)), "model.layers").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict().items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("piece", [1, 4096, 5000, 1 << 20])
def test_mapped_pieces_give_the_tensor_in_order(tiny_llama, piece):
    from llm_prune.reader import CheckpointReader

    # Pieces start where the tensor does (not on a page); the pages of a piece left behind are
    # dropped from the mapping, and a piece still held reads them again from the file.
    reader = CheckpointReader(tiny_llama)
    counts = []
    for name in reader.infos:
        _, whole = next(reader.read_mapped([name]))
        pieces = list(reader.read_mapped_pieces(name, piece))
        counts.append(len(pieces))
        assert all(p.dim() == 1 and p.dtype == whole.dtype for p in pieces)
        assert all(p.numel() * p.element_size() <= max(4096, piece // 4096 * 4096) for p in pieces)
        assert torch.equal(torch.cat(pieces), whole.reshape(-1))
    assert max(counts) > 1 if piece <= 5000 else max(counts) == 1


def test_a_resumed_export_caches_no_partial_tables(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    cfg = PruneConfig(sparsity=Sparsity(0.5))
    interrupted_after_two_units(tiny_llama, cfg, tmp_path / "out", monkeypatch)
    prune_checkpoint(tiny_llama, cfg, tmp_path / "out", resume=True, progress=False)
    assert not (tmp_path / "cache" / "keytables").exists()  # the resumed run saw only some targets
    prune_checkpoint(tiny_llama, PruneConfig(sparsity=Sparsity(0.6)), tmp_path / "next", progress=False)
    assert len(list((tmp_path / "cache" / "keytables").glob("*.safetensors"))) == 1


def test_an_unwritable_table_cache_costs_the_export_nothing(tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "keytables").write_text("a file where the tables' folder would be")
    report = prune_checkpoint(tiny_llama, PruneConfig(sparsity=Sparsity(0.5)), tmp_path / "out", progress=False)
    assert report["achieved"]["targeted"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "out" / "sparsity.json").is_file()
    assert "could not cache the key tables" in caplog.text


def test_fp32_layer_exports_cache_no_tables(tmp_path, monkeypatch):
    # fp32 in layer scope: the plan looks at each tensor twice (the bin, then its low bits), so a
    # table alone would not give the threshold; nothing is cached.
    from tests.conftest import save_tiny, tiny_llama_config

    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))
    src = save_tiny(tmp_path / "f32", tiny_llama_config(), dtype=torch.float32)
    prune_checkpoint(src, PruneConfig(sparsity=Sparsity(0.5)), tmp_path / "o", progress=False)
    assert not (tmp_path / "cache" / "keytables").exists()


def test_fp32_checkpoint_global(tmp_path):
    from tests.conftest import save_tiny, tiny_llama_config

    src = save_tiny(tmp_path / "f32", tiny_llama_config(), dtype=torch.float32)
    cfg = PruneConfig(sparsity=Sparsity(0.6), scope="global")
    prune_checkpoint(src, cfg, tmp_path / "o", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32).state_dict()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    names = sorted((i, n) for i, b in enumerate(model.model.layers) for n, m in b.named_modules()
                   if isinstance(m, torch.nn.Linear))
    flat = torch.cat([exported[f"model.layers.{i}.{n}.weight"].flatten() for i, n in names])
    dense = torch.cat([model.get_submodule(f"model.layers.{i}.{n}").weight.detach().flatten() for i, n in names])
    keep = reference_keep(dense, int(round(0.6 * dense.numel())))
    assert torch.equal(flat, dense * keep)


def _family_configs():
    from transformers import MistralConfig, Qwen2Config
    from tests.conftest import tiny_llama_config, tiny_opt_config

    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {"mistral": MistralConfig(**small), "qwen2": Qwen2Config(**small),
            "llama-tied": tiny_llama_config(tie_word_embeddings=True), "opt": tiny_opt_config()}


@pytest.mark.parametrize("family", ["mistral", "qwen2", "llama-tied", "opt"])
@pytest.mark.parametrize("cfg", [PruneConfig(sparsity=Sparsity(0.5)), PruneConfig(sparsity=Sparsity.parse(None, "2:4"))],
                         ids=["0.5", "2:4"])
def test_families_equal_inmemory(tmp_path, family, cfg):
    from llm_prune.arch import ARCHS
    from tests.conftest import save_tiny

    config = _family_configs()[family]
    src = save_tiny(tmp_path / family, config)
    prune_checkpoint(src, cfg, tmp_path / "o", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.bfloat16)
    reference = inmemory_prune(src, cfg, ARCHS[config.model_type].blocks_attr)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference(ids).logits)
    ref_state = reference.state_dict()
    assert all(torch.equal(t, ref_state[n]) for n, t in exported.state_dict().items())


def test_gpt2_conv1d_nm_along_input_dim(tmp_path):
    from transformers import GPT2Config
    from transformers.pytorch_utils import Conv1D

    from llm_prune.magnitude import is_nm
    from tests.conftest import save_tiny

    src = save_tiny(tmp_path / "gpt2", GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    report = prune_checkpoint(src, PruneConfig(sparsity=Sparsity.parse(None, "2:4")), tmp_path / "o", progress=False)
    assert set(report["achieved"]["by_type"]) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    convs = [m for m in model.transformer.h.modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8
    # Conv1D stores [in, out]: every output's inputs form groups of 4 with at most 2 kept.
    assert all(is_nm(m.weight.t() != 0, 2, 4) for m in convs)
    assert not all(is_nm(m.weight != 0, 2, 4) for m in convs)
