"""``llm-prune trace``: checkpoints put in training order, near-zeros counted exactly, a planted jump flagged."""

import json

import pytest
import torch

from llm_prune.cli import main
from llm_prune.errors import UserError
from llm_prune.study.trace import find_checkpoints, flag_jumps
from tests.conftest import save_tiny, tiny_llama_config, tiny_opt_config
from tests.helpers import load_dir

STEPS = [0, 50, 100, 150, 200, 250]
JUMP_AT = 150


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main(["trace", *map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured


# -- the jump rule, by hand -------------------------------------------------------------------------
def test_one_jump_among_small_changes():
    values = [0.100, 0.101, 0.102, 0.152, 0.153]  # +0.1 pp a step, then +5 pp at step 30
    jumps = flag_jumps([0, 10, 20, 30, 40], values)
    assert [j["step"] for j in jumps] == [30] and jumps[0]["previous_step"] == 20
    assert jumps[0]["change"] == pytest.approx(0.05)
    assert jumps[0]["threshold"] == 0.005  # 3 × the others' median rate (0.0001/step) × 10 steps is below the floor


def test_steady_change_over_a_long_interval_is_not_a_jump():
    steps = [0, 10, 20, 1000, 1010]
    values = [0.1 + 1e-4 * s for s in steps]  # the same rate everywhere: +9.8 pp over the long interval
    assert flag_jumps(steps, values) == []


def test_drops_are_flagged_and_the_floor_holds_for_tiny_medians():
    assert [j["step"] for j in flag_jumps([0, 1, 2, 3], [0.2, 0.2, 0.1, 0.1])] == [2]  # -10 pp
    assert flag_jumps([0, 1, 2, 3], [0.2, 0.2, 0.204, 0.204]) == []  # 0.4 pp: under the 0.5 pp floor
    assert [j["step"] for j in flag_jumps([0, 5], [0.1, 0.2])] == [5]  # two checkpoints: the floor alone
    assert flag_jumps([0, 5], [0.1, 0.104]) == []


# -- ordering ---------------------------------------------------------------------------------------
def fake_checkpoint(path, global_step=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if global_step is not None:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": global_step}))
    return path


def test_order_by_checkpoint_number_not_by_name(tmp_path):
    for n in (1000, 50, 200, 0, 150):
        fake_checkpoint(tmp_path / "run" / f"checkpoint-{n}")
    located, how = find_checkpoints([tmp_path / "run"])
    assert [s for s, _ in located] == [0, 50, 150, 200, 1000]
    assert [d.name for _, d in located] == ["checkpoint-0", "checkpoint-50", "checkpoint-150", "checkpoint-200",
                                            "checkpoint-1000"]
    assert how == "the number in checkpoint-N"


def test_order_by_trainer_state_then_as_given(tmp_path):
    dirs = [fake_checkpoint(tmp_path / name, step) for name, step in [("late", 300), ("early", 10), ("mid", 20)]]
    located, how = find_checkpoints(dirs)
    assert [(s, d.name) for s, d in located] == [(10, "early"), (20, "mid"), (300, "late")]
    assert how == "trainer_state.json's global_step"
    plain = [fake_checkpoint(tmp_path / name) for name in ("b", "a")]
    located, how = find_checkpoints(plain)
    assert [(s, d.name) for s, d in located] == [(0, "b"), (1, "a")] and how.startswith("the order given")


def test_same_step_twice_refused(tmp_path):
    dirs = [fake_checkpoint(tmp_path / name, 5) for name in ("x", "y")]
    with pytest.raises(UserError, match="two checkpoints are at step 5"):
        find_checkpoints(dirs)


# -- end to end on hand-made checkpoints ------------------------------------------------------------
def planted_fraction(step: int) -> float:
    """Of every target, this fraction of its first weights is set to 1e-4: +0.2 % per 50 steps, +5 % at JUMP_AT."""
    return 0.002 * step / 50 + (0.05 if step >= JUMP_AT else 0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny Llama (fp32) saved at STEPS, written in an order whose names do not sort by step."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trace") / "run"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in (250, 0, 100, 50, 200, 150):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name])
                if ".layers." in name and p.dim() == 2:
                    p.view(-1)[:round(planted_fraction(step) * p.numel())] = 1e-4
        model.save_pretrained(root / f"checkpoint-{step}", max_shard_size="40KB")
    return root


def test_planted_jump_flagged_there_only(capsys, tmp_path, run_dir):
    out = tmp_path / "out"
    code, captured = run_cli(capsys, run_dir, "--out", out)
    assert code == 0, captured.err
    payload = json.loads((out / "trace.json").read_text())
    assert [p["step"] for p in payload["checkpoints"]] == STEPS
    assert payload["ordered_by"] == "the number in checkpoint-N"
    assert [j["step"] for j in payload["jumps"]["overall"]] == [JUMP_AT]
    assert all([j["step"] for j in js] == [JUMP_AT] for js in payload["jumps"]["by_type"].values())
    assert (out / "trace.png").is_file()
    assert f"abrupt changes at step {JUMP_AT}" in captured.out


def test_counts_equal_direct_torch_counts(capsys, tmp_path, run_dir):
    out = tmp_path / "out"
    assert run_cli(capsys, run_dir / "checkpoint-0", run_dir / "checkpoint-150", "--eps", "2e-4", "--out", out)[0] == 0
    payload = json.loads((out / "trace.json").read_text())
    for point in payload["checkpoints"]:
        by_type = {}
        for name, t in load_dir(point["path"]).items():
            if name.startswith("model.layers.") and t.dim() == 2:
                by_type.setdefault(name.split(".", 3)[3].removesuffix(".weight"), []).append(t.reshape(-1))
        for kind, parts in by_type.items():
            a = torch.cat(parts).double().abs()
            got = point["by_type"][kind]
            assert got["params"] == a.numel()
            assert got["near_zeros"] == int((a < 2e-4).sum()) and got["zeros"] == int((a == 0).sum())


def test_one_checkpoint_refused(capsys, tmp_path, run_dir):
    single = tmp_path / "single"
    single.mkdir()
    (single / "checkpoint-0").symlink_to(run_dir / "checkpoint-0", target_is_directory=True)
    for argv in ([run_dir / "checkpoint-0"], [single]):
        code, captured = run_cli(capsys, *argv, "--out", tmp_path / "o")
        err = captured.err.strip()
        assert code == 2 and err.startswith("llm-prune: error: ") and "\n" not in err, err
        assert "a trace needs at least two checkpoints, found 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single"]


def test_mismatched_architectures_refused(capsys, tmp_path, run_dir):
    opt = save_tiny(tmp_path / "opt", tiny_opt_config())
    deeper = save_tiny(tmp_path / "deeper", tiny_llama_config(num_hidden_layers=4), dtype=torch.float32)
    for other, match in [(opt, "of family opt"), (deeper, "differ in their targets")]:
        code, captured = run_cli(capsys, run_dir / "checkpoint-0", other, "--out", tmp_path / "o")
        err = captured.err.strip()
        assert code == 2 and "\n" not in err and match in err, err
    code, captured = run_cli(capsys, tmp_path / "nowhere", run_dir / "checkpoint-0", "--out", tmp_path / "o")
    assert code == 2 and "is neither a checkpoint directory" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper", "opt"]
