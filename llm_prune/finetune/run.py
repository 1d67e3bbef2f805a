"""``llm-prune finetune``: prune the pre-trained checkpoint once, fine-tune the kept weights, compare with dense.

    pre-trained checkpoint ──► prune_checkpoint (the LLM path's pruner and arch data) ──► classifier
        (omp, any data-free method)                                                       + MaskKeeper
        (lth: rounds of fine-tune -> magnitude prune -> rewind, lth.py)                   ──► Trainer
    dense: the same fine-tuning without pruning, cached per checkpoint, task, settings and seed
    the fine-tuned sparse model ──► a normal export (any format), sparsity.json saying how it was tuned

Several seeds (``--seeds``) give the spread: every number is reported per seed, as a mean, and
with the seeds' standard deviation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import PruneConfig, Sparsity
from ..errors import UserError
from ..paths import atomic_save_tensors, atomic_write_text, cache_dir
from .tasks import Task, load_task
from .train import TrainConfig, binomial_stderr, check_model_for_task, finetune, load_classifier


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "sst2"
    method: str = "omp"  # "lth", or any data-free pruning method
    sparsity: Sparsity = field(default_factory=lambda: Sparsity(0.5))
    scope: str = "layer"
    rounds: int = 3  # lth
    targets: tuple[str, ...] = ("*.weight",)
    exclude: tuple[str, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: tuple[int, ...] = (0,)
    split_seed: int = 0
    test_frac: float = 0.3
    data: str = "local"

    def __post_init__(self):
        if self.method == "lth":
            if self.rounds < 1:
                raise UserError(f"--rounds must be at least 1, got {self.rounds}")
            if self.sparsity.is_nm:
                raise UserError("lottery tickets prune a fraction of the remaining weights each round; "
                                "an N:M pattern does not apply (use --method omp --pattern N:M)")
        else:
            from ..methods import get_method

            method = get_method(self.method)
            if method.needs_calibration:
                raise UserError(f"{self.method} needs calibration text, which a classifier task does not give: "
                                "use omp or lth")
            method.check(self.prune_config())
        if not self.seeds:
            raise UserError("give at least one seed")

    def prune_config(self, sparsity: Sparsity | None = None) -> PruneConfig:
        method = "omp" if self.method == "lth" else self.method
        return PruneConfig(method, sparsity or self.sparsity, self.scope, self.targets, self.exclude)

    def to_json(self) -> dict:
        d = asdict(self)
        d["sparsity"], d["pattern"] = self.sparsity.ratio, str(self.sparsity) if self.sparsity.is_nm else None
        d["train"] = self.train.to_json()
        return d


def run_finetune(src: Path, cfg: FinetuneConfig, out, *, fmt: str = "dense", progress: bool = True,
                 source_name: str | None = None, export_model: bool = True) -> dict:
    """Dense vs pruned fine-tuning over ``cfg.seeds``; the first seed's sparse model is exported into
    ``out/checkpoint`` (``export_model``). Returns finetune.json's payload."""
    task = prepare_task(src, cfg)
    dense = [dense_run(src, task, cfg, seed, progress) for seed in cfg.seeds]
    pruned = []
    for i, seed in enumerate(cfg.seeds):
        result, model, processor = pruned_run(src, task, cfg, seed, out.tmp, out / "masks", progress)
        pruned.append(result)
        if i == 0 and export_model:
            export(model, processor, task, cfg, out / "checkpoint", fmt, result, source_name or str(src))
        del model
    return payload(src, task, cfg, dense, pruned, source_name or str(src))


def prepare_task(src: Path, cfg: FinetuneConfig) -> Task:
    """The task, checked against the model and the pruning settings before any training."""
    from ..arch import arch_for
    from ..reader import CheckpointReader
    from ..targets import select_targets

    task = load_task(cfg.task, split_seed=cfg.split_seed, test_frac=cfg.test_frac, data=cfg.data, model_dir=src)
    check_model_for_task(src, task)
    reader = CheckpointReader(src)
    arch = arch_for(reader.config)
    select_targets(reader.units(arch), reader.infos, arch, cfg.prune_config())  # patterns, dtypes, targets
    return task


