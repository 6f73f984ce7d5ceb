"""The grounding interface: how a recipe that answers from sources plugs into kotune's generic training and
answering code.

kotune ships one grounding, the civil-law recipe (`kotune.legal`: statute articles retrieved for each question). The
generic stages never import it: they reach it through this module, which loads it only for a run whose
`retrieval` section asks for it. It touches them at three points:

1. **Context for a prompt.** `sources(question)` picks what grounds an answer, `context_text` fills the template's
   `{context}`, and `lead` is text the answer starts with before the model writes (the article's rule). In training,
   `TrainingGrounding.contexts` gives every row its context, and `save` puts what answering needs into the run folder.
2. **A logits rule.** `logits_processor` limits what the decoder may write (which articles it may cite).
3. **A check of the answer.** `refusal` before generating (a question no source answers is not answered), `gate`
   while the answer streams (sentences the sources do not support are held back), and `check` once it is written
   (which citations hold).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Protocol

PLUGIN = "kotune.legal"  # the module whose `for_run` / `for_training` build the grounding of a run


class Gate(Protocol):
    """Filters an answer's text as it streams: `feed` pieces, then `close`, which returns the text kept."""

    dropped: list

    def feed(self, piece: str) -> None: ...
    def close(self, complete: bool = True) -> str: ...


class Grounding(Protocol):
    """What the chatbot asks of a grounding. `grounded` is False for a run that only checks citations."""

    grounded: bool
    scope_threshold: float | None  # the refusal threshold `refusal`'s score is compared with, if it has one
    citation_policy: str  # what `check` does to a citation that does not hold: mark, drop, or off (leave it)

    # `asked`: the conversation's earlier questions, oldest first (a follow-up is read with them)
    def refusal(self, question: str, asked: list[str] = ()) -> tuple[str | None, float | None]: ...
    def sources(self, question: str, asked: list[str] = ()) -> list: ...
    def context_text(self, sources: list, question: str) -> str: ...
    def lead(self, question: str, sources: list) -> str: ...
    def excerpt(self, source, question: str) -> str: ...
    def logits_processor(self, tokenizer, sources: list[list], prompt_len: int): ...
    def gate(self, question: str, sources: list, lead: str, on_text: Callable[[str], None] | None = None) -> Gate: ...
    def check(self, text: str, sources: list) -> tuple[str, list, list[str]]: ...
    def lookup(self, law: str, article: str) -> dict | None: ...


class TrainingGrounding(Protocol):
    train_contexts: list[str]
    eval_contexts: list[str]

    def save(self, run_dir: Path) -> None: ...


def citation_policy(retrieval) -> str:
    """`retrieval.citation_policy`, resolved: unset means `mark` in a grounded run and `off` otherwise."""
    return retrieval.citation_policy or ("mark" if retrieval.enabled else "off")


def wanted(retrieval) -> bool:
    """Does a run with this `retrieval` section answer through the grounding (retrieval, or citation checks)?"""
    return retrieval.enabled or citation_policy(retrieval) != "off"


def for_training(retrieval, train_rows: list, eval_rows: list, seed: int) -> TrainingGrounding | None:
    """The grounding of a training run: each row's context and the files the run folder keeps; None if ungrounded."""
    if not retrieval.enabled:
        return None
    return importlib.import_module(PLUGIN).for_training(retrieval, train_rows, eval_rows, seed)


def for_run(run_dir: str | Path, retrieval) -> Grounding | None:
    """The grounding a trained run answers through, from its folder; None for a run that needs none."""
    if not wanted(retrieval):
        return None
    return importlib.import_module(PLUGIN).for_run(Path(run_dir), retrieval)
