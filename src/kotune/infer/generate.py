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

from ..chat import chat_prompt_ids, chat_stop_ids
from ..config import apply_overrides
from ..data import DataError, read_question_lines
from ..grounding import for_run
from ..prompt import encode_prompt, split_template
from .constrain import RepeatGuard
from .fastgen import load_engine  # the engine named by generation.backend/precision or an override

EXIT_WORDS = {"quit", "exit", "종료", "나가기", "q"}
RESET_WORDS = {"/reset", "/new", "/새대화"}


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


@dataclass(eq=False)
class Plan:
    """A question ready to decode (`Chatbot.plan`), or answered without decoding (`answer` set: a refusal)."""

    question: str
    t0: float
    answer: Answer | None = None
    prompt: list = field(default_factory=list)
    context: list = field(default_factory=list)
    score: float | None = None
    rule: str = ""
    gate: object = None
    streamer: HangulSafeStreamer | None = None
    kwargs: dict = field(default_factory=dict)  # model.generate's decoding arguments
    processors: list | None = None
    contrast: dict = field(default_factory=dict)


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

    def token(self, token_id: int) -> None:
        """One new token, for a caller that decodes itself (the batch decoder) rather than through `generate`."""
        self.prompt_seen = True
        self.ids.append(int(token_id))
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

    def __init__(self, model, tokenizer, template: str, generation, grounding=None, chat: bool = False, system=None):
        """`chat`: answer in the tokenizer's own chat template (`data.format: chat`), after `system` if given;
        otherwise through `template` (`data.template`)."""
        self.model, self.tok, self.template, self.gen = model, tokenizer, template, generation
        self.grounding = grounding
        self.chat, self.system = chat, system
        # a chat template closes an assistant turn with its own token (<|im_end|>, <end_of_turn>), trained to stop on
        self.stop_ids = chat_stop_ids(tokenizer) if chat else [tokenizer.eos_token_id]

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
        chat = cfg.data.format == "chat"
        grounding = for_run(run_dir, cfg.retrieval)
        return cls(model, tok, cfg.data.template, gen, grounding, chat=chat, system=cfg.data.system_prompt)

    @property
    def grounded(self) -> bool:
        return self.grounding is not None and self.grounding.grounded

    def context_for(self, question: str, asked=()) -> list:
        """The sources for `question`; `asked`: the conversation's earlier questions, oldest first."""
        return self.grounding.sources(question, list(asked)) if self.grounded else []

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

    def refusal_for(self, question: str, asked=()) -> tuple[str | None, float | None]:
        """(the message to give instead of an answer, or None; the scope score)."""
        return self.grounding.refusal(question, list(asked)) if self.grounding is not None else (None, None)

    def rule_for(self, question: str, context: list) -> str:
        """The text a grounded answer starts with (its article's rule), or ""."""
        return self.grounding.lead(question, context) if self.grounded else ""

    def _kwargs(self, prompt_len: int, max_new_tokens: int | None = None, gen=None) -> dict:
        g = gen or self.gen
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        new = max_new_tokens or g.max_new_tokens
        if limit:  # past the position table the model fails (GPT-2) or degrades
            new = max(1, min(new, limit - prompt_len))
        kw = dict(
            max_new_tokens=new,
            eos_token_id=self.stop_ids if len(self.stop_ids) > 1 else self.stop_ids[0],
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

    def prompt_ids(self, question: str, context: list | None = None, history=()) -> list[int]:
        """The prompt for `question` with its sources `context`, after the earlier turns of the conversation
        (`history`: (question, answer) pairs, oldest first) that fit in `generation.history_tokens`."""
        text = self.grounding.context_text(context, question) if context else ""
        if self.chat:
            return chat_prompt_ids(self.tok, question, text, self._recent(history), self.system)
        prompt, _ = split_template(self.template, question.strip(), context=text)
        # one string with the earlier turns, so a BOS token is added once, at the very start
        return encode_prompt(self.tok, self._history_text(history) + prompt)

    def _recent(self, history) -> list[tuple[str, str]]:
        """The latest earlier turns whose question and answer fit, together, in `generation.history_tokens`."""
        if not history:
            return []
        budget, kept, used = self.gen.history_tokens, [], 0
        for q, a in reversed(list(history) if budget > 0 else []):
            n = len(self.tok(q.strip() + "\n" + a.strip(), add_special_tokens=False)["input_ids"])
            if used + n > budget:
                break
            kept.append((q, a))
            used += n
        return kept[::-1]

    def _history_text(self, history) -> str:
        """The earlier turns as the template renders them (without sources), each closed by EOS as in training."""
        eos = self.tok.eos_token or ""
        turns = []
        for q, a in self._recent(history):
            prompt, answer = split_template(self.template, q.strip(), a.strip(), context="")
            turns.append(prompt + answer + eos)
        return "".join(turns)

    def _processors(self, contexts: list[list], prompt_len: int, gen=None) -> dict:
        guard = (gen or self.gen).repeat_guard
        procs = []
        if guard:  # first: the grounding's rule (which citations) must have the last word
            procs.append(RepeatGuard(self.tok, guard, prompt_len))
        rule = self.grounding.logits_processor(self.tok, contexts, prompt_len) if self.grounded else None
        if rule is not None:
            procs.append(rule)
        if not procs:
            return {}
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList(procs)}

    def _contrast(self, questions: list[str], gen=None) -> dict:
        """Context-aware decoding (`generation.context_contrast`): each prompt's twin without the articles,
        left-padded, for the engine to contrast against."""
        w = (gen or self.gen).context_contrast
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

    def plan(
        self,
        question: str,
        on_text: Callable[[str], None] | None = None,
        max_new_tokens: int | None = None,
        history=(),
        gen=None,
    ) -> "Plan":
        """Everything before decoding: the refusal (then `plan.answer` is final), the sources, the rule the answer
        starts with (streamed at once), the prompt, and the decoding settings. `history`: earlier (question, answer)
        turns; `gen`: this request's generation settings (default the bot's)."""
        gen = gen or self.gen
        question = self.check_question(question)
        t0 = time.perf_counter()
        asked = [q for q, _ in history]
        refused, score = self.refusal_for(question, asked)
        if refused is not None:
            if on_text:
                on_text(refused)
            return Plan(question, t0, answer=_refused(question, refused, time.perf_counter() - t0, score))
        context = self.context_for(question, asked)
        gate = None
        rule = self.rule_for(question, context)
        if on_text and rule:
            on_text(rule)
            gate = self.grounding.gate(question, context, rule, _after_blank_line(on_text))
            on_text = gate.feed
        ids = self.prompt_ids(question, context, history)
        return Plan(
            question,
            t0,
            prompt=ids,
            context=context,
            score=score,
            rule=rule,
            gate=gate,
            streamer=HangulSafeStreamer(self.tok, on_text) if on_text else None,
            kwargs=self._kwargs(len(ids), max_new_tokens, gen),
            processors=self._processors([context], len(ids), gen).get("logits_processor"),
            contrast=self._contrast([question], gen),
        )

    def finish(self, plan: "Plan", new: list[int]) -> Answer:
        """The Answer for the tokens `new` generated for `plan`."""
        if plan.streamer is not None:
            plan.streamer.end()
        if plan.gate is not None:  # the gate holds the last sentence until it knows it ended
            plan.gate.close(complete=any(t in self.stop_ids for t in new))
        return self._answer(plan.question, new, time.perf_counter() - plan.t0, plan.context, plan.score, plan.rule)

    def answer(
        self,
        question: str,
        on_text: Callable[[str], None] | None = None,
        max_new_tokens: int | None = None,
        history=(),
        gen=None,
    ) -> Answer:
        import torch

        plan = self.plan(question, on_text, max_new_tokens, history, gen)
        if plan.answer is not None:
            return plan.answer
        ids = torch.tensor([plan.prompt], device=self.model.device)
        streamer = plan.streamer
        plan.streamer = None  # generate() ends it
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                streamer=streamer,
                **plan.kwargs,
                **({"logits_processor": plan.processors} if plan.processors else {}),
                **plan.contrast,
            )
        return self.finish(plan, out[0, ids.shape[1] :].tolist())

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
        end = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        stopped = end is not None
        if stopped:
            new = new[: end + 1]
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
