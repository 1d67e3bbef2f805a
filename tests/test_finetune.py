"""Fine-tuning with a held mask, lottery tickets, and the finetune command on tiny BERT and ViT models."""

from __future__ import annotations

import json

import pytest
import torch

from llm_prune.cli import main
from llm_prune.config import Sparsity
from llm_prune.finetune import MaskKeeper
from llm_prune.finetune.lth import lottery_ticket, magnitude_masks, rewind, round_sparsities, snapshot
from llm_prune.methods import METHODS, score_keep

from .helpers import bits, load_dir


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PRUNE_CACHE", str(tmp_path / "cache"))


def tiny_bert(path, seed=0):
    """A 2-layer BERT with MiniLM's tokenizer (real WordPiece), saved as a BertModel checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from llm_prune.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_vit(path, seed=0):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, num_labels=10)).save_pretrained(path)
    ViTImageProcessor(size={"height": 8, "width": 8}, do_resize=True, image_mean=[0.3], image_std=[0.4]).save_pretrained(path)
    return path


def sentiment_csv(path):
    good = ["a great film", "wonderful and warm", "I loved it", "a delight", "superb acting", "truly moving"]
    bad = ["a dull film", "boring and cold", "I hated it", "a mess", "awful acting", "truly tedious"]
    rows = ["text,label"] + [f"{t},pos" for t in good * 3] + [f"{t},neg" for t in bad * 3]
    path.write_text("\n".join(rows) + "\n")
    return path


# -- the mask holds -------------------------------------------------------------------------------------------
def _model_and_masks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    keep = {n: torch.rand(p.shape) > 0.5 for n, p in model.named_parameters() if p.dim() == 2}
    return model, keep


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                      lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1)],
                         ids=["adamw-decay", "sgd-momentum-decay"])
def test_pruned_weights_and_their_optimizer_state_stay_exactly_zero(make_opt):
    model, keep = _model_and_masks()
    opt = make_opt(model.parameters())
    keeper = MaskKeeper(keep).attach(model)
    for _ in range(25):
        loss = model(torch.randn(8, 16)).square().mean()
        loss.backward()
        opt.step()
        keeper.after_step(model, opt)
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name, mask in keep.items():
        p = params[name]
        assert torch.equal(bits(p.detach())[~mask], torch.zeros(int((~mask).sum()), dtype=torch.int32))  # +0, not -0
        assert (p.detach()[mask] != 0).all()  # the kept weights trained
        for state in opt.state[p].values():
            if torch.is_tensor(state) and state.shape == p.shape:
                assert not state[~mask].any()  # no hidden mass behind the mask


def test_the_callback_inside_a_users_own_trainer(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2))
    names = [n for n, p in model.named_parameters() if ".layer." in n and p.dim() == 2]
    with torch.no_grad():
        for n in names:
            p = dict(model.named_parameters())[n]
            p.mul_(score_keep(METHODS["omp"], p, Sparsity(0.5)))
    keeper = MaskKeeper.from_zeros(model, names)
    data = [{"input_ids": torch.randint(0, 50, (6,)), "labels": i % 2} for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[keeper.callback()])
    trainer.train()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n].detach() != 0, keeper.masks[n]) for n in names)
    assert all(not s[~keeper.masks[n]].any() for n in names for s in trainer.optimizer.state[params[n]].values()
               if torch.is_tensor(s) and s.shape == params[n].shape)


# -- lottery tickets -------------------------------------------------------------------------------------------
def test_round_sparsities_reach_the_target_exactly():
    assert round_sparsities(0.5, 1) == [0.5]
    r = round_sparsities(0.875, 3)
    assert r[-1] == 0.875 and r[0] == pytest.approx(0.5) and r[1] == pytest.approx(0.75)


def test_rounds_from_a_sparser_ticket_prune_the_same_fraction_each():
    from llm_prune.finetune.lth import per_round_fraction

    assert round_sparsities(0.875, 2, start=0.5) == [pytest.approx(0.75), 0.875]
    assert per_round_fraction(0.875, 2, start=0.5) == pytest.approx(0.5)
    assert round_sparsities(0.6, 1, start=0.4) == [0.6]
    with pytest.raises(Exception, match="up to 0.4"):
        round_sparsities(0.4, 1, start=0.4)


def test_rewinding_restores_kept_weights_bit_for_bit():
    model, keep = _model_and_masks()
    initial = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    rewind(model, initial, keep)
    for name, t in model.state_dict().items():
        expect = initial[name].masked_fill(~keep[name], 0) if name in keep else initial[name]
        assert torch.equal(bits(t), bits(expect))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_one_round_ticket_is_omp_of_the_fine_tuned_weights(scope):
    def train_round(m, keeper):  # a stand-in for fine-tuning: a fixed, deterministic update, mask held
        keeper.attach(m)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).view(p.shape))
        keeper.apply_(m)
        return {"accuracy": 1.0}

    model, _ = _model_and_masks()
    targets = {n: n for n, p in model.named_parameters() if p.dim() == 2}
    saved = {}
    lottery_ticket(model, snapshot(model), targets, 0.4, 1, scope, train_round, lambda r, masks: saved.update(masks))
    dense, _ = _model_and_masks()  # the same start, fine-tuned dense, then OMP
    train_round(dense, MaskKeeper({n: torch.ones_like(p, dtype=torch.bool) for n, p in dense.named_parameters()
                                   if n in targets}))
    omp = magnitude_masks({n: p for n, p in dense.named_parameters() if n in targets}, 0.4, scope)
    assert saved.keys() == omp.keys() and all(torch.equal(saved[n], omp[n]) for n in targets)


# -- the command ------------------------------------------------------------------------------------------------
def test_finetune_command_on_a_tiny_bert(tmp_path, capsys):
    src, task = tiny_bert(tmp_path / "bert"), sentiment_csv(tmp_path / "sentiment.csv")
    assert main(["finetune", str(src), "--task", str(task), "--sparsity", "0.5", "--max-steps", "4", "--lr", "1e-3",
                 "--batch-size", "8", "--format", "bitmask", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    payload = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert payload["achieved"] == 0.5 and payload["pruned"][0]["steps"] == 4
    report = json.loads((tmp_path / "ft" / "checkpoint" / "sparsity.json").read_text())
    assert report["finetuned"]["task"]["name"] == "sentiment" and report["finetuned"]["steps"] == 4
    assert report["format"] == "bitmask" and report["achieved"]["targeted"] == 0.5
    # the export holds the fine-tuned weights: its zeros are exactly the saved mask
    from llm_prune.study.similarity import load_masks

    masks, _ = load_masks(tmp_path / "ft" / "masks" / "omp.safetensors")
    from llm_prune import load

    model = load(tmp_path / "ft" / "checkpoint", progress=False)
    params = {n: p for n, p in model.state_dict().items()}
    for name, mask in masks.items():
        key = name if name in params else f"bert.{name}"
        assert torch.equal(params[key] != 0, mask)
    out = capsys.readouterr().out
    assert "fine-tuned on sentiment" in out and "drop" in out


def test_lth_command_saves_a_mask_per_round(tmp_path, capsys):
    src, task = tiny_bert(tmp_path / "bert"), sentiment_csv(tmp_path / "sentiment.csv")
    assert main(["finetune", str(src), "--task", str(task), "--method", "lth", "--rounds", "2", "--sparsity", "0.75",
                 "--max-steps", "2", "--batch-size", "8", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    payload = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert [r["sparsity_after"] for r in payload["pruned"][0]["rounds"]] == [pytest.approx(0.5), 0.75]
    assert payload["achieved"] == 0.75
    assert main(["masks", "compare", str(tmp_path / "ft" / "masks" / "lth-round-2.safetensors"),
                 str(tmp_path / "ft" / "checkpoint"), "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    assert json.loads((tmp_path / "cmp" / "masks.json").read_text())["pairs"][0]["overall"]["cosine"] == 1.0


def test_finetune_command_on_a_tiny_vit(tmp_path):
    src = tiny_vit(tmp_path / "vit")
    assert main(["finetune", str(src), "--task", "digits", "--sparsity", "0.3", "--scope", "global", "--max-steps", "3",
                 "--batch-size", "16", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    payload = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert payload["task"]["kind"] == "image" and payload["achieved"] == pytest.approx(0.3, abs=1e-3)
    assert load_dir(tmp_path / "ft" / "checkpoint")  # a normal export


@pytest.mark.parametrize("args,match", [
    (["--task", "sst2", "MODEL=vit"], "sst2 is a text task"),
    (["--task", "digits"], "digits is an image task"),
    (["--task", "sst2", "--pattern", "2:7"], "not a multiple of 7"),
    (["--task", "sst2", "--method", "lth", "--rounds", "0"], "--rounds must be at least 1"),
    (["--task", "CSV-NO-LABEL"], "has no 'label' column"),
    (["--task", "sst2", "--method", "wanda"], "wanda needs calibration text"),
])
def test_bad_finetune_requests_are_one_line(tmp_path, capsys, args, match):
    bert, vit = tiny_bert(tmp_path / "bert"), tiny_vit(tmp_path / "vit")
    (tmp_path / "nolabel.csv").write_text("text\nhello\n")
    model = vit if "MODEL=vit" in args else bert
    args = [str(tmp_path / "nolabel.csv") if a == "CSV-NO-LABEL" else a for a in args if a != "MODEL=vit"]
    capsys.readouterr()
    assert main(["finetune", str(model), *args, "--max-steps", "1", "--out", str(tmp_path / "ft"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "ft").exists() and not (tmp_path / ".ft.partial").exists()


def test_sweep_with_finetune_gives_the_encoder_curve_and_its_knee(tmp_path, capsys):
    src, task = tiny_bert(tmp_path / "bert"), sentiment_csv(tmp_path / "sentiment.csv")
    common = ["--finetune", str(task), "--sparsities", "0.3,0.6", "--seeds", "0,1", "--max-steps", "2",
              "--batch-size", "8", "--quiet"]
    assert main(["sweep", str(src), "--method", "omp", *common, "--out", str(tmp_path / "omp")]) == 0
    sweep = json.loads((tmp_path / "omp" / "sweep.json").read_text())
    assert [lv["achieved"] for lv in sweep["levels"]] == pytest.approx([0.3, 0.6], abs=1e-3)
    assert "sentiment/accuracy" in sweep["knees"] and sweep["curves"]["sentiment/accuracy"]["stderr"][0] is not None
    (protocol,) = sweep["protocol"]  # the fine-tune split and settings, not an lm-eval task's
    assert protocol.startswith("sentiment: ") and "lm-eval" not in protocol and "seeds 0, 1" in protocol
    assert "max_steps 2" in protocol and "epochs" not in protocol and "batch_size 8" in protocol
    assert main(["sweep", str(src), "--method", "lth", "--rounds", "2", *common, "--out", str(tmp_path / "lth")]) == 0
    # OMP and LTH masks of the same level compare directly
    assert main(["masks", "compare", str(tmp_path / "omp" / "masks" / "0.6" / "omp.safetensors"),
                 str(tmp_path / "lth" / "masks" / "0.6" / "lth-round-2.safetensors"), "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    cosine = json.loads((tmp_path / "c" / "masks.json").read_text())["pairs"][0]["overall"]["cosine"]
    assert 0 < cosine < 1


def test_lth_sweep_is_one_chain_of_rounds_and_resumes_bit_for_bit(tmp_path, capsys):
    # A lottery-ticket sweep is one chain per seed: dense -> 0.3 -> 0.6, the 0.6 ticket pruned from
    # the trained 0.3 ticket. Run at once or level by level (--resume), it is the same chain to the
    # bit; its masks nest; and the first level is the one-level ticket of `llm-prune finetune`.
    from llm_prune.study.similarity import load_masks

    src, task = tiny_bert(tmp_path / "bert"), sentiment_csv(tmp_path / "sentiment.csv")
    common = ["--finetune", str(task), "--method", "lth", "--rounds", "1", "--seeds", "0,1", "--max-steps", "2",
              "--batch-size", "8", "--quiet"]
    assert main(["sweep", str(src), *common, "--sparsities", "0.3,0.6", "--out", str(tmp_path / "once")]) == 0
    assert main(["sweep", str(src), *common, "--sparsities", "0.3", "--out", str(tmp_path / "steps")]) == 0
    assert main(["sweep", str(src), *common, "--sparsities", "0.3,0.6", "--out", str(tmp_path / "steps"), "--resume"]) == 0
    once, steps = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("once", "steps"))
    assert once["curves"] == steps["curves"] and [lv["achieved"] for lv in once["levels"]] == pytest.approx([0.3, 0.6], abs=1e-3)
    for level in ("0.3", "0.6"):
        assert (tmp_path / "once" / "masks" / level / "lth-round-1.safetensors").read_bytes() == \
               (tmp_path / "steps" / "masks" / level / "lth-round-1.safetensors").read_bytes()
    runs = json.loads((tmp_path / "once" / "levels" / "0.6.json").read_text())["runs"]
    assert [r["start_sparsity"] for r in runs] == [0.3, 0.3] and [r["rounds"][0]["sparsity_after"] for r in runs] == [0.6, 0.6]
    low, _ = load_masks(tmp_path / "once" / "masks" / "0.3" / "lth-round-1.safetensors")
    high, _ = load_masks(tmp_path / "once" / "masks" / "0.6" / "lth-round-1.safetensors")
    assert all(not (high[n] & ~low[n]).any() for n in low)  # every weight pruned at 0.3 stays pruned at 0.6
    assert sorted(p.name for p in (tmp_path / "once" / "tickets").iterdir()) == ["0.6"]  # only the last level's are kept
    assert main(["finetune", str(src), "--task", str(task), "--method", "lth", "--rounds", "1", "--sparsity", "0.3",
                 "--seeds", "0,1", "--max-steps", "2", "--batch-size", "8", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    ft = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    first = json.loads((tmp_path / "once" / "levels" / "0.3.json").read_text())["runs"]
    assert [r["metrics"] for r in ft["pruned"]] == [r["metrics"] for r in first]
    # a level below the chain's last cannot join it
    capsys.readouterr()
    assert main(["sweep", str(src), *common, "--sparsities", "0.2,0.3,0.6", "--out", str(tmp_path / "once"),
                 "--resume"]) == 2
    assert "one chain of rounds up its levels: 0.2 is below the finished 0.6" in capsys.readouterr().err


@pytest.mark.slow
def test_data_parallel_plumbing_under_accelerate_launch_on_cpu(tmp_path):
    """Two gloo processes on the CPU: both train (the Trainer's DDP), rank 0 alone writes."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    src, task = tiny_bert(tmp_path / "bert"), sentiment_csv(tmp_path / "sentiment.csv")
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "llm_prune.cli", "finetune", str(src), "--task", str(task),
           "--max-steps", "3", "--batch-size", "4", "--out", str(tmp_path / "ft"), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert payload["world_size"] == 2 and payload["pruned"][0]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "cache", "ft", "sentiment.csv"]  # one output


