"""The sequential calibrated pipeline over the block stream, through prune_checkpoint: streaming output == the same methods run block by block on the in-memory
transformers model, same seed -> same bytes, resume, N:M validity, report fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_prune.arch import ARCHS, arch_for
from llm_prune.calibration import CalibConfig, calibration_windows
from llm_prune.config import PruneConfig, Sparsity
from llm_prune.errors import UserError
from llm_prune.magnitude import is_nm
from llm_prune.methods import get_method
from llm_prune.blocks import build_skeleton, capture_block_inputs
from llm_prune.pipeline import Run, prune_checkpoint
from llm_prune.reader import CheckpointReader
from llm_prune.sequential import prune_sequential
from llm_prune.targets import select_targets
from llm_prune.writer import ShardWriter

from .helpers import add_tokenizer, digest, interrupted_after_writes, load_dir, read_decoded as decoded
from .conftest import save_tiny, tiny_opt_config

CASES = [("sparsegpt", Sparsity(0.5)), ("sparsegpt", Sparsity(0.5, 2, 4)), ("wanda", Sparsity(0.6)),
         ("wanda", Sparsity(0.5, 2, 4)), ("ria", Sparsity(0.6)), ("ria", Sparsity(0.5, 2, 4))]


def calib_for(text, **kw) -> CalibConfig:
    return CalibConfig(**{"source": str(text), "nsamples": 6, "seqlen": 32, "seed": 0, "blocksize": 16, **kw})


def run(src: Path, cfg: PruneConfig, calib: CalibConfig, out: Path, *, resume=False, fmt="dense") -> dict:
    return prune_checkpoint(src, cfg, out, fmt=fmt, calib=calib, resume=resume, progress=False)


LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def in_memory_reference(src: Path, method_name: str, sparsity: Sparsity, calib: CalibConfig) -> dict:
    """The reference loop (as in the SparseGPT/Wanda repos): the whole model in memory, block 0's
    inputs caught by a hook, then per block: observe every Linear, solve, re-run the pruned block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = get_method(method_name)
    # bf16-mixed: every block forward autocasts its matmuls to bf16; statistics and solves stay fp32
    forward = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=calib.dtype == "bf16-mixed")  # noqa: E731
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    source = load_dir(src)
    windows, _ = calibration_windows(calib, AutoTokenizer.from_pretrained(src), calib.seqlen)
    layers = model.model.layers
    caught = {"x": []}

    def catch(module, args, kwargs):
        caught["x"].append(args[0] if args else kwargs["hidden_states"])
        caught["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise InterruptedError

    hook = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for j in range(len(windows)):
            with pytest.raises(InterruptedError):
                model(input_ids=windows[j:j + 1], use_cache=False)
        hook.remove()
        xs, kw, pruned = caught["x"], caught["kw"], {}
        for i, layer in enumerate(layers):
            all_linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            # true-sequential: observe and solve group by group; else all at once from one forward
            for group in (LLAMA_GROUPS if calib.true_sequential else [list(all_linears)]):
                linears = {n: all_linears[n] for n in group}
                stats = {n: method.observer(m.in_features, "cpu") for n, m in linears.items()}
                hooks = [m.register_forward_pre_hook(lambda m, a, n=n: _add_fp32(stats[n], a[0]))
                         for n, m in linears.items()]
                with forward():
                    for x in xs:
                        layer(x, **kw)
                for h in hooks:
                    h.remove()
                for n, m in linears.items():
                    name = f"model.layers.{i}.{n}.weight"
                    new, _ = method.solve(source[name].float(), stats[n], sparsity, weight_in_first=False, calib=calib)
                    pruned[name] = new.to(source[name].dtype)  # exported rounded; propagated as solved
                    m.weight.data = new
            with forward():
                xs = [layer(x, **kw) for x in xs]
    return pruned


def _add_fp32(stat, x):
    with torch.autocast("cpu", enabled=False):
        stat.add(x)


@pytest.mark.parametrize("act_dtype", ["float32", "bf16-mixed"])
@pytest.mark.parametrize("method,sparsity", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_streaming_equals_in_memory_block_by_block(llama_dir, calib_text, tmp_path, method, sparsity, act_dtype):
    calib = calib_for(calib_text, dtype=act_dtype)
    report = run(llama_dir, PruneConfig(method=method, sparsity=sparsity), calib, tmp_path / "out")
    streamed, source = load_dir(tmp_path / "out"), load_dir(llama_dir)
    reference = in_memory_reference(llama_dir, method, sparsity, calib)
    assert sorted(streamed) == sorted(source) and len(reference) == 3 * 7
    for name, tensor in streamed.items():
        expected = reference.get(name, source[name])
        assert tensor.dtype == source[name].dtype
        assert torch.equal(tensor, expected), name
        if name in reference:
            assert not torch.equal(tensor, source[name])
            if sparsity.is_nm:
                assert is_nm(tensor != 0, 2, 4), name
    assert report["achieved"]["targeted"] == pytest.approx(sparsity.ratio, abs=0.01)
    cal = report["calibration"]
    assert (cal["source"], cal["nsamples"], cal["seqlen"], cal["seed"]) == (str(calib_text), 6, 32, 0)
    assert cal["text_tokens"] >= 6 * 32


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_bf16_mixed_equals_the_reference_under_autocast_and_differs_from_fp32(llama_dir, calib_text, tmp_path, method):
    sparsity = Sparsity(0.5)
    calib = calib_for(calib_text, dtype="bf16-mixed")
    report = run(llama_dir, PruneConfig(method=method, sparsity=sparsity), calib, tmp_path / "mixed")
    run(llama_dir, PruneConfig(method=method, sparsity=sparsity), calib_for(calib_text, dtype="float32"),
        tmp_path / "fp32")
    mixed, fp32 = load_dir(tmp_path / "mixed"), load_dir(tmp_path / "fp32")
    reference = in_memory_reference(llama_dir, method, sparsity, calib)
    assert len(reference) == 3 * 7
    for name, expected in reference.items():
        assert torch.equal(mixed[name], expected), name
    assert report["calibration"]["activation_dtype"] == "bf16-mixed"
    # block 0's q/k/v see the embedding's fp32 output either way; later inputs come from bf16 matmuls
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(mixed[first], fp32[first])
    if method == "sparsegpt":  # (Wanda's masks on this tiny model come out the same either way)
        assert any(not torch.equal(mixed[n], fp32[n]) for n in reference)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_true_sequential_equals_group_by_group_reference(llama_dir, calib_text, tmp_path, method):
    calib, sparsity = calib_for(calib_text, true_sequential=True), Sparsity(0.5)
    run(llama_dir, PruneConfig(method=method, sparsity=sparsity), calib, tmp_path / "seq")
    run(llama_dir, PruneConfig(method=method, sparsity=sparsity), calib_for(calib_text), tmp_path / "all")
    streamed, at_once = load_dir(tmp_path / "seq"), load_dir(tmp_path / "all")
    reference = in_memory_reference(llama_dir, method, sparsity, calib)
    assert len(reference) == 3 * 7
    for name, expected in reference.items():
        assert torch.equal(streamed[name], expected), name
    # block 0's q/k/v see the same inputs either way; its o_proj sees pruned q/k/v only when grouped
    assert torch.equal(streamed["model.layers.0.self_attn.q_proj.weight"], at_once["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(streamed["model.layers.0.self_attn.o_proj.weight"], at_once["model.layers.0.self_attn.o_proj.weight"])


def test_same_seed_same_bytes_and_another_seed_differs(llama_dir, calib_text, tmp_path):
    cfg = PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5))
    run(llama_dir, cfg, calib_for(calib_text), tmp_path / "a")
    run(llama_dir, cfg, calib_for(calib_text), tmp_path / "b")
    run(llama_dir, cfg, calib_for(calib_text, seed=1), tmp_path / "c")
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b and len(a) >= 4
    assert a != c


def test_resume_starts_from_the_saved_inputs_bit_identical(llama_dir, calib_text, tmp_path, monkeypatch):
    cfg, calib = PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5, 2, 4)), calib_for(calib_text)
    run(llama_dir, cfg, calib, tmp_path / "full", fmt="packed24")
    with interrupted_after_writes(monkeypatch) as written, pytest.raises(KeyboardInterrupt):
        run(llama_dir, cfg, calib, tmp_path / "resumed", fmt="packed24")
    assert written == ["block.0", "block.1"]
    with pytest.raises(UserError, match="other (calibration )?settings"):
        run(llama_dir, cfg, calib_for(calib_text, nsamples=5), tmp_path / "resumed", resume=True, fmt="packed24")
    partial = tmp_path / ".resumed.partial"
    assert sorted(p.name for p in partial.glob("calibration-inputs-*")) == ["calibration-inputs-00002.bin"]
    report = run(llama_dir, cfg, calib, tmp_path / "resumed", resume=True, fmt="packed24")
    assert report["run"]["resumed_units"] == 2
    assert not list((tmp_path / "resumed").glob("calibration-inputs-*"))
    full, resumed = decoded(tmp_path / "full"), decoded(tmp_path / "resumed")
    assert sorted(full) == sorted(resumed) and all(torch.equal(full[n], resumed[n]) for n in full), \
        [n for n in full if not torch.equal(full[n], resumed[n])]
    assert all(f.name.startswith("sparse-") for f in (tmp_path / "full").glob("*.safetensors"))


