"""Answer questions with a trained run: single, streamed, batched.

Streaming decodes the whole answer so far and emits only new text that does
not end in U+FFFD, so a Hangul syllable split across byte tokens is never
printed half-way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import apply_overrides
from ..data import DataError, read_question_lines
from ..grounding import for_run
from ..prompt import encode_prompt, split_template
from .constrain import RepeatGuard
from .fastgen import load_engine  # the engine named by generation.backend/precision or an override

EXIT_WORDS = {"quit", "exit", "종료", "나가기", "q"}


@dataclass
class Answer:
    question: str
    text: str
    new_tokens: int
    stopped: bool  # ended with EOS before max_new_tokens
    seconds: float
    citations: list = field(default_factory=list)  # valid cited Articles
    flagged: list = field(default_factory=list)  # citations not in the KB or not retrieved
    context: list = field(default_factory=list)  # Articles put into the prompt
    raw_text: str = ""  # the generation before a citation policy marked or dropped anything
    abstained: bool = False  # a refusal (outside the KB's scope, or not Korean) instead of an answer
    scope: float | None = None  # the retriever's P(in scope), when it has out-of-scope examples
    dropped: list = field(default_factory=list)  # sentences of the generation removed by the quantity check
    rule: str = ""  # the article's relevant paragraphs the answer starts with (grounded on one article), else ""

    def citation_records(self) -> list[dict]:
        return [a.record() for a in self.citations]


def _refused(question: str, message: str, seconds: float, score: float | None) -> Answer:
    """The answer to a question the chatbot does not answer: the message, no tokens generated, no citation."""
    return Answer(question, message, 0, True, seconds, raw_text=message, abstained=True, scope=score)


def _after_blank_line(on_text: Callable[[str], None]) -> Callable[[str], None]:
    """`on_text` that starts with a blank line once there is text: the application under the rule, or nothing
    when the gate dropped it all (the answer then ends with the rule, as streamed)."""
    started = False

    def emit(piece: str) -> None:
        nonlocal started
        if piece and not started:
            piece, started = "\n\n" + piece.lstrip(), True
        if piece:
            on_text(piece)

    return emit


class HangulSafeStreamer:
    """Minimal `generate` streamer: `put` receives token ids, `end` closes."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tok, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True).lstrip()
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)