def _train_with_keeper(model, keep, opt, steps):
    keeper = MaskKeeper(keep).attach(model)
    for _ in range(steps):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        keeper.after_step(model, opt)
        opt.zero_grad()
    return dict(model.named_parameters())


def test_an_optimizer_that_puts_mass_anywhere_is_cleaned():
    class Drifting(torch.optim.Optimizer):  # state grows everywhere, gradient or not
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    trace = self.state[p].setdefault("trace", torch.zeros_like(p))
                    trace.add_(1.0)
                    p.data.add_(0.1 * trace)

    model, keep = _model_and_masks()
    opt = Drifting(model.parameters())
    params = _train_with_keeper(model, keep, opt, steps=3)
    for name, mask in keep.items():
        assert not params[name][~mask].any() and not opt.state[params[name]]["trace"][~mask].any()


def test_state_from_before_the_mask_is_cleaned_once_for_adamw():
    model, keep = _model_and_masks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()  # dense state everywhere, as when a run resumes with a new mask
    opt.zero_grad()
    params = _train_with_keeper(model, keep, opt, steps=3)
    for name, mask in keep.items():
        state = opt.state[params[name]]
        assert not params[name][~mask].any()
        assert not state["exp_avg"][~mask].any() and not state["exp_avg_sq"][~mask].any()


