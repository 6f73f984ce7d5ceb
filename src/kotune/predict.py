"""`kotune predict`: run a text-classification or text2text run over a CSV/JSONL file.

Each output line is the input record plus `prediction` (and `score`, the predicted
label's probability, for classification). When the file also holds the target
column, the summary scores the predictions (accuracy and macro-F1, or exact match).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .config import input_column, target_column
from .data import DataError, read_text
from .errors import ModelError
from .model import load_run, run_labels
from .runfolder import check_output_file, require_run
from .tasks import _pad, classification_metrics, confusion


def read_inputs(path: str | Path, text_col: str, encoding: str | None = None) -> list[dict]:
    """Records of a CSV or JSONL file; each must have a non-empty `text_col`."""
    p = Path(path)
    if not p.is_file():
        raise DataError([f"{p}: file not found."])
    text, _ = read_text(p, encoding)
    if p.suffix.lower() in (".jsonl", ".json"):
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError([f"{p}: line {i} is not valid JSON ({e.msg})."]) from None
                if not isinstance(rec, dict):
                    raise DataError([f"{p}: line {i} is not a JSON object."])
                records.append((f"line {i}", rec))
    else:
        records = [(f"row {i}", dict(r)) for i, r in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2)]
    problems = [
        f"{p}: {where} has no `{text_col}` text (set `data.text_column` in the run's config, or fix the row)."
        for where, r in records
        if not str(r.get(text_col) or "").strip()
    ]
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{p}: no records."])
    return [r for _, r in records]


def predict_records(model, tok, cfg, texts: list[str], labels: list[str] | None, batch_size: int = 16) -> list[dict]:
    import torch

    device = next(model.parameters()).device
    out = []
    for k in range(0, len(texts), batch_size):
        chunk = texts[k : k + batch_size]
        rows = [tok(t, add_special_tokens=True)["input_ids"][: cfg.data.max_length] for t in chunk]
        ids, mask = _pad(rows, tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            if labels is not None:
                probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
                score, idx = probs.max(-1)
                out += [{"prediction": labels[int(i)], "score": round(float(s), 4)} for i, s in zip(idx, score)]
            else:
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=cfg.generation.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
                out += [{"prediction": tok.decode(g, skip_special_tokens=True).strip()} for g in gen]
    return out


def predict_file(
    run: str | Path, input_path: str | Path, output: str | Path | None = None, batch_size: int = 16
) -> dict:
    """Predict every record of `input_path`; write JSONL to `output` (or return the records)."""

    cfg = require_run(run, "config")
    task = cfg.model.task
    if task == "causal-lm":
        raise ModelError(
            f"{run} is a causal-lm run: use `kotune ask` / `kotune chat` for it. `predict` is for "
            "text-classification and text2text runs."
        )
    text_col, gold_col = input_column(cfg.data, task), target_column(cfg.data, task)
    records = read_inputs(input_path, text_col, cfg.data.encoding)  # before the model loads: a bad file fails at once
    if output is not None:
        check_output_file(Path(output), Path(run), inputs=(Path(input_path),))
    model, tok, cfg = load_run(run)
    labels = run_labels(Path(run)) if task == "text-classification" else None
    preds = predict_records(model, tok, cfg, [str(r[text_col]) for r in records], labels, batch_size)
    rows = [{**r, **p} for r, p in zip(records, preds)]
    summary = {"records": len(rows), "task": task}
    scored = [r for r in rows if str(r.get(gold_col) or "").strip()]
    if scored:
        summary["scored"] = len(scored)
        if labels is not None:
            import torch

            index = {n: i for i, n in enumerate(labels)}
            known = [r for r in scored if str(r[gold_col]).strip() in index]
            if known:
                gold = torch.tensor([index[str(r[gold_col]).strip()] for r in known])
                pred = torch.tensor([index[r["prediction"]] for r in known])
                summary.update(classification_metrics(confusion(pred, gold, len(labels))))
            summary["unknown_gold_labels"] = len(scored) - len(known)
        else:
            summary["exact_match"] = sum(r["prediction"] == str(r[gold_col]).strip() for r in scored) / len(scored)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary["rows"] = rows
    return summary
