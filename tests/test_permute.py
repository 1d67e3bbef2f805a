"""--permute: RIA's channel permutation for N:M, absorbed into the block (same function, N:M in storage order)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_prune.cli import main
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.errors import UserError
from llm_prune.magnitude import is_nm
from llm_prune.methods import get_method
from llm_prune.permute import channel_permutation, kept_score, permute_inputs, reallocation

from .helpers import add_tokenizer, load_dir
from .test_sequential import calib_for, run

TWO_FOUR = Sparsity(0.5, 2, 4)


def test_a_row_worked_by_hand():
    # 2:4 of [9 8 7 6 | 1 1 1 1] keeps 9+8 and 1+1 = 19 in stored order; dealing one strong and one
    # weak channel to each slot pair keeps 9+8+7+6 = 30, which is the most any order can keep.
    s = torch.tensor([[9.0, 8, 7, 6, 1, 1, 1, 1]])
    assert kept_score(s, 2, 4) == 19
    perm = channel_permutation(s, 2, 4)
    assert kept_score(s, 2, 4, perm) == 30
    assert sorted(perm.tolist()) == list(range(8))
    assert all(len({0, 1, 2, 3} & set(perm[g * 4:(g + 1) * 4].tolist())) == 2 for g in range(2))


def test_reallocation_deals_one_channel_of_each_quantile_to_every_group():
    perm = reallocation(torch.arange(16.0), 4)  # channel i has importance i
    groups = perm.view(4, 4)
    assert [sorted(int(c) // 4 for c in g) for g in groups] == [[0, 1, 2, 3]] * 4
    assert groups[:, 1].tolist() == [7, 6, 5, 4]  # the second quantile runs backwards


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 8), nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]),
       seed=st.integers(0, 2**16))
def test_permutation_never_keeps_less_than_the_stored_order(rows, groups, nm, seed):
    n, m = nm
    s = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed)) ** 3
    perm = channel_permutation(s, n, m)
    assert sorted(perm.tolist()) == list(range(groups * m))
    kept = kept_score(s, n, m, perm)
    assert kept >= kept_score(s, n, m)
    assert kept <= float(s.sort(dim=1, descending=True).values[:, :n * groups].sum(dtype=torch.float64)) + 1e-9


@pytest.mark.parametrize("weight_in_first", [False, True])
def test_permuting_a_gated_mlp_keeps_its_function(weight_in_first):
    torch.manual_seed(0)
    h, f = 8, 16
    t = {"gate.weight": torch.randn(f, h), "up.weight": torch.randn(f, h), "up.bias": torch.randn(f),
         "down.weight": torch.randn(h, f)}
    if weight_in_first:  # GPT-2's Conv1D stores [in, out]
        t = {k: (v.t().contiguous() if v.dim() == 2 else v) for k, v in t.items()}

    def mlp(t, x):
        lin = (lambda w, x: x @ w) if weight_in_first else (lambda w, x: x @ w.t())
        return lin(t["down.weight"], torch.nn.functional.silu(lin(t["gate.weight"], x)) * (lin(t["up.weight"], x) + t["up.bias"]))

    x = torch.randn(5, h)
    before = mlp(t, x)
    permute_inputs(t, "down.weight", ["gate.weight", "up.weight", "up.bias"], torch.randperm(f), weight_in_first)
    torch.testing.assert_close(mlp(t, x), before, rtol=1e-5, atol=1e-5)


def test_permute_needs_a_pattern_and_a_scoring_method():
    with pytest.raises(UserError, match="give --pattern"):
        PruneConfig(method="ria", sparsity=Sparsity(0.5), permute=True)
    for method in ("omp", "sparsegpt"):
        with pytest.raises(UserError, match="--permute does not apply to"):
            get_method(method).check(PruneConfig(method=method, sparsity=TWO_FOUR, permute=True))
    get_method("ria").check(PruneConfig(method="ria", sparsity=TWO_FOUR, permute=True))


@pytest.mark.parametrize("method", ["ria", "wanda"])
def test_permuted_export_is_2of4_in_storage_and_the_same_function(tiny_llama, calib_text, tmp_path, method):
    # Block 0 sees the same inputs with and without --permute, so its permuted export differs from
    # the plain one only by the order of the MLP's hidden channels and by down_proj's groups:
    # gate/up rows are the plain rows reordered (their own groups run along the hidden size), and
    # down_proj with that order undone keeps source weights, half of each row. Later blocks see
    # inputs changed by the blocks before them; every down_proj is 2:4 in storage order.
    src = add_tokenizer(tiny_llama)
    calib = calib_for(calib_text)
    run(src, PruneConfig(method=method, sparsity=TWO_FOUR), calib, tmp_path / "plain")
    report = run(src, PruneConfig(method=method, sparsity=TWO_FOUR, permute=True), calib, tmp_path / "perm", fmt="packed24")
    assert report["permuted"]["inputs_of"] == ["mlp.down_proj.weight", "self_attn.o_proj.weight"]
    assert report["permuted"]["outputs_of"] == ["mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.v_proj.weight"]
    assert main(["verify", str(tmp_path / "perm"), "--quiet"]) == 0
    from llm_prune import load

    plain, perm = load_dir(tmp_path / "plain"), load(tmp_path / "perm", progress=False).state_dict()
    p = "model.layers.0.mlp."
    order = torch.tensor([plain[p + "gate_proj.weight"].tolist().index(row) for row in perm[p + "gate_proj.weight"].tolist()])
    assert sorted(order.tolist()) == list(range(64)) and (order != torch.arange(64)).any()
    assert torch.equal(perm[p + "up_proj.weight"], plain[p + "up_proj.weight"][order])
    down = perm[p + "down_proj.weight"]
    undone = torch.empty_like(down)
    undone[:, order] = down
    kept = undone != 0
    source = load_dir(src)
    assert torch.equal(undone[kept], source[p + "down_proj.weight"][kept]) and int(kept.sum()) == down.numel() // 2
    assert not torch.equal(kept, plain[p + "down_proj.weight"] != 0)  # chosen under the permutation
    # attention: each value head's rows reordered within the head (2 heads of 8 here), the output
    # projection's columns of both query heads reading it the same way
    a = "model.layers.0.self_attn."
    rows = torch.tensor([plain[a + "v_proj.weight"].tolist().index(r) for r in perm[a + "v_proj.weight"].tolist()])
    assert sorted(rows.tolist()) == list(range(16)) and all(set(rows[g * 8:(g + 1) * 8].tolist()) == set(range(g * 8, g * 8 + 8))
                                                             for g in range(2))
    cols = torch.cat([h * 8 + rows[(h // 2) * 8:(h // 2 + 1) * 8] - (h // 2) * 8 for h in range(4)])
    o = torch.empty_like(perm[a + "o_proj.weight"])
    o[:, cols] = perm[a + "o_proj.weight"]
    assert torch.equal(o[o != 0], source[a + "o_proj.weight"][o != 0])
    for name in ("q_proj", "k_proj"):
        assert torch.equal(perm[a + name + ".weight"], plain[a + name + ".weight"])
    for name in plain:
        if ".layers." not in name:
            assert torch.equal(perm[name], plain[name]), name
    for layer in range(3):
        assert is_nm(perm[f"model.layers.{layer}.mlp.down_proj.weight"], 2, 4)
        assert is_nm(perm[f"model.layers.{layer}.self_attn.o_proj.weight"], 2, 4)


def test_permute_on_the_command_line(tiny_llama, calib_text, tmp_path, capsys):
    src = add_tokenizer(tiny_llama)
    assert main([str(src), "--method", "ria", "--pattern", "2:4", "--permute", "--calib", str(calib_text),
                 "--nsamples", "4", "--seqlen", "16", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()
    assert main([str(src), "--method", "omp", "--pattern", "2:4", "--permute", "--out", str(tmp_path / "no"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--permute does not apply to omp" in err and err.count("\n") == 1 and not (tmp_path / "no").exists()


def test_the_block_that_computes_the_next_inputs_is_permuted_with_the_tensors():
    # The pipeline permutes the stored tensors and the block module that computes the next block's
    # calibration inputs alike: the module computes what it computed before, holding the tensors.
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from llm_prune.arch import ARCHS
    from llm_prune.methods.wanda import InputNorms
    from llm_prune.sequential import _permute_channels

    from .conftest import tiny_llama_config

    cfg = tiny_llama_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0).eval()
    x = torch.randn(2, 8, cfg.hidden_size)
    pos = torch.arange(8)[None]
    rope = LlamaRotaryEmbedding(cfg)(x, pos)
    forward = lambda: block(x, position_embeddings=rope, position_ids=pos)  # noqa: E731
    with torch.no_grad():
        before = forward()
    prefix = "model.layers.0."
    down0 = block.mlp.down_proj.weight.detach().clone()
    tensors = {prefix + n: t.detach().clone() for n, t in block.state_dict().items()}
    o0 = block.self_attn.o_proj.weight.detach().clone()
    run = SimpleNamespace(arch=ARCHS["llama"], cfg=PruneConfig(method="ria", sparsity=TWO_FOUR, permute=True),
                          reader=SimpleNamespace(config=cfg.to_dict()))
    unit = SimpleNamespace(targets=[prefix + "self_attn.o_proj.weight", prefix + "mlp.down_proj.weight"])
    for rel, width in (("self_attn.o_proj.weight", cfg.hidden_size), ("mlp.down_proj.weight", cfg.intermediate_size)):
        stat = InputNorms(width)
        stat.add(torch.rand(16, width) * torch.linspace(0.1, 3, width))
        new_stat = _permute_channels(run, block, tensors, unit, rel, stat, "cpu")
        assert sorted(new_stat.norms.tolist()) == sorted(stat.norms.tolist()) and not torch.equal(new_stat.norms, stat.norms)
    with torch.no_grad():
        after = forward()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    params = dict(block.named_parameters())
    assert all(torch.equal(tensors[prefix + n], params[n]) for n in params)
    for rel, w0 in (("mlp.down_proj.weight", down0), ("self_attn.o_proj.weight", o0)):
        w = tensors[prefix + rel]
        assert not torch.equal(w, w0) and torch.equal(w.sort(dim=1).values, w0.sort(dim=1).values)


def test_value_heads_are_reordered_within_each_head_for_every_query_head_that_reads_it():
    from llm_prune.permute import head_permutation

    s = torch.rand(6, 4 * 8, generator=torch.Generator().manual_seed(1)) ** 3  # 4 query heads of 8, 2 value heads
    into, out = head_permutation(s, 2, 4, heads=4, kv_heads=2)
    assert sorted(into.tolist()) == list(range(32)) and sorted(out.tolist()) == list(range(16))
    for h in range(4):
        g = h // 2
        assert (into[h * 8:(h + 1) * 8] - h * 8).tolist() == (out[g * 8:(g + 1) * 8] - g * 8).tolist()
    assert kept_score(s, 2, 4, into) >= kept_score(s, 2, 4)


def test_the_compiled_gain_table_is_the_torch_one():
    from llm_prune.kernels.permute import gain_table

    g = torch.Generator().manual_seed(3)
    cand, nth = torch.rand(37, 12, generator=g), torch.rand(37, 12, generator=g)
    expect = (cand.double()[:, :, None] - nth.double()[:, None, :]).clamp_min(0).sum(0)
    torch.testing.assert_close(gain_table(cand, nth).double(), expect, rtol=1e-5, atol=1e-5)
