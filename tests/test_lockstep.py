"""--true-sequential in one forward per block (llm_prune.lockstep): the bytes of solving group by
group, one forward per sample and block, the fallback where memory is short, resume, and the
scheduler's refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import llm_prune.sequential as sequential
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.errors import UserError
from llm_prune.lockstep import Lockstep, held_bytes
from llm_prune.methods.wanda import InputNorms

from .conftest import save_tiny, tiny_opt_config
from .helpers import add_tokenizer, digest, interrupted_after_writes
from .test_sequential import calib_for, run

CASES = [("sparsegpt", Sparsity(0.5), "float32"), ("sparsegpt", Sparsity(0.5, 2, 4), "bf16-mixed"),
         ("wanda", Sparsity(0.6), "bf16-mixed"), ("ria", Sparsity(0.5, 2, 4), "float32")]


class _Counted:
    """Counts the calls of the decoder block's forward and of the two ways of solving."""

    def __init__(self, monkeypatch):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        self.forwards, self.lockstep_runs, self.observes = 0, 0, 0
        real_forward, real_run, real_observe = LlamaDecoderLayer.forward, Lockstep.run, sequential.observe

        def forward(block, *a, **kw):
            self.forwards += 1
            return real_forward(block, *a, **kw)

        def lockstep_run(ls, *a, **kw):
            self.lockstep_runs += 1
            return real_run(ls, *a, **kw)

        def observe(*a, **kw):
            self.observes += 1
            return real_observe(*a, **kw)

        monkeypatch.setattr(LlamaDecoderLayer, "forward", forward)
        monkeypatch.setattr(Lockstep, "run", lockstep_run)
        monkeypatch.setattr(sequential, "observe", observe)


@pytest.mark.parametrize("method,sparsity,act_dtype", CASES, ids=[f"{m}-{s}-{d}" for m, s, d in CASES])
def test_one_forward_per_block_gives_the_bytes_of_solving_group_by_group(llama_dir, calib_text, tmp_path, monkeypatch,
                                                                         caplog, method, sparsity, act_dtype):
    cfg, calib = PruneConfig(method=method, sparsity=sparsity), calib_for(calib_text, true_sequential=True, dtype=act_dtype)
    with monkeypatch.context() as m:
        counted = _Counted(m)
        one = run(llama_dir, cfg, calib, tmp_path / "lockstep")
    # 6 samples, 3 blocks: each sample runs through each block once (the last stops at its down projection)
    assert (counted.forwards, counted.lockstep_runs, counted.observes) == (6 * 3, 3, 0)
    with monkeypatch.context() as m:
        m.setattr(sequential, "free_memory", lambda device: 0)  # no room: group by group
        counted = _Counted(m)
        with caplog.at_level("INFO", logger="llm_prune.sequential"):
            grouped = run(llama_dir, cfg, calib, tmp_path / "groups")
    assert "solving group by group" in caplog.text
    assert counted.lockstep_runs == 0 and counted.observes == 4 * 3  # q/k/v, o, gate/up, down per block
    assert counted.forwards > 4 * 6 * 3
    assert digest(tmp_path / "lockstep") == digest(tmp_path / "groups")
    assert one["achieved"] == grouped["achieved"]
    assert one["calibration"]["true_sequential_forwards"] == "one forward per block"
    assert grouped["calibration"]["true_sequential_forwards"] == "one forward per group"


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)


@pytest.mark.parametrize("family", ["opt", "gpt2", "qwen2"])
def test_other_families_give_the_same_bytes_both_ways(tmp_path, calib_text, monkeypatch, family):
    from transformers import Qwen2Config

    config = {"opt": tiny_opt_config, "gpt2": _gpt2_config,
              "qwen2": lambda: Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=64)}[family]()
    src = add_tokenizer(save_tiny(tmp_path / family, config))
    both_ways(src, PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5)), calib_text, tmp_path, monkeypatch)


def both_ways(src, cfg, calib_text, tmp_path, monkeypatch) -> dict:
    """Run ``cfg`` with --true-sequential in lockstep, then group by group (no memory free): the
    same shards, each report saying which way it ran. Returns the lockstep run's report."""
    calib = calib_for(calib_text, true_sequential=True)
    one = run(src, cfg, calib, tmp_path / "lockstep")
    monkeypatch.setattr(sequential, "free_memory", lambda device: 0)
    grouped = run(src, cfg, calib, tmp_path / "groups")
    assert one["calibration"]["true_sequential_forwards"] == "one forward per block"
    assert grouped["calibration"]["true_sequential_forwards"] == "one forward per group"
    assert digest(tmp_path / "lockstep") == digest(tmp_path / "groups")
    return one