def test_resume_without_saved_inputs_is_one_clear_error(llama_dir, calib_text, tmp_path, monkeypatch):
    cfg, calib = PruneConfig(method="wanda", sparsity=Sparsity(0.5)), calib_for(calib_text)
    real_write = ShardWriter.write

    def die_after_block_0(self, unit, *args, **kw):
        real_write(self, unit, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", die_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        run(llama_dir, cfg, calib, tmp_path / "out")
    monkeypatch.setattr(ShardWriter, "write", real_write)
    (tmp_path / ".out.partial" / "calibration-inputs-00001.bin").write_bytes(b"short")
    with pytest.raises(UserError, match="lacks the saved inputs of block 1"):
        run(llama_dir, cfg, calib, tmp_path / "out", resume=True)
    assert (tmp_path / ".out.partial").is_dir()  # nothing lost


def test_only_the_embedding_is_materialised_to_capture_block_inputs(llama_dir):
    reader = CheckpointReader(llama_dir)
    arch = arch_for(reader.config)
    skeleton = build_skeleton(llama_dir)
    assert all(p.is_meta for p in skeleton.parameters())
    blocks = skeleton.get_submodule(arch.blocks_attr)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    x, kwargs = capture_block_inputs(skeleton, reader, arch, blocks[0], windows, cpu, torch.float32, cpu)
    embed = load_dir(llama_dir)["model.embed_tokens.weight"].float()
    assert torch.equal(x, embed[windows])  # Llama's block 0 sees the raw embeddings
    assert "position_embeddings" in kwargs
    assert all(p.is_meta for p in skeleton.parameters())  # and the embedding is released again


def test_opt_family_runs_from_its_arch_entry(tmp_path, calib_text):
    src = add_tokenizer(save_tiny(tmp_path / "tiny-opt", tiny_opt_config()))
    report = run(src, PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5, 2, 4)), calib_for(calib_text),
                 tmp_path / "out")
    out = load_dir(tmp_path / "out")
    targets = [n for n in out if n in report["achieved"]["tensors"]]
    assert len(targets) == 2 * 6 and all(is_nm(out[n] != 0, 2, 4) for n in targets)