def test_lth_first_round_is_the_cached_dense_run(tmp_path):
    # Round 1 of a lottery ticket fine-tunes the dense model from the pre-trained weights: the very
    # run the dense baseline made. Taken from the cache, the ticket is the same to the bit; a dense
    # result cached without its weights (an older cache) gets them from the first ticket's round 1.
    from llm_prune.finetune.run import FinetuneConfig, _dense_path, dense_run, prepare_task, pruned_run
    from llm_prune.finetune.train import TrainConfig

    src, task_csv = tiny_bert(tmp_path / "bert"), sentiment_csv(tmp_path / "sentiment.csv")
    cfg = FinetuneConfig(task=str(task_csv), method="lth", sparsity=Sparsity(0.6), rounds=2,
                         train=TrainConfig(max_steps=3, batch_size=8), seeds=(0,))
    task = prepare_task(src, cfg)
    dense = dense_run(src, task, cfg, 0, progress=False)
    weights = _dense_path(src, task, cfg, 0).with_suffix(".safetensors")
    weights.unlink()
    runs = {}
    for name, reuse in (("trained, kept", True), ("reused", True), ("trained", False)):
        (tmp_path / name).mkdir()
        result, model, _ = pruned_run(src, task, cfg, 0, tmp_path / name, tmp_path / name / "m", False, reuse_dense=reuse)
        runs[name] = (result, {n: t.clone() for n, t in model.state_dict().items()})
        assert weights.is_file()  # kept by the first ticket
    ref, ref_weights = runs["trained"]
    for name, (result, state) in runs.items():
        assert result["rounds"][0]["metrics"]["metrics"] == dense["metrics"]
        assert result["metrics"] == ref["metrics"] and result["achieved"] == ref["achieved"]
        assert all(torch.equal(bits(state[n]), bits(ref_weights[n])) for n in state), name
        for r in (1, 2):
            assert (tmp_path / name / "m" / f"lth-round-{r}.safetensors").read_bytes() == \
                   (tmp_path / "trained" / "m" / f"lth-round-{r}.safetensors").read_bytes()