def test_real_smollm2_gives_the_same_bytes_both_ways(smollm2_dir, calib_text, tmp_path, monkeypatch):
    # 30 real blocks with grouped-query attention, rotary embeddings and bf16-mixed forwards
    both_ways(smollm2_dir, PruneConfig(method="wanda", sparsity=Sparsity(0.5)), calib_text, tmp_path, monkeypatch)


def test_the_summary_says_how_true_sequential_ran(llama_dir, calib_text, tmp_path, capsys, monkeypatch):
    from llm_prune.cli import main

    argv = [str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_text), "--nsamples", "6",
            "--seqlen", "32", "--act-dtype", "float32", "--true-sequential"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("float32; true-sequential, one forward per block)")
    monkeypatch.setattr(sequential, "free_memory", lambda device: 0)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("float32; true-sequential, one forward per group)")


def test_owl_allocation_gives_the_same_bytes_both_ways(llama_dir, calib_text, tmp_path, monkeypatch):
    # OWL's first pass (statistics of the dense blocks) runs before; the shares then go to each target
    cfg = PruneConfig(method="wanda", sparsity=Sparsity(0.6), allocation="owl", band=0.08, owl_m=5.0)
    one = both_ways(llama_dir, cfg, calib_text, tmp_path, monkeypatch)
    assert len({v for v in one["achieved"]["tensors"].values()}) > 1  # the blocks got different shares


def test_permute_solves_group_by_group(llama_dir, calib_text, tmp_path, monkeypatch):
    # --permute reorders channels of activations a lockstep forward has already computed
    counted = _Counted(monkeypatch)
    cfg = PruneConfig(method="ria", sparsity=Sparsity(0.5, 2, 4), permute=True)
    run(llama_dir, cfg, calib_for(calib_text, true_sequential=True), tmp_path / "out")
    assert counted.lockstep_runs == 0 and counted.observes == 4 * 3


def test_a_resumed_lockstep_run_is_bit_identical(llama_dir, calib_text, tmp_path, monkeypatch):
    cfg, calib = PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5)), calib_for(calib_text, true_sequential=True)
    run(llama_dir, cfg, calib, tmp_path / "full")
    with interrupted_after_writes(monkeypatch) as written, pytest.raises(KeyboardInterrupt):
        run(llama_dir, cfg, calib, tmp_path / "resumed")
    assert written == ["block.0", "block.1"]
    report = run(llama_dir, cfg, calib, tmp_path / "resumed", resume=True)
    assert report["run"]["resumed_units"] == 2
    assert digest(tmp_path / "full") == digest(tmp_path / "resumed")