def dense_run(src: Path, task: Task, cfg: FinetuneConfig, seed: int, progress: bool) -> dict:
    """The dense model fine-tuned with these settings and seed: from the cache when it ran before.
    The fine-tuned weights are cached beside the result: a lottery ticket's first round is this
    very run (``dense_weights``)."""
    path = _dense_path(src, task, cfg, seed)
    try:
        return {**json.loads(path.read_text()), "cached": True}
    except (OSError, ValueError):
        pass
    model, processor = load_classifier(src, task, seed)
    result = {"seed": seed, **finetune(model, processor, task, _seeded(cfg.train, seed), progress=progress)}
    _save_dense_state(path, model)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _save_dense_state(path: Path, model) -> None:
    save_state(path.with_suffix(".safetensors"), model)


def save_state(path: Path, model) -> None:
    """``model``'s state dict as a safetensors file at ``path``, written whole or not at all."""
    atomic_save_tensors(path, {n: t.detach().cpu().clone() for n, t in model.state_dict().items()})  # clones: no shared storage


def dense_weights(path: Path):
    """(result, state dict) of the cached dense fine-tune at ``path`` (``_dense_path``), or None
    when not cached (or cached by a version that kept only the result)."""
    try:
        result = {k: v for k, v in json.loads(path.read_text()).items() if k != "seed"}
        from safetensors.torch import load_file

        return result, load_file(path.with_suffix(".safetensors"))
    except (OSError, ValueError):
        return None


def _dense_path(src: Path, task: Task, cfg: FinetuneConfig, seed: int) -> Path:
    from ..eval.results import checkpoint_id

    key = {"checkpoint": checkpoint_id(src), "task": task.to_json(), "train": cfg.train.to_json(), "seed": seed,
           "world_size": int(os.environ.get("WORLD_SIZE", "1"))}  # the global batch is per device x processes
    return cache_dir() / "finetune-baselines" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
                                                 + ".json")


def pruned_run(src: Path, task: Task, cfg: FinetuneConfig, seed: int, work: Path, masks: Path | None,
               progress: bool, reuse_dense: bool = True, start: tuple[float, dict, dict] | None = None):
    """(result, the fine-tuned sparse model, its tokenizer or image processor) for one seed; scratch
    files go under ``work``, and the first seed's keep-masks into the folder ``masks`` (None: kept nowhere).
    A lottery ticket's first round (the dense fine-tune, nothing pruned yet) is the cached dense
    run of this seed when there is one (``reuse_dense``): the same training, done once. ``start``
    (sparsity, result, state dict of a trained sparser ticket of this seed) continues that ticket's
    chain of rounds instead of starting from dense."""
    from ..pipeline import prune_checkpoint
    from .lth import lottery_ticket, snapshot
    from .mask_keeper import MaskKeeper

    train = _seeded(cfg.train, seed)
    keep_masks = masks is not None and seed == cfg.seeds[0]
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        if cfg.method == "lth":
            model, processor = load_classifier(src, task, seed)
            targets = target_params(model, src, cfg)
            if start is not None:
                first, keep_first = start[1:], None
            else:
                dense = _dense_path(src, task, cfg, seed)
                first = dense_weights(dense) if reuse_dense else None
                # a dense result cached without its weights (an older cache) gets them from round 1
                keep_first = (lambda m: _save_dense_state(dense, m)) if reuse_dense and first is None and dense.is_file() else None
            runs = lottery_ticket(model, snapshot(model), targets, cfg.sparsity.ratio, cfg.rounds, cfg.scope,
                                  lambda m, keeper: finetune(m, processor, task, train, keeper=keeper, progress=progress),
                                  lambda r, m: _save_masks(masks / f"lth-round-{r}.safetensors" if keep_masks else None,
                                                           m, cfg, r),
                                  first_round=first, keep_first=keep_first, start=start[0] if start else 0.0)
            result = {"seed": seed, **runs["final"], "rounds": runs["rounds"],
                      "per_round_fraction": runs["per_round_fraction"], "start_sparsity": runs["start"]}
        else:
            pruned_dir = Path(scratch) / "pruned"
            prune_checkpoint(src, cfg.prune_config(), pruned_dir, progress=False)
            model, processor = load_classifier(pruned_dir, task, seed)
            targets = target_params(model, pruned_dir, cfg)
            keeper = MaskKeeper.from_zeros(model, list(targets))
            if keep_masks:
                _save_masks(masks / f"{cfg.method}.safetensors", {targets[n]: m for n, m in keeper.masks.items()}, cfg, 0)
            result = {"seed": seed, **finetune(model, processor, task, train, keeper=keeper, progress=progress)}
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in targets)
    result["achieved"] = zeros / max(sum(params[n].numel() for n in targets), 1)
    return result, model, processor


