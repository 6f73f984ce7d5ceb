"""Example questions: (question, cited articles) pairs that guide retrieval, read from Q&A files or
`{"question", "citations"}` lines and kept in a run folder; and each training row's context, as chat would build it."""

from __future__ import annotations

import json
from pathlib import Path

from ...data import load_examples, read_question_lines, read_text
from ..statutes import find_citations, format_cite


def example_pairs(rows) -> list[tuple[str, list[tuple[str, str]]]]:
    """(question, cited articles) of Q&A examples (anything with `.question` and `.answer`)."""
    return [(ex.question, find_citations(ex.answer)) for ex in rows]


def save_examples(pairs, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for q, cites in pairs:
            f.write(
                json.dumps({"question": q, "citations": [format_cite(*c) for c in cites]}, ensure_ascii=False) + "\n"
            )


def load_examples_file(path: str | Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """A run folder's `retrieval_examples.jsonl` (`{"question", "citations": [...]}` lines), or any
    Q&A training file (CSV/JSONL) kotune reads, whose answers' citations are used."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: example-question file not found. Give the training Q&A file "
            "(e.g. data/civil_law_qa.csv) or a run's retrieval_examples.jsonl."
        )
    first = ""
    if path.suffix == ".jsonl" and path.is_file():
        # Decoded as every data file is (UTF-8, with or without BOM, cp949, UTF-16), so a file saved in another
        # encoding gets the data reader's clear message rather than a UnicodeDecodeError here.
        first = read_text(path, None)[0].split("\n", 1)[0]
    if '"citations"' not in first:
        rows, _ = load_examples(path, bad_rows="skip", duplicates="keep")
        return example_pairs(rows)

    pairs = []
    for r in read_question_lines(path, ("question", "citations")):
        cites = r["citations"]
        if not isinstance(cites, list) or not all(isinstance(c, str) for c in cites):
            raise ValueError(
                f'{path}: record {r["id"]}: "citations" must be a list of strings such as ["민법 제281조"].'
            )
        pairs.append((r["question"], find_citations(" ".join(cites))))
    return pairs


def training_contexts(
    retriever, kb: dict, examples, k: int, snippet_chars: int, seed: int, method: str = "hybrid"
) -> tuple[list[str], list[str]]:
    """Context for each training row, as chat would build it: the top-k retrieved articles in
    retrieval order (the row's own question left out of the example votes). Where retrieval misses
    the cited (gold) article, it takes the place of the lowest distractor at a random position, so
    the model learns both that the first article is often right and to read the others. A row citing
    k or more articles sees exactly those, in its citation order.
    Returns (contexts, problems) — a problem is a row citing an article the KB lacks."""
    import random

    contexts, problems = [], []
    for i, ex in enumerate(examples):
        gold_keys = find_citations(ex.answer)
        missing = [format_cite(*g) for g in gold_keys if g not in kb]
        if missing:
            problems.append(f"{ex.source}: cites {', '.join(missing)}, which the knowledge base does not have.")
        gold = [kb[g] for g in gold_keys if g in kb]
        if len(gold) >= k:  # no room for a distractor: the context is the cited articles, and no search is needed
            contexts.append(retriever.format_context(gold, ex.question, snippet_chars))
            continue
        width = max(k, len(gold))
        chosen = [h.article for h in retriever.search(ex.question, k=width, method=method, skip_example=ex.question)]
        rng = random.Random(seed * 100003 + i)
        for art in gold:
            if art in chosen:
                continue
            distractors = [j for j, a in enumerate(chosen) if a not in gold]
            if len(chosen) >= width and distractors:
                chosen.pop(distractors[-1])
            chosen.insert(rng.randrange(len(chosen) + 1), art)
        contexts.append(retriever.format_context(chosen, ex.question, snippet_chars))
    return contexts, problems
