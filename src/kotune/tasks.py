"""What differs between the tasks: how rows become tensors, the loss of a batch and
the evaluation metrics. The training loop (`train.py`) is the same for all three.

- `causal-lm`: prompt + answer + EOS through a decoder; loss on answer tokens and EOS (`data.format: chat`: a
  conversation through the tokenizer's chat template; loss on each assistant turn and its end-of-turn token).
- `text-classification`: text → one label id; loss and count per row.
- `text2text`: input → target through an encoder-decoder; loss on target tokens.

Every loss here is a *sum* with its count of trained units (tokens or rows), so the
loop can normalise by the count of the whole optimizer step, across micro-batches
and processes alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .chat import encode_all_chat
from .prompt import IGNORE, Encoded, encode_all
from .prompt import collate as collate_causal


@dataclass
class ClassItem:
    input_ids: list[int]
    label: int
    source: str


@dataclass
class Seq2SeqItem:
    input_ids: list[int]
    labels: list[int]
    source: str


def item_length(item) -> int:
    """Tokens the item costs in a batch (used to group rows of similar length)."""
    if isinstance(item, Seq2SeqItem):
        return len(item.input_ids) + len(item.labels)
    return len(item.input_ids)


# ---------------------------------------------------------------- encoding


def label_names(examples) -> list[str]:
    """Label names of the training rows, sorted so the ids do not depend on row order."""
    return sorted({ex.answer for ex in examples})


def encode_classification(tokenizer, examples, label2id: dict[str, int], max_length: int, too_long: str = "drop"):
    """Returns (kept, too_long_messages, errors, lengths) like `prompt.encode_all`."""
    kept, long_rows, errors, lengths = [], [], [], []
    for ex in examples:
        if ex.answer not in label2id:
            errors.append(
                f"{ex.source}: label {ex.answer!r} does not occur in the training rows "
                f"(known: {', '.join(sorted(label2id))}); fix the label or add training rows for it."
            )
            continue
        ids = tokenizer(ex.question, add_special_tokens=True)["input_ids"]
        lengths.append(len(ids))
        if len(ids) > max_length:
            long_rows.append(f"{ex.source}: {len(ids)} tokens > max_length {max_length}")
            if too_long == "drop":
                continue
        kept.append(ClassItem(ids, label2id[ex.answer], ex.source))
    return kept, long_rows, errors, lengths


def encode_seq2seq(tokenizer, examples, max_length: int, too_long: str = "drop"):
    """Input and target are tokenised apart; the target always ends with EOS so
    generation learns to stop."""
    eos = tokenizer.eos_token_id
    kept, long_rows, errors, lengths = [], [], [], []
    for ex in examples:
        src = tokenizer(ex.question, add_special_tokens=True)["input_ids"]
        tgt = tokenizer(text_target=ex.answer, add_special_tokens=True)["input_ids"]
        if not tgt or tgt[-1] != eos:
            tgt = tgt + [eos]
        lengths.append(max(len(src), len(tgt)))
        if max(len(src), len(tgt)) > max_length:
            long_rows.append(f"{ex.source}: input {len(src)} / target {len(tgt)} tokens > max_length {max_length}")
            if too_long == "drop":
                continue
        kept.append(Seq2SeqItem(src, tgt, ex.source))
    return kept, long_rows, errors, lengths


def encode(
    task: str,
    tokenizer,
    examples,
    *,
    template: str,
    max_length: int,
    too_long: str,
    label2id: dict[str, int] | None = None,
    contexts: list[str] | None = None,
    chat: bool = False,
    system: str | None = None,
):
    """Encode `examples` for `task`. `chat` (`data.format: chat`, causal-lm only): through the tokenizer's chat
    template with the `system` prompt (`chat.encode_all_chat`) instead of `template`."""
    if task == "text-classification":
        return encode_classification(tokenizer, examples, label2id or {}, max_length, too_long)
    if task == "text2text":
        return encode_seq2seq(tokenizer, examples, max_length, too_long)
    if chat:
        return encode_all_chat(tokenizer, examples, max_length, too_long, contexts, system)
    return encode_all(tokenizer, examples, template, max_length, too_long, contexts)


def render_item(tokenizer, item, labels: list[str] | None = None) -> str:
    """Dry-run view of one encoded non-causal item."""
    text = tokenizer.decode(item.input_ids)
    if isinstance(item, ClassItem):
        return (
            f"source: {item.source}\ninput ({len(item.input_ids)} tokens): {text!r}\n"
            f"label: {item.label} = {labels[item.label]!r}"
        )
    return (
        f"source: {item.source}\ninput ({len(item.input_ids)} tokens): {text!r}\n"
        f"target ({len(item.labels)} tokens, last is EOS id {item.labels[-1]}): {tokenizer.decode(item.labels)!r}"
    )


# ---------------------------------------------------------------- batches


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return out, mask


def collate(items: list, pad_id: int) -> dict:
    """Right-padded tensors for a list of items of one task."""
    import torch

    if isinstance(items[0], Encoded):
        return collate_causal(items, pad_id)
    ids, mask = _pad([it.input_ids for it in items], pad_id)
    if isinstance(items[0], ClassItem):
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it.label for it in items])}
    labels, _ = _pad([it.labels for it in items], IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count(task: str, batch: dict) -> int:
    """Trained units in a batch: answer tokens (causal-lm), rows (classification), target tokens (text2text)."""
    labels = batch["labels"]
    if task == "text-classification":
        return int(labels.numel())
    if task == "text2text":
        return int((labels != IGNORE).sum())
    return int((labels[:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------- losses


def answer_loss_sum(model, batch):
    """Sum of token losses over trained positions, and their count.

    The LM head runs only at trained positions, and there chunk by chunk
    (`linear_cross_entropy_sum`): with Gemma's 262k vocabulary the logits of a
    whole batch, and their gradient, would dominate time and peak memory."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf, hf.base_model_prefix)
    hidden = body(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    head = hf.get_output_embeddings()
    if getattr(head, "bias", None) is not None:  # no fused path for biased heads (none of the presets has one)
        import torch.nn.functional as F

        logits = head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())
    cap = getattr(hf.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep], softcap=cap)
    return loss, int(keep.sum())


