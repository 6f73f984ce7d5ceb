"""The civil-law recipe behind kotune's grounding interface (`kotune/grounding.py`): statute articles retrieved for a
question fill the prompt, the answer starts with the article's rule, citations are limited to what was retrieved and
checked afterwards, and questions outside the KB are refused.

A run trained with `retrieval.enabled` answers from the KB, example questions and out-of-scope questions copied into
its folder; an ungrounded run that asks for citation checks (`retrieval.citation_policy`) checks against the shipped
KB and retrieves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..data import read_question_lines
from ..errors import DataError
from ..grounding import citation_policy
from ..runfolder import EXAMPLES_FILE, KB_FOLDER, OUT_OF_SCOPE_FILE
from .answer import ABSTAIN_MESSAGE, SentenceGate, quantities, refusal, rule_line
from .citations import apply_citation_policy, check_citations
from .constrain import CitationConstraint
from .retrieval import RRF_K, Retriever
from .retrieval.examples import example_pairs, load_examples_file, save_examples, training_contexts
from .statutes import DEFAULT_KB, format_cite, load_kb


class StatuteGrounding:
    """`settings`: the run's `retrieval` section; `retriever`: None when the run only checks citations."""

    def __init__(self, kb: dict, settings, retriever=None):
        self.kb, self.settings, self.retriever = kb, settings, retriever
        self.grounded = retriever is not None
        self.citation_policy = citation_policy(settings)
        cal = getattr(retriever, "calibration", None)
        self.scope_threshold = cal.threshold if cal is not None else None

    @classmethod
    def from_run(cls, run_dir: Path, settings) -> "StatuteGrounding":
        if not settings.enabled:
            return cls(load_kb(DEFAULT_KB), settings)

        ex_file, oos_file = run_dir / EXAMPLES_FILE, run_dir / OUT_OF_SCOPE_FILE
        kb = load_kb(run_dir / KB_FOLDER)
        retriever = Retriever(
            kb,
            examples=load_examples_file(ex_file) if ex_file.is_file() else None,
            out_of_scope=[r["question"] for r in read_question_lines(oos_file)] if oos_file.is_file() else None,
            abstain_in_scope=settings.abstain_in_scope,
        )
        return cls(kb, settings, retriever)

    # 1. context for a prompt
    def joined(self, question: str, asked=()) -> str | None:
        """The text a follow-up is also read as (the previous question, then it), or None: no earlier question, or
        `retrieval.follow_up: off`."""
        if not asked or self.settings.follow_up == "off":
            return None
        return f"{asked[-1].strip()}\n{question.strip()}"

    def sources(self, question: str, asked=()) -> list:
        if self.retriever is None:
            return []
        s = self.settings
        k = s.answer_k or s.k
        joined = self.joined(question, asked)
        if joined is None or s.follow_up == "joined":
            return [h.article for h in self.retriever.search(joined or question, k=k, method=s.method)]
        # fused: an article that ranks well for the follow-up alone or read with the previous question
        score, article = {}, {}
        for text in (question, joined):
            for rank, h in enumerate(self.retriever.search(text, k=max(20, k), method=s.method), start=1):
                score[h.article.key] = score.get(h.article.key, 0.0) + 1.0 / (RRF_K + rank)
                article[h.article.key] = h.article
        return [article[key] for key in sorted(score, key=score.get, reverse=True)[:k]]

    def context_text(self, sources: list, question: str) -> str:
        if not sources:
            return ""
        return self.retriever.format_context(sources, question.strip(), self.settings.snippet_chars)

    def lead(self, question: str, sources: list) -> str:
        """The rule a grounded answer starts with: its one article's paragraphs relevant to the question. With
        several articles in the prompt the model picks one, which is only known once it has cited it: no rule."""
        if self.retriever is None or len(sources) != 1:
            return ""
        shown = self.retriever.excerpt(sources[0], question.strip(), self.settings.rule_chars)
        return rule_line(sources[0], shown)

    def excerpt(self, source, question: str) -> str:
        """What to show of a cited article under the answer: in a grounded run the paragraphs its prompt showed
        (the most relevant to the question), else the whole KB summary."""
        if self.retriever is None:
            return source.summary
        return self.retriever.excerpt(source, question.strip(), self.settings.snippet_chars)

    # 2. a logits rule
    def logits_processor(self, tokenizer, sources: list[list], prompt_len: int):
        if self.retriever is None or not self.settings.constrain_citations:
            return None

        return CitationConstraint(tokenizer, sources, prompt_len)

    # 3. checks of the answer
    def refusal(self, question: str, asked=()) -> tuple[str | None, float | None]:
        """(the message to give instead of an answer, or None; the scope score). Only grounded runs refuse: an
        ungrounded model has no knowledge base to be outside of. A follow-up is judged alone, not with the earlier
        questions (`asked`): read with an in-scope question before it, most out-of-scope questions would pass
        (docs/evaluation.md#follow-up-questions), and a wrong answer is worse than none."""
        if self.retriever is None:
            return None, None
        score = self.retriever.scope(question)
        text = refusal(question, score is None or score >= self.scope_threshold)
        if text == ABSTAIN_MESSAGE and self.settings.abstain_message:
            text = self.settings.abstain_message
        return text, score

    def gate(self, question: str, sources: list, lead: str, on_text=None) -> SentenceGate:
        """The checks on a grounded answer's application: its quantities' sources are the articles and the
        question, and `lead` is the rule shown above it."""
        allowed = quantities(question).union(*(quantities(a.summary) for a in sources))
        return SentenceGate(allowed, on_text, rule=lead)

    def check(self, text: str, sources: list) -> tuple[str, list, list[str]]:
        """(the text under `retrieval.citation_policy`, valid cited articles, flagged citations): a citation holds
        when the KB has it and, in a grounded run, it was retrieved."""
        check = check_citations(text, self.kb, sources if self.retriever is not None else None)
        if self.citation_policy != "off":
            text = apply_citation_policy(text, check, self.citation_policy)
        return text, check.valid, check.invented + check.out_of_context

    def lookup(self, law: str, article: str) -> dict | None:
        a = self.kb.get((law, article))
        return a.record() if a is not None else None


