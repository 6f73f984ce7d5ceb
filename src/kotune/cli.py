"""`kotune` command line: a thin layer over the library.

Heavy modules (torch, transformers) are imported inside the commands, so
`kotune --help` stays fast and torch-free.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cliguard import Guarded, fail, guarded, load_bot
from .config import ConfigError, load_config
from .legal.cli import register as register_legal

app = typer.Typer(
    cls=Guarded,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="kotune: fine-tune Korean language models with LoRA, then chat, ask and merge.",
)


@app.callback()
def _options(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an unexpected error (may also be given after the command)."
    ),
):
    pass


def _config(config: Optional[Path], sets: List[str], flags: dict, run_dir: Optional[str] = None):
    try:
        if config is None and run_dir is not None:
            config = Path(run_dir) / "config.yaml"
        return load_config(config, sets, flags)
    except ConfigError as e:
        fail(e)


@app.command()
def train(
    config_arg: Optional[Path] = typer.Argument(None, metavar="[CONFIG]", help="YAML config (same as --config)."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML config file, e.g. configs/civil_law.yaml."
    ),
    sets: List[str] = typer.Option(
        [], "--set", "-s", help="Override a key: --set training.learning_rate=1e-4 (repeatable)."
    ),
    csv_path: Optional[str] = typer.Option(None, "--csv_path", help="Training data file (data.train_file)."),
    output_dir: Optional[str] = typer.Option(None, "--output_dir", help="Run folder (model.output_dir)."),
    max_steps: Optional[int] = typer.Option(None, "--max_steps", help="Stop after N optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch_size", help="Micro-batch size (data.batch_size)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data."),
    learning_rate: Optional[float] = typer.Option(None, "--learning_rate", help="Peak learning rate."),
    model_name: Optional[str] = typer.Option(None, "--model_name", help="Base model (model.name)."),
    max_length: Optional[int] = typer.Option(None, "--max_length", help="Longest sample in tokens (data.max_length)."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Hugging Face dataset: hub name, data file or save_to_disk folder (data.dataset_name)."
    ),
    task: Optional[str] = typer.Option(
        None, "--task", help="causal-lm, text-classification or text2text (model.task)."
    ),
    checkpoint_path: Optional[str] = typer.Option(
        None, "--checkpoint_path", help="With --resume: the checkpoint (or run folder) to continue from."
    ),
    dry_run: bool = typer.Option(
        False, "--dry_run", help="Validate config and data, print statistics and one rendered sample, then exit."
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from the latest checkpoint of the run folder, or from PATH."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start over in a run folder that already holds a run "
        "(finished, or checkpoints); the old run is kept until the new one finishes.",
    ),
):
    """Fine-tune (LoRA or full): causal-LM, text-classification or text2text, as model.task says.

    Data-parallel on several processes: torchrun --nproc_per_node N -m kotune train CFG (see docs/distributed.md)."""
    cfg = _config(
        config or config_arg,
        sets,
        dict(
            csv_path=csv_path,
            output_dir=output_dir,
            max_steps=max_steps,
            batch_size=batch_size,
            epochs=epochs,
            learning_rate=learning_rate,
            model_name=model_name,
            max_length=max_length,
            dataset=dataset,
            task=task,
        ),
    )
    from .train import train as run_train

    if checkpoint_path:
        resume = checkpoint_path

    result = guarded(run_train, cfg, resume=resume, overwrite=overwrite, dry_run=dry_run)
    if os.environ.get("RANK", "0") == "0":  # under torchrun/accelerate only rank 0 reports
        typer.echo(result if dry_run else f"done: {result}  (try: kotune chat {result} --quick_test)")
    from .train.distributed import exit_hard_after_training

    if exit_hard_after_training():  # the run folder is complete and the process group destroyed
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


def _show_answer(bot, question: str, echo_question: bool = True, history=()):
    """Stream one answer (read after the conversation's earlier turns `history`), then its checked citations and
    how it ended."""
    if echo_question:
        typer.echo(f"질문: {question}")
    typer.echo("답변: ", nl=False)
    a = guarded(bot.answer, question, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()), history=history)
    typer.echo("")
    if a.abstained:
        limit = bot.grounding.scope_threshold
        scope = f", scope {a.scope:.2f} < {limit:.2f}" if a.scope is not None and limit is not None else ""
        typer.echo(f"  [답변하지 않음: 근거로 삼을 조문이 없는 질문{scope}]\n")
        return a
    if a.flagged and bot.grounding.citation_policy != "off":
        typer.echo(f"  (검토: {a.text})")
    for c in a.citations:
        if a.rule:  # the answer already starts with the article's relevant paragraphs
            typer.echo(f"  근거 조문: {c.cite}({c.title})")
        else:  # the KB's summary beside the model's explanation, which can be wrong in substance
            typer.echo(f"  근거 조문: {c.cite}({c.title})\n    요지: {bot.excerpt(c, question)}")
    if a.flagged:
        typer.echo("  확인되지 않은 인용: " + ", ".join(a.flagged))
    if a.dropped:
        typer.echo(f"  (조문과 질문에 없는 기간·비율이 있어 뺀 문장 {len(a.dropped)}개)")
    if a.rule:  # the reader should know which part to trust
        typer.echo("  ※ 첫 문단은 지식 베이스의 조문 요약이고, 그 아래 설명은 모델이 쓴 것이라 틀릴 수 있습니다.")
    end = "EOS" if a.stopped else f"max_new_tokens ({a.new_tokens} tokens)"
    typer.echo(f"  [{a.new_tokens} tokens, {a.seconds:.1f}s, stopped by {end}]\n")
    return a


@app.command()
def chat(
    run: Optional[str] = typer.Argument(None, help="Run folder written by `kotune train`."),
    model_path: Optional[str] = typer.Option(None, "--model_path", help="Same as RUN (the seed's flag)."),
    interactive: bool = typer.Option(
        False, "--interactive", help="Interactive chat (the default when no question is given)."
    ),
    question: Optional[str] = typer.Option(None, "--question", "-q", help="Answer one question and exit."),
    quick_test: bool = typer.Option(False, "--quick_test", help="Answer the config's fixed quick-test questions."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max_new_tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top_p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition_penalty"),
    greedy: Optional[bool] = typer.Option(None, "--greedy/--sample", help="Deterministic decoding, or sampling."),
):
    """Chat with a trained run: REPL, one --question, or --quick_test."""
    from .infer.generate import EXIT_WORDS, RESET_WORDS

    bot = load_bot(
        run,
        model_path,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        greedy=greedy,
    )
    if bot.gen.notice:
        typer.echo(f"※ {bot.gen.notice}\n")
    if question is not None:  # an empty --question is an error to report, not a request for the REPL
        _show_answer(bot, question)
    if quick_test:
        qs = bot.gen.quick_test_questions
        if not qs:
            fail(
                ValueError(
                    f"{run or model_path}: its config has no quick-test questions; set "
                    "`generation.quick_test_questions` in the config you train with, or ask with --question."
                )
            )
        answers = [_show_answer(bot, q) for q in qs]
        refused = sum(a.abstained for a in answers)
        stopped = sum(a.stopped for a in answers if not a.abstained)
        typer.echo(
            f"quick test: {stopped}/{len(qs) - refused} answers ended with EOS before max_new_tokens"
            + (f"; {refused} question(s) refused as outside the knowledge base" if refused else "")
        )
    if interactive or (question is None and not quick_test):
        banner = bot.gen.chat_banner or f"kotune chat: {Path(run or model_path).resolve().name}"
        typer.echo(f"{banner} 종료: quit / exit / 종료 / 나가기 · 새 대화: /reset")
        history: list[tuple[str, str]] = []  # follow-ups ("그럼 월세는요?") are read after the earlier turns
        while True:
            try:
                q = input("\n질문> ").strip()
            except (EOFError, KeyboardInterrupt):
                typer.echo("")
                break
            if q.lower() in EXIT_WORDS:
                break
            if q.lower() in RESET_WORDS:
                history.clear()
                typer.echo("새 대화를 시작합니다 (앞선 질문과 답변은 잊었습니다).")
                continue
            if q:
                try:
                    a = _show_answer(bot, q, echo_question=False, history=history)
                except typer.Exit:  # a question that cannot be answered (too long): say why, keep the session
                    continue
                if not a.abstained:  # a refused question is not part of the conversation
                    history.append((q, a.text))


@app.command()
def ask(
    run: str = typer.Argument(..., help="Run folder."),
    questions: Path = typer.Option(..., "--questions", help='JSONL input, lines {"id": …, "question": …}.'),
    output: Path = typer.Option(..., "--output", help='JSONL output: the input lines plus "answer".'),
    batch_size: int = typer.Option(8, "--batch_size", min=1, help="Questions generated together."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max_new_tokens"),
    greedy: Optional[bool] = typer.Option(None, "--greedy/--sample"),
):
    """Answer a batch file of questions."""
    from .data import read_question_lines
    from .infer.generate import ask_file
    from .runfolder import check_output_file

    # Every input is checked before the model loads (which takes seconds to minutes).
    guarded(read_question_lines, questions)
    guarded(check_output_file, output, Path(run), inputs=(questions,))
    bot = load_bot(run, None, max_new_tokens=max_new_tokens, greedy=greedy)
    stats = guarded(ask_file, bot, questions, output, batch_size)
    typer.echo(
        f"wrote {output}: {stats['questions']} answers, {stats['stopped_at_eos']} ended with EOS, "
        f"{stats['mean_seconds']:.2f}s per answer"
    )


@app.command()
def predict(
    run: str = typer.Argument(..., help="Run folder of a text-classification or text2text run."),
    input: Path = typer.Option(
        ..., "--input", "-i", help="CSV or JSONL with the run's input column (data.text_column)."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="JSONL output: each record plus prediction (and score). Default: print."
    ),
    batch_size: int = typer.Option(16, "--batch_size", min=1),
):
    """Predict labels (text-classification) or targets (text2text) for a file; scores them when it has the target
    column."""
    from .predict import predict_file

    summary = guarded(predict_file, run, input, output, batch_size)
    rows = summary.pop("rows")
    if output is None:
        for r in rows:
            typer.echo(json.dumps(r, ensure_ascii=False))
    else:
        typer.echo(f"wrote {output}: {len(rows)} predictions")
    scores = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    typer.echo(scores, err=output is None)


@app.command()
def validate(
    file: Path = typer.Argument(..., help="CSV or JSONL file (or save_to_disk folder) to check."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Also check against this config's columns and template tokenizer."
    ),
):
    """Check a data file: columns, encoding, empty cells, duplicates — every problem with its row."""
    from .config import input_column, target_column
    from .data import DataError, load_examples

    cfg = _config(config, [], {})
    d, task = cfg.data, cfg.model.task
    chat = d.format == "chat"
    try:
        examples, report = load_examples(
            file,
            encoding=d.encoding,
            question_column=input_column(d, task),
            answer_column=target_column(d, task),
            bad_rows="skip",
            duplicates="keep",
            chat=chat,
        )
    except DataError as e:
        fail(e)
    typer.echo(report.summary())
    for msg in report.problems + report.duplicates:
        typer.echo(f"  - {msg}")
    cats = {}
    for ex in examples:
        cats[ex.category or "(none)"] = cats.get(ex.category or "(none)", 0) + 1
    typer.echo("categories: " + ", ".join(f"{k} {v}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])))
    if config is not None:
        from .chat import encode_all_chat, use_chat_template
        from .model import load_tokenizer, resolve_model
        from .prompt import encode_all, length_stats

        tok = guarded(
            load_tokenizer,
            guarded(resolve_model, cfg.model.name, cfg.model.cache_dir),
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
        if chat:  # as training renders them: the tokenizer's chat template, or the config's
            guarded(use_chat_template, tok, d.chat_template, cfg.model.name)
            _, long_rows, errors, lengths = encode_all_chat(tok, examples, d.max_length, system=d.system_prompt)
        else:
            _, long_rows, errors, lengths = encode_all(tok, examples, d.template, d.max_length)
        s = length_stats(lengths, d.max_length)
        typer.echo(
            f"tokens: p50 {s['p50']}, p95 {s['p95']}, max {s['max']}; over max_length {d.max_length}: "
            f"{s['over_max_length']}"
        )
        for msg in long_rows + errors:
            typer.echo(f"  - {msg}")
        report.problems += errors
    if report.problems or report.duplicates:
        raise typer.Exit(1)
    typer.echo("ok")


@app.command()
def merge(
    run: str = typer.Argument(..., help="Run folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged safetensors model."),
):
    """Merge the LoRA adapter into the base model and save it (safetensors)."""
    from .model import merge_run

    out = guarded(merge_run, run, output)
    typer.echo(f"merged model written to {out}")


@app.command()
def export(
    run: str = typer.Argument(..., help="Run folder."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="GGUF file to write (default: RUN/model-<type>.gguf)."
    ),
    weight_type: str = typer.Option(
        "q8_0",
        "--type",
        help="Type of the merged (adapted) weights: q8_0, f16 or f32. Other tensors keep the base GGUF's types.",
    ),
):
    """Export base + merged LoRA as one GGUF file for llama.cpp (generation.backend: llamacpp)."""
    from .infer.gguf_export import export_gguf

    out = guarded(export_gguf, run, output, weight_type)
    typer.echo(f"GGUF written to {out}")


@app.command()
def serve(
    run: str = typer.Argument(..., help="Run folder written by `kotune train`."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to bind. The default is loopback only; set an API key before binding others.",
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        "--api_key",
        envvar="KOTUNE_API_KEY",
        help="Require `Authorization: Bearer KEY` on every /v1 route (or set KOTUNE_API_KEY).",
    ),
    max_tokens_limit: int = typer.Option(
        1024, "--max_tokens_limit", min=1, help="Largest max_tokens a request may ask for."
    ),
    max_queue: int = typer.Option(
        64, "--max_queue", min=1, help="Requests waiting or generating at once; more get HTTP 429."
    ),
    max_batch: int = typer.Option(
        8, "--max_batch", min=1, help="Requests decoded together (1: one at a time); the others wait in the queue."
    ),
    timeout: float = typer.Option(
        300.0, "--timeout", min=0, help="Seconds a request may wait and generate before HTTP 504 (0: no limit)."
    ),
    greedy: Optional[bool] = typer.Option(
        None, "--greedy/--sample", help="Default decoding (a request's temperature overrides it)."
    ),
):
    """Serve a run: OpenAI-compatible API (/v1/chat/completions, /v1/models), /health and a chat page at /."""
    try:
        from .serve import Limits, create_app, run_server
    except ImportError as e:
        fail(e)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: serving on {host} without an API key: anyone who can reach it can use it.", err=True)
    limits = Limits(
        max_tokens=max_tokens_limit, max_queue=max_queue, max_batch=max_batch, request_timeout_s=timeout or None
    )
    app_ = guarded(create_app, run, api_key=api_key, limits=limits, greedy=greedy)
    batch = app_.state.worker.max_batch
    how = f"up to {batch} requests decoded together" if batch > 1 else "requests answered one at a time"
    typer.echo(f"serving {app_.state.model_id} on http://{host}:{port}/ (API: /v1, {how})")
    run_server(app_, host=host, port=port)


@app.command(name="config")
def show_config(
    config: Optional[Path] = typer.Argument(None, help="YAML config to resolve (defaults when omitted)."),
    sets: List[str] = typer.Option([], "--set", "-s", help="Override a key (repeatable)."),
    reference: bool = typer.Option(False, "--reference", help="Print the reference of every key (markdown)."),
):
    """Print the resolved config, or the reference of all keys."""
    if reference:
        from .config import config_reference

        typer.echo(config_reference())
        return
    typer.echo(_config(config, sets, {}).to_yaml())


def _normalise_argv(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (latest checkpoint) or take a PATH; `--debug` may come anywhere."""
    out = []
    for i, a in enumerate(argv):
        if a == "--debug":
            continue
        out.append(a)
        if a == "--resume" and (
            i + 1 == len(argv) or argv[i + 1].startswith("-") or argv[i + 1].endswith((".yaml", ".yml"))
        ):
            out.append("latest")
    return ["--debug"] * ("--debug" in argv) + out


def main() -> None:
    app(args=_normalise_argv(sys.argv[1:]), prog_name="kotune")


register_legal(app)

if __name__ == "__main__":
    main()