class _Block(nn.Module):
    """Two linears in a row; ``branch`` sends some samples another way (a block whose forward
    depends on its input)."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.a, self.b, self.branch = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), branch

    def forward(self, x):
        h = self.a(x)
        if self.branch and x.sum() > 0:
            return h
        return self.b(torch.relu(h))


def _xs(n=5):
    return torch.randn(n, 3, 4, generator=torch.Generator().manual_seed(0))


def test_every_target_is_solved_after_all_samples_reached_it_and_before_any_passed_it():
    torch.manual_seed(0)
    block, x = _Block(), _xs()
    inputs = x.clone()
    lockstep, log = Lockstep(block, ["a.weight", "b.weight"], InputNorms, "cpu"), []

    def solve(rel):
        log.append((rel, lockstep.stat(rel).count))  # every sample's 3 tokens are in
        module = block.get_submodule(rel.split(".")[0])
        module.weight.data.mul_(0.5)  # the samples after the barrier must see this

    with torch.no_grad():
        expected_a, expected_b = block.a.weight * 0.5, block.b.weight * 0.5
        solved = lockstep.run(x, {}, torch.float32, solve)
    lockstep.remove()
    assert solved == ["a.weight", "b.weight"] and log == [("a.weight", 15), ("b.weight", 15)]
    with torch.no_grad():
        # the block's own ops on each sample alone, as the lockstep runs them: the same bits on any CPU
        # (a batched matmul may sum in another order)
        expected = torch.cat([F.linear(torch.relu(F.linear(inputs[j:j + 1], expected_a)), expected_b)
                              for j in range(len(inputs))])
        assert torch.equal(x, expected)  # every output from both halved weights
        # a's statistic saw the 5 inputs as given; b's saw a's outputs after a was halved
        norms_a, norms_b = InputNorms(4, "cpu"), InputNorms(4, "cpu")
        for j in range(5):
            norms_a.add(inputs[j:j + 1])
            norms_b.add(torch.relu(F.linear(inputs[j:j + 1], expected_a)))
    assert torch.equal(lockstep.stat("a.weight").norms, norms_a.norms)
    assert torch.equal(lockstep.stat("b.weight").norms, norms_b.norms)
    assert not block._forward_pre_hooks and not block.a._forward_pre_hooks


def test_until_stops_the_forwards_once_its_targets_are_solved():
    block, x = _Block(), _xs()
    before = x.clone()
    lockstep = Lockstep(block, ["a.weight"], InputNorms, "cpu")
    with torch.no_grad():
        assert lockstep.run(x, {}, torch.float32, lambda rel: None, until={"a.weight"}) == ["a.weight"]
    assert torch.equal(x, before)  # no sample ran on to its output


def test_samples_that_go_different_ways_are_refused():
    x = _xs()
    x[1] = x[1].abs()  # sample 1 returns after a; the others run b too
    x[0] = -x[0].abs()
    lockstep = Lockstep(_Block(branch=True), ["a.weight", "b.weight"], InputNorms, "cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"different ways \(b.weight / the block's end\)"):
        lockstep.run(x, {}, torch.float32, lambda rel: None)


def test_a_target_no_sample_reached_is_one_clear_error():
    x = _xs().abs()  # every sample returns after a: b never runs
    lockstep = Lockstep(_Block(branch=True), ["a.weight", "b.weight"], InputNorms, "cpu")
    with torch.no_grad(), pytest.raises(UserError, match=r"b.weight never ran .* --exclude"):
        lockstep.run(x, {}, torch.float32, lambda rel: None)


def test_an_error_in_one_sample_reaches_the_caller_and_parks_no_sample():
    block, x = _Block(), _xs()
    calls = []

    def solve(rel):
        calls.append(rel)
        raise ValueError("the solver failed")

    lockstep = Lockstep(block, ["a.weight", "b.weight"], InputNorms, "cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="the solver failed"):
        lockstep.run(x, {}, torch.float32, solve)
    assert calls == ["a.weight"] and lockstep._sample == {}
    lockstep.remove()
    with torch.no_grad():  # the block runs normally again: no hook left waiting for a scheduler
        block(x[:1])


def test_held_bytes_grows_with_the_samples_and_the_mlp():
    cfg = {"hidden_size": 576, "intermediate_size": 1536}
    assert held_bytes(cfg, 32, 512, 576, 4, 2) == 32 * held_bytes(cfg, 1, 512, 576, 4, 2)
    assert held_bytes({**cfg, "intermediate_size": 3072}, 32, 512, 576, 4, 2) > held_bytes(cfg, 32, 512, 576, 4, 2)
    # SmolLM2 at 128 x 2048, bf16-mixed: 3.2 GB (2.7 GB measured); Llama-2-7B at 128 x 2048: 23 GB
    assert 3.1e9 < held_bytes(cfg, 128, 2048, 576, 4, 2) < 3.3e9
    assert 22e9 < held_bytes({"intermediate_size": 11008}, 128, 2048, 4096, 4, 2) < 24e9
    # GPT-2 names its MLP n_inner, null for 4 x hidden; OPT ffn_dim
    assert held_bytes({"n_inner": None}, 8, 64, 32, 4, 4) == held_bytes({"ffn_dim": 128}, 8, 64, 32, 4, 4) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", [False, True])
def test_on_cuda_one_forward_per_block_gives_the_bytes_of_solving_group_by_group(llama_dir, calib_text, tmp_path,
                                                                                 monkeypatch, offload):
    cfg = PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5))
    calib = calib_for(calib_text, true_sequential=True, device="cuda", offload=offload)
    counted = _Counted(monkeypatch)
    run(llama_dir, cfg, calib, tmp_path / "lockstep")
    assert counted.lockstep_runs == 3
    monkeypatch.setattr(sequential, "free_memory", lambda device: 0)
    run(llama_dir, cfg, calib, tmp_path / "groups")
    assert counted.lockstep_runs == 3 and counted.observes == 4 * 3
    assert digest(tmp_path / "lockstep") == digest(tmp_path / "groups")