def run_of(reader, units, cfg, calib, arch, writer) -> Run:
    return Run(reader, units, cfg, arch, get_method(cfg.method), writer, calib=calib, progress=False)


def test_bad_inputs_are_user_errors(llama_dir, tiny_llama, calib_text, tmp_path):
    reader = CheckpointReader(llama_dir)
    units = reader.units(ARCHS["llama"])
    cfg = PruneConfig(method="wanda", sparsity=Sparsity(0.5))
    select_targets(units, reader.infos, ARCHS["llama"], cfg)
    writer = ShardWriter(tmp_path / "o", {"k": 1})
    with pytest.raises(UserError, match="no entry for bert"):
        prune_sequential(run_of(reader, units, cfg, calib_for(calib_text), ARCHS["bert"], writer))
    with pytest.raises(UserError, match="--scope global does not apply"):
        prune_sequential(run_of(reader, units, PruneConfig(method="wanda", scope="global"), calib_for(calib_text),
                                ARCHS["llama"], writer))
    with pytest.raises(UserError, match="does not prune from calibration data"):
        prune_sequential(run_of(reader, units, PruneConfig(method="omp"), calib_for(calib_text), ARCHS["llama"], writer))
    with pytest.raises(UserError, match=r"has [\d,]+ tokens; 500 windows of 32"):
        prune_sequential(run_of(reader, units, cfg, calib_for(calib_text, nsamples=500), ARCHS["llama"], writer))


