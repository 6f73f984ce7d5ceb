"""The civil-law recipe's commands: `kotune retrieve`, `kotune eval` and `kotune kb import`. `kotune`'s command line
(cli.py) registers them (`register`); each imports what it needs when it runs, so `kotune --help` stays light."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..cliguard import fail, guarded, load_bot


def register(app: typer.Typer) -> None:
    app.command()(retrieve)
    app.command(name="eval")(evaluate)
    kb_app = typer.Typer(no_args_is_help=True, help="Statute knowledge base: import official text.")
    kb_app.command("import")(kb_import)
    app.add_typer(kb_app, name="kb")


DEFAULT_OUT_OF_SCOPE = "data/civil_law_out_of_scope.jsonl"
EXAMPLES_HELP = (
    "Example questions for retrieval: a Q&A training file (e.g. data/civil_law_qa.csv), a file of "
    '{"question", "citations"} lines (data/civil_law_questions.jsonl) or a run\'s retrieval_examples.jsonl. '
    "Repeat to use several."
)


def _retriever(kb_dir: Optional[Path], examples: Optional[List[Path]], out_of_scope: Optional[List[Path]] = None):
    from .grounding import out_of_scope_questions
    from .retrieval import Retriever
    from .retrieval.examples import load_examples_file
    from .statutes import DEFAULT_KB, load_kb

    pairs = [p for f in examples for p in guarded(load_examples_file, f)] if examples else None
    oos = guarded(out_of_scope_questions, [str(f) for f in out_of_scope]) if out_of_scope else None
    return guarded(Retriever, guarded(load_kb, kb_dir or DEFAULT_KB), examples=pairs, out_of_scope=oos)


def retrieve(
    question: str = typer.Argument(..., help="A question, as a user would ask it."),
    k: int = typer.Option(5, "--k", min=1, help="How many articles to show."),
    method: str = typer.Option(
        "hybrid",
        "--method",
        help="bm25 (Kiwi morphemes), dense (multilingual-e5-small), examples (votes of similar example questions plus "
        "the article classifiers) or hybrid (reciprocal-rank fusion of all).",
    ),
    kb: Optional[Path] = typer.Option(
        None, "--kb", help="Statute knowledge-base folder (default: the KB shipped with kotune, src/kotune/legal/kb)."
    ),
    examples: Optional[List[Path]] = typer.Option(None, "--examples", help=EXAMPLES_HELP),
):
    """Show the statute articles retrieved for a question."""
    retriever = _retriever(kb, examples)
    for rank, hit in enumerate(guarded(retriever.search, question, k, method), start=1):
        where = ", ".join(f"{m} #{r}" for m, r in hit.ranks.items())
        typer.echo(f"{rank}. {hit.article.cite}({hit.article.title})  [{where}]")
        typer.echo(f"   {hit.article.paragraphs[0][:120]}")


def evaluate(
    run: Optional[str] = typer.Argument(None, help="Run folder (omit with --retrieval_only)."),
    questions: Path = typer.Option(
        Path("data/civil_law_dev.jsonl"), "--questions", help="Dev set JSONL with gold citations and key facts."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", help="Write the report (summary and per-question rows) as JSON."
    ),
    retrieval_only: bool = typer.Option(
        False, "--retrieval_only", help="Baseline: answer with the top-1 retrieved article's summary."
    ),
    examples: Optional[List[Path]] = typer.Option(None, "--examples", help="With --retrieval_only: " + EXAMPLES_HELP),
    method: str = typer.Option(
        "hybrid", "--method", help="With --retrieval_only: the retrieval method (bm25, dense, examples, hybrid)."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions."),
    batch_size: int = typer.Option(8, "--batch_size", min=1),
    max_new_tokens: Optional[int] = typer.Option(None, "--max_new_tokens"),
    context_contrast: Optional[float] = typer.Option(
        None,
        "--context_contrast",
        min=0,
        max=5,
        help="Override the run's generation.context_contrast (context-aware decoding weight; 0: off).",
    ),
    out_of_scope: Optional[Path] = typer.Option(
        None,
        "--out_of_scope",
        help='Also answer these questions, which no KB article answers (JSONL `{"question"}` '
        "lines), and report how often the system abstained and how often it cited an article anyway. "
        f"Default: {DEFAULT_OUT_OF_SCOPE} when it exists; `--out_of_scope none` to skip.",
    ),
    abstain_examples: Optional[List[Path]] = typer.Option(
        None,
        "--abstain_examples",
        help="With --retrieval_only: out-of-scope example questions (as "
        "`retrieval.out_of_scope_examples`) that let the baseline abstain as the chatbot does. Repeat to use several.",
    ),
):
    """Score answers on a dev set: citation hit/precision/recall, key facts, ROUGE-L, stop rate, latency, abstentions
    (and, on out-of-scope questions, how often the system abstained or cited anyway)."""
    from ..data import read_question_lines
    from .evaluate import evaluate_answers, load_dev, markdown_table, out_of_scope_summary, retrieval_only_answers
    from .statutes import DEFAULT_KB, load_kb

    items = guarded(load_dev, questions)[:limit]
    if out_of_scope is None and Path(DEFAULT_OUT_OF_SCOPE).is_file():
        out_of_scope = Path(DEFAULT_OUT_OF_SCOPE)
    oos = guarded(read_question_lines, out_of_scope)[:limit] if out_of_scope and str(out_of_scope) != "none" else []
    if output:  # the report is written after every answer: a bad path must fail now, not then
        from ..runfolder import check_output_file

        guarded(check_output_file, output, Path(run) if run else None, inputs=(questions,))
    qs = [i["question"] for i in items]
    kb = guarded(load_kb, DEFAULT_KB)
    oos_qs = [r["question"] for r in oos]
    if retrieval_only:
        retriever = _retriever(None, examples, abstain_examples)
        name, answers = "retrieval-only", guarded(retrieval_only_answers, retriever, qs, method)
        oos_answers = guarded(retrieval_only_answers, retriever, oos_qs, method)
    else:
        if not run:
            fail(ValueError("give a run folder, or --retrieval_only."))
        bot = load_bot(run, None, greedy=True, max_new_tokens=max_new_tokens, context_contrast=context_contrast)
        kb = bot.grounding.kb if bot.grounding is not None else kb
        name, answers = Path(run).name, guarded(bot.answer_batch, qs, batch_size=batch_size)
        oos_answers = guarded(bot.answer_batch, oos_qs, batch_size=batch_size)
    try:
        from .retrieval import Morphemes

        tokenize = Morphemes()
    except ImportError:
        tokenize = None
    summary, rows = evaluate_answers(items, answers, kb, tokenize)
    report = {"system": name, "questions": str(questions), "summary": summary, "rows": rows}
    if oos:
        o = out_of_scope_summary(oos_answers)
        summary.update(out_of_scope_abstain_rate=o["abstain_rate"], out_of_scope_cited_rate=o["cited_rate"])
        report.update(
            out_of_scope=str(out_of_scope),
            out_of_scope_summary=o,
            out_of_scope_rows=[
                {
                    "id": r.get("id"),
                    "question": r["question"],
                    "answer": a.text,
                    "abstained": a.abstained,
                    "scope": a.scope,
                }
                for r, a in zip(oos, oos_answers)
            ],
        )
    typer.echo(markdown_table({name: summary}))
    if oos:
        typer.echo(
            f"out of scope ({out_of_scope}, {len(oos)} questions): abstained {o['abstain_rate']:.3f}, "
            f"cited an article anyway {o['cited_rate']:.3f}"
        )
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        typer.echo(f"report written to {output}")


def kb_import(
    files: List[Path] = typer.Argument(..., help="law.go.kr lawService exports (XML or JSON), one law each."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the imported KB (use a new folder, then point --kb at it)."
    ),
    keep_keywords_from: Optional[Path] = typer.Option(
        None, "--keep_keywords_from", help="Existing KB folder whose keywords are kept for the same articles."
    ),
):
    """Import official statute text exported from the law.go.kr Open API."""
    from .kb_import import import_law_file

    for f in files:
        n, skipped = guarded(import_law_file, f, out, keep_keywords_from)
        typer.echo(f"{f}: {n} articles written to {out}")
        for msg in skipped:
            typer.echo(f"  skipped: {msg}")
