"""Fine-tune a classifier on a task with transformers' ``Trainer``, the mask held by a ``MaskKeeper``.

The ``Trainer`` brings what users expect from it: AdamW with linear decay, progress bars, an
evaluation each epoch, and data parallelism under ``accelerate launch`` (one process per GPU;
gloo processes on CPU). Defaults are the paper's fine-tuning settings where they apply (AdamW,
lr 2e-5, linear decay, batch 32, 3 epochs).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .tasks import Task

ENCODER_FAMILIES = {"bert": "text", "vit": "image"}


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-5
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_length: int = 128  # text: tokens per example (pairs are truncated together)

    def __post_init__(self):
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("give --epochs > 0 or --max-steps > 0")
        if self.lr <= 0 or self.batch_size < 1 or self.max_length < 2:
            raise UserError("--lr must be > 0, --batch-size >= 1 and --max-length >= 2")

    def to_json(self) -> dict:
        return asdict(self)


def check_model_for_task(model_dir: Path, task: Task) -> str:
    """The model's family, refused in one line when it cannot classify this task's inputs."""
    from ..arch import arch_for

    config = json.loads((Path(model_dir) / "config.json").read_text())
    family = arch_for(config).family
    if family not in ENCODER_FAMILIES:
        raise UserError(f"fine-tuning takes BERT- and ViT-family encoders; {model_dir} is a {family} model")
    if ENCODER_FAMILIES[family] != task.kind:
        article = "an" if task.kind == "image" else "a"
        raise UserError(f"{task.name} is {article} {task.kind} task, and {model_dir} is a {family} "
                        f"({ENCODER_FAMILIES[family]}) model: it cannot read {task.kind} inputs")
    return family


def load_classifier(model_dir: Path, task: Task, seed: int):
    """(model with a classification head for the task's labels, its tokenizer or image processor).
    A head the checkpoint lacks is initialised from ``seed``, so reruns start from the same weights."""
    import transformers

    check_model_for_task(model_dir, task)
    auto = transformers.AutoModelForSequenceClassification if task.kind == "text" else transformers.AutoModelForImageClassification
    torch.manual_seed(seed)
    labels = {i: name for i, name in enumerate(task.labels)}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized" notes for the head: expected here
    try:
        model = auto.from_pretrained(model_dir, num_labels=len(labels), id2label=labels,
                                     label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if task.kind == "text":
        from ..runtime import load_tokenizer

        processor = load_tokenizer(model_dir, "fine-tuning on text")
    else:
        processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    return model, processor


class _Examples(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def encode(task: Task, processor, examples: list[dict], max_length: int) -> _Examples:
    """Examples as model inputs (token ids, or pixel values), one dict per example."""
    if task.kind == "text":
        cols = [[e[f] for e in examples] for f in task.text_fields]
        enc = processor(*cols, truncation=True, max_length=max_length, padding=False)
        items = [{k: enc[k][i] for k in enc} for i in range(len(examples))]
    else:
        pix = processor([_as_image(e["image"]) for e in examples], return_tensors="pt")["pixel_values"]
        items = [{"pixel_values": pix[i]} for i in range(len(examples))]
    for item, e in zip(items, examples):
        item["labels"] = e["label"]
    return _Examples(items)


def _as_image(x):
    from PIL import Image

    return x if isinstance(x, Image.Image) else Image.fromarray(x, mode="L")


def finetune(model, processor, task: Task, cfg: TrainConfig, *, keeper=None, progress: bool = True,
             work_dir: Path | None = None) -> dict:
    """Train ``model`` on ``task.train`` (mask kept by ``keeper`` when given), evaluating on
    ``task.test`` each epoch. Returns the final metrics, the per-epoch log and the time."""
    import transformers

    train, test = encode(task, processor, task.train, cfg.max_length), encode(task, processor, task.test, cfg.max_length)
    collate = (transformers.DataCollatorWithPadding(processor) if task.kind == "text"
               else transformers.default_data_collator)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        args = transformers.TrainingArguments(
            output_dir=scratch, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=max(cfg.batch_size, 64),
            weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", seed=cfg.seed,
            data_seed=cfg.seed, eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to=[],
            disable_tqdm=not progress, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                       data_collator=collate, compute_metrics=_metrics(task),
                                       callbacks=[keeper.callback()] if keeper is not None else None)
        if not progress:  # no bars, and no log lines either (the results come back as data)
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        t0 = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - t0
        final = trainer.evaluate()
    epochs = [{k: v for k, v in e.items() if k.startswith("eval_") or k in ("epoch", "loss")} for e in trainer.state.log_history]
    return {"metrics": {m: final[f"eval_{m}"] for m in task.metrics}, "eval_loss": final.get("eval_loss"),
            "steps": out.global_step, "epochs": trainer.state.epoch, "train_seconds": round(train_s, 3),
            "seconds_per_epoch": round(train_s / max(trainer.state.epoch or 1, 1e-9), 3),
            "log": [e for e in epochs if len(e) > 1], "test_n": len(task.test)}


def _metrics(task: Task):
    def compute(pred) -> dict:
        logits, labels = pred.predictions, pred.label_ids
        guess = logits.argmax(-1)
        out = {"accuracy": float((guess == labels).mean())}
        if "f1" in task.metrics:
            tp = float(((guess == 1) & (labels == 1)).sum())
            fp, fn = float(((guess == 1) & (labels == 0)).sum()), float(((guess == 0) & (labels == 1)).sum())
            out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        return out

    return compute


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