def test_observing_stops_each_forward_after_the_last_observed_input():
    # The block's output is not needed to observe it: after the first sample, forwards end at the
    # last target's input. The statistics are those of full forwards, to the bit.
    from torch import nn

    from llm_prune.blocks import Observers, observe
    from llm_prune.methods.sparsegpt import Hessian

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.up, self.down, self.after = (nn.Linear(8, 8) for _ in range(5))

        def forward(self, x):
            h = self.q(x) + self.k(x)  # q and k share their input: one observer
            return self.after(x + self.down(torch.relu(self.up(h))))

    torch.manual_seed(0)
    block, x = Block(), torch.randn(5, 3, 8)
    calls = {"down": 0, "after": 0}
    for name in calls:
        getattr(block, name).register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    method = get_method("sparsegpt")
    got = observe(block, ["q.weight", "k.weight", "up.weight", "down.weight"], method, "cpu", x, {}, torch.float32)
    assert calls == {"down": 1, "after": 1}  # the first forward only: it learns which input comes last
    full = Observers(block, ["q.weight", "k.weight", "up.weight", "down.weight"], Hessian, "cpu")
    with torch.no_grad():
        for j in range(5):
            block(x[j:j + 1])
            full.end_forward()
    for rel in ("q.weight", "k.weight", "up.weight", "down.weight"):
        assert torch.equal(got.stat(rel).H, full.stat(rel).H) and got.stat(rel).count == full.stat(rel).count == 15