class StatuteTraining:
    """The grounding of a training run: the KB, the example questions retrieval learns from, the out-of-scope
    questions abstention learns from, and every row's context. Every problem in them is reported at once."""

    def __init__(self, settings, train_rows: list, eval_rows: list, seed: int):

        self.kb_dir = Path(settings.kb_dir or DEFAULT_KB)
        self.kb = load_kb(self.kb_dir)
        self.examples = example_pairs(train_rows) if settings.example_questions else []
        self.examples += extra_examples(settings.extra_examples, self.kb)
        self.out_of_scope = out_of_scope_questions(settings.out_of_scope_examples)
        self.train_contexts, self.eval_contexts = _contexts(
            settings, self.kb, train_rows, eval_rows, self.examples, seed
        )

    def save(self, run_dir: Path) -> None:
        """The run folder answers from the exact KB, examples and out-of-scope questions it was trained with."""

        shutil.copytree(self.kb_dir, run_dir / KB_FOLDER, dirs_exist_ok=True)
        if self.examples:
            save_examples(self.examples, run_dir / EXAMPLES_FILE)
        if self.out_of_scope:
            (run_dir / OUT_OF_SCOPE_FILE).write_text(
                "".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in self.out_of_scope),
                encoding="utf-8",
            )


def out_of_scope_questions(files: list[str]) -> list[str]:
    """The questions of `retrieval.out_of_scope_examples`, every problem reported at once."""
    questions, problems = [], []
    for f in files:
        try:
            questions += [r["question"].strip() for r in read_question_lines(f)]
        except (DataError, ValueError) as e:
            problems.append(f"retrieval.out_of_scope_examples: {e}")
    if problems:
        raise DataError(problems + ["fix the file, or remove it from `retrieval.out_of_scope_examples`."])
    return questions


def extra_examples(files: list[str], kb: dict) -> list:
    """The example questions of `retrieval.extra_examples`, every problem reported at once."""

    pairs, problems = [], []
    for f in files:
        try:
            got = load_examples_file(f)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"retrieval.extra_examples: {e}")
            continue
        for i, (q, cites) in enumerate(got, start=1):
            missing = [format_cite(*c) for c in cites if c not in kb]
            if not cites:
                problems.append(
                    f'{f}: example {i} ({q[:30]}…) cites no article; add its citations, e.g. ["민법 제281조"].'
                )
            elif missing:
                problems.append(
                    f"{f}: example {i} ({q[:30]}…) cites {', '.join(missing)}, which the knowledge base does not have."
                )
        pairs += got
    if problems:
        raise DataError(problems + ["fix the example file, or remove it from `retrieval.extra_examples`."])
    return pairs


def _contexts(settings, kb: dict, train_rows, eval_rows, examples, seed: int) -> tuple[list[str], list[str]]:
    """Retrieved statute context for every row; `examples` are the retriever's example questions."""

    retriever = Retriever(kb, examples=examples)
    out, problems = [], []
    for rows in (train_rows, eval_rows):
        ctx, bad = training_contexts(retriever, kb, rows, settings.k, settings.snippet_chars, seed, settings.method)
        out.append(ctx)
        problems += bad
    if problems:
        raise DataError(problems + ["fix the citation, or add the article to the knowledge base (`retrieval.kb_dir`)."])
    return out[0], out[1]