class Chatbot:
    """Answers questions with a model and tokenizer; `grounding` (kotune/grounding.py), when the run has one, supplies
    each prompt's context, the text an answer starts with, a decoding rule and the checks of the answer."""

    def __init__(self, model, tokenizer, template: str, generation, grounding=None):
        self.model, self.tok, self.template, self.gen = model, tokenizer, template, generation
        self.grounding = grounding

    @classmethod
    def from_run(cls, run_dir: str | Path, **overrides) -> "Chatbot":

        model, tok, cfg = load_engine(run_dir, **overrides)
        # validated: a flag may not set what YAML may not
        gen = apply_overrides(cfg.generation, "generation", overrides)
        if gen.context_contrast and not cfg.retrieval.enabled:
            raise ValueError(
                f"{run_dir} answers without retrieved articles, so there is nothing to contrast: "
                "`context_contrast` works with grounded runs (`retrieval.enabled: true`) only."
            )
        return cls(model, tok, cfg.data.template, gen, for_run(run_dir, cfg.retrieval))

    @property
    def grounded(self) -> bool:
        return self.grounding is not None and self.grounding.grounded

    def context_for(self, question: str) -> list:
        return self.grounding.sources(question) if self.grounded else []

    def check_question(self, question: str) -> str:
        """The question, stripped; a clear error for one that cannot be answered at all."""
        q = (question or "").strip()
        if not q:
            raise ValueError("the question is empty: write a question.")
        if len(q) > self.gen.max_question_chars:
            raise ValueError(
                f"the question is {len(q):,} characters long; the limit is {self.gen.max_question_chars:,} "
                "(generation.max_question_chars). Shorten it to the situation and the question."
            )
        return q

    def refusal_for(self, question: str) -> tuple[str | None, float | None]:
        """(the message to give instead of an answer, or None; the scope score)."""
        return self.grounding.refusal(question) if self.grounding is not None else (None, None)

    def rule_for(self, question: str, context: list) -> str:
        """The text a grounded answer starts with (its article's rule), or ""."""
        return self.grounding.lead(question, context) if self.grounded else ""

    def _kwargs(self, prompt_len: int, max_new_tokens: int | None = None) -> dict:
        g = self.gen
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        new = max_new_tokens or g.max_new_tokens
        if limit:  # past the position table the model fails (GPT-2) or degrades
            new = max(1, min(new, limit - prompt_len))
        kw = dict(
            max_new_tokens=new,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
            repetition_penalty=g.repetition_penalty,
        )
        if g.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or None)
        return kw

    def excerpt(self, article, question: str) -> str:
        """What to show of a cited source under the answer."""
        return self.grounding.excerpt(article, question) if self.grounding is not None else article.summary

    def prompt_ids(self, question: str, context: list | None = None) -> list[int]:
        text = self.grounding.context_text(context, question) if context else ""
        prompt, _ = split_template(self.template, question.strip(), context=text)
        return encode_prompt(self.tok, prompt)

    def _processors(self, contexts: list[list], prompt_len: int) -> dict:

        procs = []
        if self.gen.repeat_guard:  # first: the grounding's rule (which citations) must have the last word
            procs.append(RepeatGuard(self.tok, self.gen.repeat_guard, prompt_len))
        rule = self.grounding.logits_processor(self.tok, contexts, prompt_len) if self.grounded else None
        if rule is not None:
            procs.append(rule)
        if not procs:
            return {}
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList(procs)}

    def _contrast(self, questions: list[str]) -> dict:
        """Context-aware decoding (`generation.context_contrast`): each prompt's twin without the articles,
        left-padded, for the engine to contrast against."""
        w = self.gen.context_contrast
        if not w or not self.grounded:
            return {}
        if not getattr(self.model, "supports_contrast", False):
            raise ValueError(
                "`generation.context_contrast` needs the torch engine (`generation.backend: torch`); "
                "set it to 0 to answer with this engine."
            )
        ids, mask = self._left_pad([self.prompt_ids(q) for q in questions])
        return {"contrast_ids": ids, "contrast_mask": mask, "contrast_weight": w}

    def _left_pad(self, rows: list[list[int]]):
        """(ids, attention mask) for prompts of different lengths, padded on the left for decoding."""
        import torch

        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device)
        return ids, mask

    def answer(
        self, question: str, on_text: Callable[[str], None] | None = None, max_new_tokens: int | None = None
    ) -> Answer:
        import torch

        question = self.check_question(question)
        t0 = time.perf_counter()
        refused, score = self.refusal_for(question)
        if refused is not None:
            if on_text:
                on_text(refused)
            return _refused(question, refused, time.perf_counter() - t0, score)
        context = self.context_for(question)
        gate = None
        rule = self.rule_for(question, context)
        if on_text and rule:
            on_text(rule)
            gate = self.grounding.gate(question, context, rule, _after_blank_line(on_text))
            on_text = gate.feed
        ids = torch.tensor([self.prompt_ids(question, context)], device=self.model.device)
        streamer = HangulSafeStreamer(self.tok, on_text) if on_text else None
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                **self._kwargs(ids.shape[1], max_new_tokens),
                **self._processors([context], ids.shape[1]),
                **self._contrast([question]),
            )
        new = out[0, ids.shape[1] :].tolist()
        if gate is not None:  # the gate holds the last sentence until it knows it ended
            gate.close(complete=self.tok.eos_token_id in new)
        return self._answer(question, new, time.perf_counter() - t0, context, score, rule)

    def answer_batch(self, questions: list[str], batch_size: int = 8) -> list[Answer]:
        """Left-padded batches; each answer is cut at its own EOS."""
        import torch

        questions = [self.check_question(q) for q in questions]
        results: dict[int, Answer] = {}
        todo = []
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            refused, score = self.refusal_for(q)
            if refused is not None:
                results[i] = _refused(q, refused, time.perf_counter() - t0, score)
            else:
                todo.append((i, score))
        for k in range(0, len(todo), batch_size):
            chunk = [questions[i] for i, _ in todo[k : k + batch_size]]
            contexts = [self.context_for(q) for q in chunk]
            ids, mask = self._left_pad([self.prompt_ids(q, c) for q, c in zip(chunk, contexts)])
            width = ids.shape[1]
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    **self._kwargs(width),
                    **self._processors(contexts, width),
                    **self._contrast(chunk),
                )
            dt = (time.perf_counter() - t0) / len(chunk)
            for (i, score), q, row, ctx in zip(todo[k : k + batch_size], chunk, out[:, width:].tolist(), contexts):
                results[i] = self._answer(q, row, dt, ctx, score)
        return [results[i] for i in range(len(questions))]

    def _answer(
        self,
        question: str,
        new: list[int],
        seconds: float,
        context: list | None = None,
        score: float | None = None,
        rule: str | None = None,
    ) -> Answer:
        """The Answer for generated ids `new`; `rule`: `rule_for(question, context)` when the caller has it."""
        eos = self.tok.eos_token_id
        stopped = eos in new
        if stopped:
            new = new[: new.index(eos) + 1]
        text = self.tok.decode(new, skip_special_tokens=True).strip()
        raw, dropped = text, []
        rule = self.rule_for(question, context or []) if rule is None else rule
        if rule:  # the rule in the KB's words, then the model's application with unsupported quantities removed
            gate = self.grounding.gate(question, context, rule)
            gate.feed(text)
            text, dropped = (rule + "\n\n" + gate.close(complete=stopped)).strip(), gate.dropped
        answer = Answer(
            question,
            text,
            len(new),
            stopped,
            seconds,
            context=context or [],
            raw_text=raw,
            scope=score,
            dropped=dropped,
            rule=rule,
        )
        if self.grounding is not None:
            answer.text, answer.citations, answer.flagged = self.grounding.check(text, context or [])
        return answer


def ask_file(bot: Chatbot, questions_path: Path, output_path: Path, batch_size: int = 8) -> dict:
    """`{"id","question"}` lines in, the same lines plus `"answer"` out."""
    import json

    records = read_question_lines(questions_path)
    problems = []
    for r in records:
        try:
            bot.check_question(r["question"])
        except ValueError as e:
            problems.append(f"{questions_path}: record {r['id']}: {e}")
    if problems:
        raise DataError(problems)
    answers = bot.answer_batch([r["question"] for r in records], batch_size=batch_size)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", encoding="utf-8") as f:
        for rec, a in zip(records, answers):
            # "rule": the part of the answer that is the KB's text (grounded runs); the rest is the model's
            out = {**rec, "answer": a.text, "stopped": a.stopped, "abstained": a.abstained, "rule": a.rule or None}
            if bot.grounding is not None:
                out["citations"] = a.citation_records()
                out["flagged_citations"] = a.flagged
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    n = len(answers)
    return {
        "questions": n,
        "stopped_at_eos": sum(a.stopped for a in answers),
        "mean_seconds": sum(a.seconds for a in answers) / max(n, 1),
    }
