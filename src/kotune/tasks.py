"""What differs between the tasks: how rows become tensors, the loss of a batch and
the evaluation metrics. The training loop (`train.py`) is the same for all three.

- `causal-lm`: prompt + answer + EOS through a decoder; loss on answer tokens and EOS.
- `text-classification`: text → one label id; loss and count per row.
- `text2text`: input → target through an encoder-decoder; loss on target tokens.

Every loss here is a *sum* with its count of trained units (tokens or rows), so the
loop can normalise by the count of the whole optimizer step, across micro-batches
and processes alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompt import IGNORE, Encoded, collate as collate_causal, encode_all

TASKS = ("causal-lm", "text-classification", "text2text")


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
            errors.append(f"{ex.source}: label {ex.answer!r} does not occur in the training rows "
                          f"(known: {', '.join(sorted(label2id))}); fix the label or add training rows for it.")
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


def encode(task: str, tokenizer, examples, *, template: str, max_length: int, too_long: str,
           label2id: dict[str, int] | None = None, contexts: list[str] | None = None):
    if task == "text-classification":
        return encode_classification(tokenizer, examples, label2id or {}, max_length, too_long)
    if task == "text2text":
        return encode_seq2seq(tokenizer, examples, max_length, too_long)
    return encode_all(tokenizer, examples, template, max_length, too_long, contexts)


def render_item(tokenizer, item, labels: list[str] | None = None) -> str:
    """Dry-run view of one encoded non-causal item."""
    text = tokenizer.decode(item.input_ids)
    if isinstance(item, ClassItem):
        return f"source: {item.source}\ninput ({len(item.input_ids)} tokens): {text!r}\nlabel: {item.label} = {labels[item.label]!r}"
    return (f"source: {item.source}\ninput ({len(item.input_ids)} tokens): {text!r}\n"
            f"target ({len(item.labels)} tokens, last is EOS id {item.labels[-1]}): {tokenizer.decode(item.labels)!r}")


# ---------------------------------------------------------------- batches

def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
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

    The LM head runs only at trained positions: with Gemma's 262k vocabulary the
    full logits tensor would dominate time and memory."""
    import torch
    import torch.nn.functional as F

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(hf, hf.base_model_prefix)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = hf.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
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