def target_params(model, checkpoint: Path, cfg: FinetuneConfig) -> dict[str, str]:
    """The classifier's parameters the pruner targets in ``checkpoint``: model name -> checkpoint name."""
    from ..arch import arch_for
    from ..loading.decode import DenseSource
    from ..loading.hf import model_names
    from ..reader import CheckpointReader
    from ..targets import select_targets, target_order

    source = DenseSource(CheckpointReader(checkpoint))
    arch = arch_for(source.reader.config)
    units = source.units(arch)
    select_targets(units, source.infos, arch, cfg.prune_config())
    names = model_names(model, target_order(units))
    return {model_name: n for n, model_name in names.items()}


def _save_masks(path: Path | None, masks: dict, cfg: FinetuneConfig, round_: int) -> None:
    if path is None:
        return
    from ..study.similarity import save_masks

    path.parent.mkdir(parents=True, exist_ok=True)
    save_masks(path, masks, {"method": cfg.method, "sparsity": str(cfg.sparsity), "scope": cfg.scope,
                             "round": str(round_), "task": cfg.task})


def _seeded(train: TrainConfig, seed: int) -> TrainConfig:
    from dataclasses import replace

    return replace(train, seed=seed)


def export(model, processor, task: Task, cfg: FinetuneConfig, out: Path, fmt: str, result: dict,
           source_name: str) -> dict:
    """The fine-tuned sparse model as a normal llm-prune export. Its zeros are the mask, held
    exactly through training, so pruning it again with the same settings keeps every weight."""
    from ..pipeline import prune_checkpoint

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)  # the tokenizer or image processor travels with the model
        note = {"finetuned": {"task": task.to_json(), "method": cfg.method, "rounds": cfg.rounds if cfg.method == "lth" else None,
                              "train": cfg.train.to_json(), "seed": result["seed"], "steps": result["steps"],
                              "epochs": result["epochs"], "metrics": result["metrics"], "from": source_name}}
        return prune_checkpoint(scratch, cfg.prune_config(), out, fmt=fmt, progress=False, source_name=source_name,
                                extra_report=note)


def summary(runs: list[dict], metric: str) -> dict:
    values = [r["metrics"][metric] for r in runs]
    sd = statistics.stdev(values) if len(values) > 1 else None
    n = runs[0].get("test_n", 0)
    return {"mean": statistics.fmean(values), "std": sd, "values": values,
            "stderr_over_seeds": sd / math.sqrt(len(values)) if sd is not None else None,
            "binomial_stderr": binomial_stderr(statistics.fmean(values), n) if metric == "accuracy" else None}


def payload(src: Path, task: Task, cfg: FinetuneConfig, dense: list[dict], pruned: list[dict], source_name: str) -> dict:
    rows = {}
    for metric in task.metrics:
        d, p = summary(dense, metric), summary(pruned, metric)
        rows[metric] = {"dense": d, "pruned": p, "drop": d["mean"] - p["mean"]}
    return {"model": source_name, "source": str(src), "task": task.to_json(), "settings": cfg.to_json(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "metrics": rows, "dense": dense, "pruned": pruned,
            "achieved": statistics.fmean(r["achieved"] for r in pruned)}


def as_eval_result(runs: list[dict], task: Task) -> dict:
    """Fine-tuning results in the shape of an evaluation result (the sweep's knee reads both)."""
    entry = {"metrics": {}, "stderr": {}, "n": runs[0].get("test_n"), "seeds": [r["seed"] for r in runs]}
    for metric in task.metrics:
        s = summary(runs, metric)
        entry["metrics"][metric] = s["mean"]
        entry["stderr"][metric] = s["stderr_over_seeds"] if s["stderr_over_seeds"] is not None else s["binomial_stderr"]
    return {"tasks": {task.name: entry}, "protocol": task.described}