CE_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 32M floats = 128 MiB in fp32


def linear_cross_entropy_sum(hidden, weight, targets, softcap: float | None = None):
    """`cross_entropy(hidden @ weight.T, targets, reduction="sum")` without ever holding
    more than one chunk of logits. With gradients on, each chunk's gradient with respect to
    `hidden` (and `weight`, when it is trained) is computed right away and kept instead of
    the logits — a fused linear + cross-entropy, as in Liger-Kernel or torchtune's chunked
    loss — so peak memory no longer grows with answer tokens × vocabulary. The matmuls run
    in the autocast dtype when autocast is on (as `nn.Linear` would), softmax in fp32."""
    import torch

    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    chunk = max(1, CE_CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _fused_ce().apply(hidden, weight, targets, softcap, chunk, dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        for s in range(0, hidden.shape[0], chunk):
            z = _logits(hidden[s : s + chunk].to(dtype), w, softcap)[0]
            total += (torch.logsumexp(z, -1) - z.gather(1, targets[s : s + chunk, None]).squeeze(1)).sum()
        return total


def _logits(h, w, softcap):
    """fp32 logits of one chunk (and tanh of the soft-cap, which the gradient needs)."""
    import torch

    z = (h @ w.T).float()
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


@functools.cache
def _fused_ce():
    """The autograd Function, built on first use so importing tasks.py does not import torch."""
    import torch

    class FusedLinearCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, softcap, chunk, dtype):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
            grad_w = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
            )
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                tgt = targets[s : s + chunk]
                z, t = _logits(h, w, softcap)
                lse = torch.logsumexp(z, -1)
                total += (lse - z.gather(1, tgt[:, None]).squeeze(1)).sum()
                g = z.sub_(lse[:, None]).exp_()  # softmax, in place: d(sum CE)/dz = softmax - onehot
                g[torch.arange(len(tgt), device=g.device), tgt] -= 1
                if t is not None:
                    g.mul_(1 - t * t)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = g @ w
                if grad_w is not None:
                    grad_w += (g.T @ h).float()
                del z, g, t
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            return (
                grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None,
                None,
                None,
                None,
                None,
            )

    return FusedLinearCE


def loss_sum(task: str, model, batch: dict):
    """(loss sum, trained units, predicted labels or None) for one batch on the model's device."""
    import torch.nn.functional as F

    if task == "text-classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss, int(batch["labels"].numel()), logits.argmax(-1)
    if task == "text2text":
        # `labels` makes the model build decoder inputs (shifted right from decoder_start_token_id);
        # the loss is summed here so micro-batches and processes can be normalised together.
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).logits
        keep = batch["labels"] != IGNORE
        loss = F.cross_entropy(logits[keep].float(), batch["labels"][keep], reduction="sum")
        return loss, int(keep.sum()), None
    loss, n = answer_loss_sum(model, batch)
    return loss, n, None


# ---------------------------------------------------------------- metrics


def confusion(preds, gold, n_labels: int):
    """n_labels × n_labels counts, rows = gold, columns = predicted (summable across processes)."""
    import torch

    idx = gold.to("cpu", torch.long) * n_labels + preds.to("cpu", torch.long)
    return torch.bincount(idx, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def classification_metrics(cm) -> dict:
    """Accuracy and macro-F1 from a confusion matrix. Macro-F1 averages over the labels
    that occur as gold or as prediction (as scikit-learn does by default)."""
    cm = cm.double()
    total = float(cm.sum())
    tp = cm.diag()
    gold, pred = cm.sum(1), cm.sum(0)
    present = (gold + pred) > 0
    f1 = (2 * tp / (gold + pred).clamp(min=1))[present]
    return {"accuracy": float(tp.sum()) / max(total, 1.0), "macro_f1": float(f1.mean()) if len(f1) else 0.0}