def test_bf16_mixed_forwards_autocast_the_matmuls_and_keep_statistics_in_fp32():
    from torch import nn

    from llm_prune.blocks import observe, run_block
    from llm_prune.methods.sparsegpt import Hessian

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 8, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.stack([block(x[j:j + 1])[0] for j in range(4)])
    mixed = run_block(block, x.clone(), {}, "cpu", torch.float32, collect=True, matmul=torch.bfloat16)
    plain = run_block(block, x.clone(), {}, "cpu", torch.float32, collect=True)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, expected.float())
    assert not torch.equal(mixed, plain)
    # the second Linear's input comes out of a bf16 matmul; its Hessian is the fp32 one of those values
    got = observe(block, ["0.weight", "2.weight"], get_method("sparsegpt"), "cpu", x, {}, torch.float32,
                  matmul=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seen = torch.cat([torch.relu(block[0](x[j:j + 1])) for j in range(4)]).reshape(-1, 32)
    reference = Hessian(32)
    reference.add(seen.float())
    assert got.stat("2.weight").H.dtype == torch.float32
    torch.testing.assert_close(got.stat("2.weight").H, reference.H, rtol=1e-6, atol=1e-7)
    first = Hessian(16)
    first.add(x)
    torch.testing.assert_close(got.stat("0.weight").H, first.H, rtol=1e-6, atol=1e-7)


def test_bf16_mixed_blocks_hold_matmul_weights_in_bf16_and_give_autocast_bits(llama_dir):
    # Autocast would cast every Linear weight at every call; the block holds the cast once. The
    # norms stay fp32, and a forward gives the bits of fp32 weights under autocast.
    from llm_prune.blocks import load_block

    reader, arch = CheckpointReader(llama_dir), ARCHS["llama"]
    names = [n for n in reader.infos if n.startswith("model.layers.0.")]
    tensors = reader.read(names)
    skeletons = [build_skeleton(llama_dir).model for _ in range(2)]  # loading assigns into the skeleton
    mixed = load_block(skeletons[0].layers[0], tensors, arch, "cpu", torch.float32, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in mixed.named_parameters()}
    assert dtypes["self_attn.q_proj.weight"] == dtypes["mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["input_layernorm.weight"] == torch.float32
    plain = load_block(skeletons[1].layers[0], tensors, arch, "cpu", torch.float32)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    x, pos = torch.randn(1, 8, reader.config["hidden_size"]), torch.arange(8)[None]
    kw = {"position_ids": pos, "position_embeddings": skeletons[0].rotary_emb(x, pos)}  # rotary buffers are real
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = mixed(x, **kw), plain(x, **kw)
    a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
    assert torch.equal(a, b)


def test_targets_sharing_an_input_share_one_inverse_hessian(llama_dir, calib_text, tmp_path, monkeypatch):
    # q/k/v see one input, gate/up another: one factorisation per distinct input, per block, and
    # the same bytes as factorising for every target.
    from llm_prune.methods import sparsegpt

    calls = []
    real = sparsegpt.inverse_cholesky
    monkeypatch.setattr(sparsegpt, "inverse_cholesky", lambda H, damp=0.01: calls.append(H.shape) or real(H, damp))
    calib, blocks = calib_for(calib_text), CheckpointReader(llama_dir).config["num_hidden_layers"]
    shared = run(llama_dir, PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5)), calib, tmp_path / "shared")
    assert len(calls) == blocks * len(LLAMA_GROUPS)
    monkeypatch.setattr(sparsegpt.Hessian, "inverse", lambda self, damp: None)  # each target factorises its own
    run(llama_dir, PruneConfig(method="sparsegpt", sparsity=Sparsity(0.5)), calib, tmp_path / "each")
    assert len(calls) == blocks * (len(LLAMA_GROUPS) + 7)
    assert digest(tmp_path / "shared") == digest(tmp_path / "each") and shared["achieved"]


@pytest.mark.parametrize("act_dtype", ["float32", "bf16-mixed"])
def test_the_summary_names_the_calibration_and_its_precision(llama_dir, calib_text, tmp_path, capsys, act_dtype):
    from llm_prune.cli import main

    assert main([str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib_text),
                 "--nsamples", "6", "--seqlen", "32", "--act-dtype", act_dtype, "--out", str(tmp_path / "o")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == (f"pruned {llama_dir} with wanda 0.5 (layer scope; calibration 6 × 32 tokens on cpu, "
                      f"{act_dtype})")


def test_saved_inputs_bytes_reads_each_family_s_name_for_the_hidden_size():
    from llm_prune.sequential import saved_inputs_bytes

    calib = CalibConfig(nsamples=4, seqlen=16, dtype="float32")
    expected = 2 * 4 * 16 * 32 * 4  # two files while one replaces the other
    for config in ({"hidden_size": 32}, {"d_model": 32}, {"n_embd": 32}):  # Llama, OPT/T5, GPT-2
        assert saved_inputs_bytes(config, calib) == expected
