"""Everything before the first optimizer step: load and split the data, load the
tokenizer, add each row's grounding context (retrieved articles), encode and check one sample; the dry-run report.

Shared by `kotune train --dry_run` and training itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .chat import chat_stop_ids, check_chat_encoded, use_chat_template
from .config import ConfigError, KotuneConfig, input_column, target_column
from .data import DataError, load_examples
from .grounding import for_training
from .model import load_tokenizer, resolve_model
from .prompt import check_encoded, length_stats, render_sample
from .tasks import encode, label_names, render_item


def load_split(cfg: KotuneConfig):
    """Training and evaluation examples with every problem counted in the log."""
    d = cfg.data
    task = cfg.model.task
    if d.train_file is None and d.dataset_name is None:
        raise ConfigError(
            [
                "`data.train_file` or `data.dataset_name`: set one of them to the training data, e.g. "
                "`--set data.train_file=data/civil_law_qa.csv`."
            ]
        )
    common = dict(
        encoding=d.encoding,
        question_column=input_column(d, task),
        answer_column=target_column(d, task),
        bad_rows=d.bad_rows,
        duplicates=d.duplicates,
        chat=d.format == "chat",
    )
    train_ex, rep = load_examples(
        d.train_file,
        dataset_name=d.dataset_name,
        dataset_split=d.dataset_split,
        dataset_cache_dir=d.dataset_cache_dir,
        **common,
    )
    reports = [rep]
    if d.eval_file:
        eval_ex, erep = load_examples(d.eval_file, **common)
        reports.append(erep)
    elif d.eval_ratio > 0 and len(train_ex) >= 10:
        order = list(range(len(train_ex)))
        random.Random(cfg.training.seed).shuffle(order)
        n_eval = max(1, int(round(len(train_ex) * d.eval_ratio)))
        held = set(order[:n_eval])
        eval_ex = [e for i, e in enumerate(train_ex) if i in held]
        train_ex = [e for i, e in enumerate(train_ex) if i not in held]
    else:
        eval_ex = []
    return train_ex, eval_ex, reports


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        # Sort within shuffled mega-batches: little padding, order still random across epochs.
        mega = batch_size * 16
        order = [i for k in range(0, len(order), mega) for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def split_by_tokens(rows: list[int], lengths: list[int], budget: int | None) -> list[list[int]]:
    """`rows` as consecutive parts whose padded size (rows × longest row) stays within `budget` tokens (a part is
    never empty; one row longer than the budget is a part of its own). None: one part."""
    if not budget:
        return [rows]
    parts: list[list[int]] = [[]]
    for i in rows:
        part = parts[-1]
        if part and (len(part) + 1) * max(lengths[j] for j in part + [i]) > budget:
            parts.append([i])
        else:
            part.append(i)
    return parts


@dataclass
class Prepared:
    """What training needs before its first step, from `prepare`."""

    resolved: Any  # model.ResolvedModel: where the base model is, its preset and licence notice
    tokenizer: Any
    train: list  # encoded training rows (tasks.encode)
    eval: list  # encoded evaluation rows
    reports: list  # data.DataReport per file: rows read, skipped and why
    long_rows: list[str]  # rows over data.max_length, as messages naming the file and row
    stats: dict  # token-length percentiles of the training rows
    labels: list[str] | None = None  # text-classification label names, in id order
    grounding: Any = None  # grounding.TrainingGrounding of a grounded run: it saves its files into the run folder


def prepare(cfg: KotuneConfig) -> Prepared:
    """Load data and tokenizer, encode, and check one sample. Shared by dry-run and training."""

    train_ex, eval_ex, reports = load_split(cfg)
    resolved = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tok = load_tokenizer(resolved, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    d, task = cfg.data, cfg.model.task
    chat = d.format == "chat"
    if chat:
        # The run folder saves this tokenizer (`save_pretrained` writes its chat template), so answering renders
        # prompts with the template training used.
        use_chat_template(tok, d.chat_template, cfg.model.name)
    grounding = for_training(cfg.retrieval, train_ex, eval_ex, cfg.training.seed)
    train_ctx, eval_ctx = (grounding.train_contexts, grounding.eval_contexts) if grounding else (None, None)
    labels = label2id = None
    if task == "text-classification":
        labels = label_names(train_ex)
        if len(labels) < 2:
            raise DataError(
                [
                    f"{reports[0].path}: the label column has {len(labels)} distinct value(s) "
                    f"({', '.join(labels)}); classification needs at least two. Check `data.label_column`."
                ]
            )
        label2id = {name: i for i, name in enumerate(labels)}
    common = dict(
        template=d.template,
        max_length=d.max_length,
        too_long=d.too_long,
        label2id=label2id,
        chat=chat,
        system=d.system_prompt,
    )
    train_enc, long_rows, errors, lengths = encode(task, tok, train_ex, contexts=train_ctx, **common)
    eval_enc, elong, eerrors, _ = encode(task, tok, eval_ex, contexts=eval_ctx, **common)
    errors += eerrors
    long_rows += elong
    if errors:
        raise DataError(errors)
    if long_rows and d.too_long == "error":
        raise DataError([r + "; raise `data.max_length` or shorten the row" for r in long_rows])
    if not train_enc:
        raise DataError([f"no training rows fit in max_length {d.max_length}; raise `data.max_length`."])
    if task == "causal-lm" and chat:
        stops = chat_stop_ids(tok)
        for enc in train_enc:
            check_chat_encoded(enc, stops, tok.pad_token_id, tok)
    elif task == "causal-lm":
        check_encoded(train_enc[0], tok.eos_token_id, tok.pad_token_id)
    stats = length_stats(lengths, d.max_length)
    return Prepared(
        resolved=resolved,
        tokenizer=tok,
        train=train_enc,
        eval=eval_enc,
        reports=reports,
        long_rows=long_rows,
        stats=stats,
        labels=labels,
        grounding=grounding,
    )


def dry_run_report(cfg: KotuneConfig, prep: Prepared) -> str:
    lines = ["# resolved config", cfg.to_yaml(), "# data"]
    lines += [r.summary() for r in prep.reports]
    lines.append(f"train rows: {len(prep.train)}, eval rows: {len(prep.eval)}")
    s = prep.stats
    lines.append(
        f"token lengths ({prep.resolved.path} tokenizer): p50 {s['p50']}, p90 {s['p90']}, p95 {s['p95']}, "
        f"p99 {s['p99']}, max {s['max']}; rows over max_length {cfg.data.max_length}: {s['over_max_length']} "
        f"({'dropped' if cfg.data.too_long == 'drop' else 'error'})"
    )
    for r in prep.long_rows[:10]:
        lines.append(f"  too long: {r}")
    if cfg.model.task == "causal-lm":
        if cfg.data.format == "chat":
            tok = prep.tokenizer
            stops = ", ".join(f"{tok.convert_ids_to_tokens(i)!r} (id {i})" for i in chat_stop_ids(tok))
            lines.append(f"format: chat (the tokenizer's chat template); generation stops on {stops}")
        lines += [
            "",
            "# one training sample (⟦trained⟧ tokens; the rest is masked)",
            render_sample(prep.tokenizer, prep.train[0]),
        ]
    else:
        if prep.labels:
            lines.append(f"labels ({len(prep.labels)}): {', '.join(prep.labels)}")
        lines += [
            "",
            f"# one training sample ({cfg.model.task})",
            render_item(prep.tokenizer, prep.train[0], prep.labels),
        ]
    return "\n".join(lines)
