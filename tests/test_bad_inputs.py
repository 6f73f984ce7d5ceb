"""Bad inputs as a new user gives them: bad data files, config mistakes, broken run folders, outputs that would
destroy a run, read-only folders, a full disk.

Every case of the table is one command with the exit code it must end with, a phrase its message must contain, no
traceback, and no file outside its output changed. Big or binary fixtures are made here, not committed. The data-loss
tests after the table check that a run survives byte for byte what would have destroyed it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import ROOT, qa_rows, write_csv
from typer.testing import CliRunner

from kotune.cli import _normalise_argv, app

runner = CliRunner()


def cli(*args, input=None):
    return runner.invoke(app, _normalise_argv([str(a) for a in args]), input=input)


# ---------------------------------------------------------------- fixtures made per case


def text(rel: str, body: str, encoding: str = "utf-8") -> Callable:
    return lambda ws: _put(ws / rel, body.encode(encoding))


def raw(rel: str, body: bytes) -> Callable:
    return lambda ws: _put(ws / rel, body)


def qa(rel: str, n: int = 12, encoding: str = "utf-8", change: Callable[[list], None] | None = None) -> Callable:
    def make(ws):
        rows = qa_rows(n)
        if change:
            change(rows)
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        write_csv(ws / rel, rows, encoding=encoding)

    return make


def lines(n: int) -> str:
    return "".join(f"{r['question']},{r['answer'].replace(',', '')}\n" for r in qa_rows(n))


def run_copy(rel: str = "run", without: tuple[str, ...] = ()) -> Callable:
    """A copy of the session's finished tiny run (the shared one stays untouched)."""

    def make(ws):
        shutil.copytree(ws.tiny_run, ws / rel)
        for w in without:
            target = ws / rel / w
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    return make


def truncate(rel: str, keep: float = 0.5) -> Callable:
    def make(ws):
        data = (ws / rel).read_bytes()
        (ws / rel).write_bytes(data[: int(len(data) * keep)])

    return make


def _put(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)


class Workspace(type(Path())):
    """The case's folder; `tiny_run` is the session's finished run that `run_copy` copies."""


HEADER = "question,answer\n"
GGUF_BYTES = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 8
TRAIN = (
    "train --set model.name={model} --csv_path {ws}/%s --output_dir {ws}/out --max_steps 2 --batch_size 4 "
    "--set logging.progress_bar=false --set memory.mixed_precision=no --set data.max_length=128"
)
DRY = TRAIN + " --dry_run"
CHAT = "chat {ws}/run --question 전세권이란?"
QS = '{"id": 1, "question": "전세권이란 무엇인가요?"}\n{"id": 2, "question": "계약금은?"}\n'


@dataclass
class Case:
    id: str
    cmd: str
    code: int
    phrase: str
    setup: tuple = ()
    output: str | None = None  # the one path (relative to the workspace) the command may change


def _empty_answer(rows):
    rows[4]["answer"] = ""


CASES = [
    # ---- data files: validate
    Case(
        "unclosed-quote-to-eof",
        "validate {ws}/q.csv",
        2,
        "row 4 (line 4): the quoted cell that opens here is never closed",
        (text("q.csv", HEADER + 'q1,a1\nq2,a2\nq3,"a3\n' + lines(7)),),
    ),
    Case(
        "unclosed-quote-closed-later",
        "validate {ws}/q.csv",
        2,
        "line 3): the quoted cell that opens here has no closing quote",
        (text("q.csv", HEADER + 'q1,a1\nq2,"a2\nq3,a3\nq4,"a4"\nq5,a5\n'),),
    ),
    Case(
        "text-after-closing-quote",
        "validate {ws}/q.csv",
        2,
        "row 2 (line 2): text follows a closing quote",
        (text("q.csv", HEADER + 'q1,"a1" and more\nq2,a2\n'),),
    ),
    Case(
        "unclosed-quote-in-header",
        "validate {ws}/q.csv",
        2,
        "row 1 (line 1)",
        (text("q.csv", 'question,"answer\nq1,a1\n'),),
    ),
    Case(
        "field-over-131072-chars",
        "validate {ws}/q.csv",
        0,
        "2 rows read",
        (text("q.csv", HEADER + "q1," + "가나다 " * 40000 + "\nq2,a2\n"),),
    ),
    Case(
        "xlsx-workbook",
        "validate {ws}/book.xlsx",
        2,
        "Export it to CSV",
        (raw("book.xlsx", b"PK\x03\x04" + bytes(200)),),
    ),
    Case(
        "xlsx-saved-as-csv",
        "validate {ws}/book.csv",
        2,
        "spreadsheet workbook",
        (raw("book.csv", b"PK\x03\x04\x14\x00" + bytes(99)),),
    ),
    Case(
        "old-xls-workbook",
        "validate {ws}/book.xls",
        2,
        "Export it to CSV",
        (raw("book.xls", b"\xd0\xcf\x11\xe0" + bytes(99)),),
    ),
    Case("pdf", "validate {ws}/q.csv", 2, "a PDF document", (raw("q.csv", b"%PDF-1.7\n" + bytes(50)),)),
    Case("parquet", "validate {ws}/q.csv", 2, "data.dataset_name", (raw("q.csv", b"PAR1" + bytes(50)),)),
    Case(
        "binary-with-nul-bytes",
        "validate {ws}/q.csv",
        2,
        "contains NUL bytes",
        (raw("q.csv", b"question,answer\n\x00\x01\x02\n"),),
    ),
    Case(
        "json-array-read",
        "validate {ws}/q.json",
        0,
        "2 rows read",
        (
            text(
                "q.json",
                json.dumps(
                    [
                        {"question": "전세권?", "answer": "물권입니다."},
                        {"instruction": "계약금?", "input": "", "output": "해제할 수 있습니다."},
                    ],
                    ensure_ascii=False,
                ),
            ),
        ),
    ),
    Case(
        "json-array-broken",
        "validate {ws}/q.json",
        2,
        "not valid JSON",
        (text("q.json", '[{"question": "q", "answer": "a"},'),),
    ),
    Case(
        "json-array-non-object-item",
        "validate {ws}/q.json",
        1,
        "record 2 is not a JSON object",
        (text("q.json", '[{"question": "q", "answer": "a"}, 3]'),),
    ),
    Case(
        "pretty-printed-single-object",
        "validate {ws}/q.json",
        2,
        "one JSON object spread over several lines",
        (text("q.json", '{\n  "question": "q",\n  "answer": "a"\n}\n'),),
    ),
    Case(
        "tsv-detected",
        "validate {ws}/q.tsv",
        0,
        "tab-separated",
        (text("q.tsv", "question\tanswer\nq1\ta1, b\nq2\ta2\n"),),
    ),
    Case(
        "semicolon-csv-detected",
        "validate {ws}/q.csv",
        0,
        "semicolon-separated",
        (text("q.csv", "question;answer\nq1;a1, with a comma\nq2;a2\n"),),
    ),
    Case(
        "semicolon-cell-count-advice",
        "validate {ws}/q.csv",
        1,
        "quote cells that contain semicolons",
        (text("q.csv", "question;answer\nq1;a1;extra\nq2;a2\n"),),
    ),
    Case(
        "excel-unicode-text-utf16",
        "validate {ws}/q.txt",
        0,
        "utf-16",
        (raw("q.txt", "question\tanswer\n전세권?\t물권입니다.\n계약금?\t해제\n".encode("utf-16")),),
    ),
    Case("cp949-csv", "validate {ws}/q.csv", 0, "encoding cp949", (qa("q.csv", encoding="cp949"),)),
    Case(
        "undecodable-bytes",
        "validate {ws}/q.csv",
        2,
        "data.encoding",
        (raw("q.csv", b"question,answer\n\xff\xfe\xfa,\x80\x81\n"),),
    ),
    Case("empty-file", "validate {ws}/q.csv", 2, "the file is empty", (text("q.csv", ""),)),
    Case("header-only", "validate {ws}/q.csv", 2, "no usable rows", (text("q.csv", HEADER),)),
    Case("wrong-columns", "validate {ws}/q.csv", 2, "lacks column(s) question", (text("q.csv", "질문,답변\n가,나\n"),)),
    Case("missing-file", "validate {ws}/nope.csv", 2, "file not found"),
    Case("unknown-suffix", "validate {ws}/q.xml", 2, "unknown file type `.xml`", (text("q.xml", "<a/>"),)),
    Case("extra-cells", "validate {ws}/q.csv", 1, "row 3 has 3 cells", (text("q.csv", HEADER + "q1,a1\nq2,a2,x\n"),)),
    Case("empty-answer", "validate {ws}/q.csv", 1, "row 6: empty answer", (qa("q.csv", change=_empty_answer),)),
    Case(
        "jsonl-bad-line",
        "validate {ws}/q.jsonl",
        1,
        "line 2 is not valid JSON",
        (text("q.jsonl", '{"question": "q", "answer": "a"}\n{"question": \n'),),
    ),
    Case(
        "jsonl-line-not-object",
        "validate {ws}/q.jsonl",
        1,
        "line 2 is not a JSON object",
        (text("q.jsonl", '{"question": "q", "answer": "a"}\n[1, 2]\n'),),
    ),
    Case(
        "unknown-encoding-name",
        "validate {ws}/q.csv --config {ws}/c.yaml",
        2,
        "not an encoding name",
        (qa("q.csv"), text("c.yaml", "data:\n  encoding: utf-9\n")),
    ),
    # ---- data files and config: train --dry_run
    Case(
        "dry-run-field-over-131072-chars",
        DRY % "q.csv" + " --set data.eval_ratio=0",
        0,
        "rows over max_length 128: 1 (dropped)",
        (text("q.csv", HEADER + lines(11) + "q99," + "가나다 " * 40000 + "\n"),),
    ),
    Case(
        "dry-run-unclosed-quote",
        DRY % "q.csv",
        2,
        "is never closed",
        (text("q.csv", HEADER + lines(3) + 'q,"a\n' + lines(6)),),
    ),
    Case("dry-run-xlsx", DRY % "q.xlsx", 2, "Export it to CSV", (raw("q.xlsx", b"PK\x03\x04" + bytes(99)),)),
    Case(
        "set-template-not-yaml",
        DRY % "q.csv" + " --set 'data.template=Q: {{question}} A: {{answer}}'",
        0,
        "template: 'Q: {{question}} A: {{answer}}'",
        (qa("q.csv"),),
    ),
    Case(
        "set-template-yaml-mapping",
        "config --set 'data.template={{question}}'",
        2,
        "must contain `{{question}}` and `{{answer}}`",
    ),
    Case(
        "template-unknown-placeholder",
        DRY % "q.csv" + " --set 'data.template=Q: {{question}} {{foo}} A: {{answer}}'",
        2,
        "unknown placeholder(s) {{foo}}",
        (qa("q.csv"),),
    ),
    Case(
        "template-placeholder-typo",
        "config --set 'data.template=Q: {{Question}} A: {{answer}}'",
        2,
        "Did you mean `{{question}}`?",
    ),
    Case(
        "template-literal-backslash-n",
        "config --set 'data.template=Q: {{question}}\\n A: {{answer}}'",
        2,
        "on the command line: --set",
    ),
    Case("set-without-equals", "config --set training.learning_rate", 2, "expected `section.key=value`"),
    Case("set-unknown-section", "config --set trainig.epochs=1", 2, "Did you mean `training`?"),
    Case("set-unknown-key", "config --set training.learning_rat=1", 2, "Did you mean `learning_rate`?"),
    Case("max-steps-zero", DRY % "q.csv" + " --max_steps 0", 2, "training.max_steps", (qa("q.csv"),)),
    Case("batch-size-zero", DRY % "q.csv" + " --batch_size 0", 2, "data.batch_size", (qa("q.csv"),)),
    Case("unknown-task", DRY % "q.csv" + " --task translate-it", 2, "model.task", (qa("q.csv"),)),
    Case("config-missing", "train --config {ws}/nope.yaml", 2, "file not found"),
    Case("config-not-yaml", "train --config {ws}/c.yaml", 2, "not valid YAML", (text("c.yaml", "model: [unclosed\n"),)),
    Case(
        "config-top-level-list",
        "train --config {ws}/c.yaml",
        2,
        "top level must be a mapping",
        (text("c.yaml", "- a\n- b\n"),),
    ),
    Case(
        "model-path-missing",
        "train --csv_path {ws}/q.csv --model_name ./no/such/model --output_dir {ws}/out --dry_run",
        2,
        "no such folder or file",
        (qa("q.csv"),),
    ),
    Case("data-file-missing", DRY % "nope.csv", 2, "file not found"),
    # ---- run folders: train
    Case(
        "finished-run-without-checkpoints",
        (TRAIN % "q.csv").replace("{ws}/out", "{ws}/run"),
        2,
        "already holds a finished run",
        (qa("q.csv"), run_copy(without=("checkpoints",))),
    ),
    Case(
        "checkpoints-only-folder",
        (TRAIN % "q.csv").replace("{ws}/out", "{ws}/run"),
        2,
        "already holds checkpoints",
        (qa("q.csv"), run_copy(without=("adapter", "config.yaml"))),
    ),
    Case(
        "overwrite-with-empty-answer",
        (TRAIN % "q.csv").replace("{ws}/out", "{ws}/run") + " --overwrite",
        2,
        "row 6: empty answer",
        (qa("q.csv", change=_empty_answer), run_copy()),
    ),
    Case(
        "overwrite-with-missing-model",
        (TRAIN % "q.csv").replace("{ws}/out", "{ws}/run").replace("model.name={model}", "model.name=./no/model")
        + " --overwrite",
        2,
        "no such folder or file",
        (qa("q.csv"), run_copy()),
    ),
    Case(
        "resume-without-checkpoints",
        (TRAIN % "q.csv").replace("{ws}/out", "{ws}/run") + " --resume",
        2,
        "no checkpoint found",
        (qa("q.csv"), run_copy(without=("checkpoints",))),
    ),
    Case(
        "resume-all-checkpoints-broken",
        (TRAIN % "q.csv").replace("{ws}/out", "{ws}/run") + " --resume",
        2,
        "no intact checkpoint",
        (
            qa("q.csv"),
            run_copy(),
            truncate("run/checkpoints/step-0000006/state.pt"),
            truncate("run/checkpoints/step-0000008/trainable.safetensors"),
        ),
    ),
    Case(
        "train-read-only-output",
        (TRAIN % "q.csv").replace("{ws}/out", "{ro}/run"),
        2,
        "cannot write here",
        (qa("q.csv"),),
    ),
    # ---- chat: flags and damaged runs
    Case(
        "chat-negative-max-new-tokens",
        CHAT + " --max_new_tokens -5",
        2,
        "`generation.max_new_tokens` (--max_new_tokens)",
        (run_copy(),),
    ),
    Case(
        "chat-temperature-0-sample",
        CHAT + " --temperature 0 --sample",
        2,
        "Temperature 0 means no sampling",
        (run_copy(),),
    ),
    Case("chat-top-p-over-1", CHAT + " --top_p 1.5", 2, "generation.top_p", (run_copy(),)),
    Case(
        "chat-repetition-penalty-below-1",
        CHAT + " --repetition_penalty 0.5",
        2,
        "generation.repetition_penalty",
        (run_copy(),),
    ),
    Case(
        "chat-truncated-adapter",
        CHAT,
        2,
        "adapter_model.safetensors: damaged",
        (run_copy(), truncate("run/adapter/adapter_model.safetensors")),
    ),
    Case(
        "chat-adapter-replaced-by-gguf",
        CHAT,
        2,
        "not a safetensors file",
        (run_copy(), raw("run/adapter/adapter_model.safetensors", GGUF_BYTES)),
    ),
    Case(
        "chat-adapter-config-broken",
        CHAT,
        2,
        "adapter_config.json: damaged",
        (run_copy(), text("run/adapter/adapter_config.json", '{"r": 4,')),
    ),
    Case("chat-config-yaml-broken", CHAT, 2, "not valid YAML", (run_copy(), text("run/config.yaml", "model: [\n"))),
    Case("chat-not-a-run", "chat {ws} --question q", 2, "not a finished kotune run"),
    Case("chat-no-run-given", "chat --question q", 2, "give the run folder"),
    # ---- merge and export: outputs that would destroy the run
    Case("merge-into-run-itself", "merge {ws}/run --output {ws}/run", 2, "is the run folder", (run_copy(),)),
    Case(
        "merge-into-adapter", "merge {ws}/run --output {ws}/run/adapter", 2, "is the run's own adapter", (run_copy(),)
    ),
    Case(
        "merge-into-another-run",
        "merge {ws}/run --output {ws}/run2",
        2,
        "is a kotune run folder",
        (run_copy(), run_copy("run2")),
    ),
    Case(
        "merge-into-a-file",
        "merge {ws}/run --output {ws}/notes.txt",
        2,
        "is a file",
        (run_copy(), text("notes.txt", "mine")),
    ),
    Case(
        "merge-into-folder-with-other-files",
        "merge {ws}/run --output {ws}/docs",
        2,
        "already holds other files",
        (run_copy(), text("docs/thesis.md", "mine")),
    ),
    Case("merge-into-base-model", "merge {ws}/run --output {model}", 2, "is the run's base model", (run_copy(),)),
    Case(
        "merge-truncated-adapter",
        "merge {ws}/run --output {ws}/merged",
        2,
        "damaged",
        (run_copy(), truncate("run/adapter/adapter_model.safetensors")),
        output="merged",
    ),
    Case(
        "export-over-adapter",
        "export {ws}/run --output {ws}/run/adapter/adapter_model.safetensors",
        2,
        "ending in .gguf",
        (run_copy(),),
    ),
    Case(
        "export-into-adapter-folder",
        "export {ws}/run --output {ws}/run/adapter/x.gguf",
        2,
        "is inside the run's own adapter",
        (run_copy(),),
    ),
    Case("export-over-config", "export {ws}/run --output {ws}/run/config.yaml", 2, "ending in .gguf", (run_copy(),)),
    Case(
        "export-truncated-adapter",
        "export {ws}/run",
        2,
        "adapter_model.safetensors: damaged",
        (run_copy(), truncate("run/adapter/adapter_model.safetensors")),
    ),
    Case("export-unknown-type", "export {ws}/run --type q4", 2, "unknown GGUF weight type", (run_copy(),)),
    Case("export-read-only-output", "export {ws}/run --output {ro}/m.gguf", 2, "cannot write here", (run_copy(),)),
    # ---- ask: every input checked before the model loads
    Case(
        "ask-questions-missing",
        "ask {ws}/run --questions {ws}/nope.jsonl --output {ws}/a.jsonl",
        2,
        "file not found",
        (run_copy(),),
    ),
    Case(
        "ask-questions-bad-json",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/a.jsonl",
        2,
        "line 2 is not valid JSON",
        (run_copy(), text("q.jsonl", '{"question": "q"}\n{"question": \n')),
    ),
    Case(
        "ask-questions-empty",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/a.jsonl",
        2,
        "no questions in the file",
        (run_copy(), text("q.jsonl", "\n\n")),
    ),
    Case(
        "ask-questions-no-question-field",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/a.jsonl",
        2,
        'line 1 needs a non-empty "question"',
        (run_copy(), text("q.jsonl", '{"id": 1, "q": "x"}\n')),
    ),
    Case(
        "ask-questions-is-xlsx",
        "ask {ws}/run --questions {ws}/q.xlsx --output {ws}/a.jsonl",
        2,
        "Export it to CSV",
        (run_copy(), raw("q.xlsx", b"PK\x03\x04" + bytes(99))),
    ),
    Case(
        "ask-batch-size-zero",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/a.jsonl --batch_size 0",
        2,
        "Invalid value for '--batch_size'",
        (run_copy(), text("q.jsonl", QS)),
    ),
    Case(
        "ask-output-is-questions-file",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/q.jsonl",
        2,
        "is an input of this command",
        (run_copy(), text("q.jsonl", QS)),
    ),
    Case(
        "ask-output-over-run-config",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/run/config.yaml",
        2,
        "is the run's own config.yaml",
        (run_copy(), text("q.jsonl", QS)),
    ),
    Case(
        "ask-output-is-a-folder",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/run",
        2,
        "is a folder",
        (run_copy(), text("q.jsonl", QS)),
    ),
    Case(
        "ask-read-only-output",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ro}/a.jsonl",
        2,
        "cannot write here",
        (run_copy(), text("q.jsonl", QS)),
    ),
    Case(
        "ask-negative-max-new-tokens",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/a.jsonl --max_new_tokens 0",
        2,
        "generation.max_new_tokens",
        (run_copy(), text("q.jsonl", QS)),
    ),
    Case(
        "ask-not-a-run",
        "ask {ws}/empty --questions {ws}/q.jsonl --output {ws}/a.jsonl",
        2,
        "not a finished kotune run",
        (text("q.jsonl", QS), text("empty/readme.txt", "x")),
    ),
    Case(
        "ask-cp949-questions",
        "ask {ws}/run --questions {ws}/q.jsonl --output {ws}/a.jsonl --max_new_tokens 2",
        0,
        "wrote",
        (run_copy(), text("q.jsonl", QS, encoding="cp949")),
        output="a.jsonl",
    ),
    Case("merge-read-only-output", "merge {ws}/run --output {ro}/merged", 2, "cannot write here", (run_copy(),)),
    Case(
        "eval-output-over-run-config",
        "eval {ws}/run --questions {ws}/dev.jsonl --output {ws}/run/config.yaml",
        2,
        "is the run's own config.yaml",
        (run_copy(), text("dev.jsonl", '{"question": "q", "citations": [], "key_facts": []}\n')),
    ),
    Case(
        "eval-questions-cp949-empty",
        "eval {ws}/run --questions {ws}/dev.jsonl",
        2,
        "no questions in the file",
        (run_copy(), text("dev.jsonl", "\n", encoding="cp949")),
    ),
    Case(
        "predict-output-is-input",
        "predict {ws}/run --input {ws}/t.csv --output {ws}/t.csv",
        2,
        "is an input of this command",
        (
            run_copy(),
            text("t.csv", "text\nhello\n"),
            text("run/config.yaml", "model:\n  task: text-classification\ndata:\n  train_file: x.csv\n"),
        ),
    ),
    # ---- other flags
    Case("eval-batch-size-zero", "eval {ws}/run --batch_size 0", 2, "Invalid value for '--batch_size'"),
    Case("eval-limit-zero", "eval {ws}/run --limit 0", 2, "Invalid value for '--limit'"),
    Case(
        "predict-batch-size-zero",
        "predict {ws}/run --input {ws}/q.csv --batch_size 0",
        2,
        "Invalid value for '--batch_size'",
    ),
    Case(
        "predict-on-a-chat-run",
        "predict {ws}/run --input {ws}/nope.csv",
        2,
        "use `kotune ask` / `kotune chat`",
        (run_copy(),),
    ),
    Case(
        "predict-input-missing",
        "predict {ws}/run --input {ws}/nope.csv",
        2,
        "nope.csv: file not found",
        (run_copy(), text("run/config.yaml", "model:\n  task: text-classification\ndata:\n  train_file: x.csv\n")),
    ),
    Case("retrieve-k-zero", "retrieve 전세권 --k 0", 2, "Invalid value for '--k'"),
    Case("serve-port-out-of-range", "serve {ws}/run --port 70000", 2, "Invalid value for '--port'"),
    Case("unknown-command", "trian --config x.yaml", 2, "No such command"),
]


@pytest.fixture(scope="module")
def readonly_root(tmp_path_factory):
    """A folder no write can go into. chmod stops other users; root writes through it, but not into /sys."""
    if os.geteuid() != 0:
        ro = tmp_path_factory.mktemp("ro")
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    ro = Path("/sys/kotune-read-only")
    try:
        ro.mkdir()
    except OSError:
        yield ro
        return
    ro.rmdir()
    pytest.skip("no folder here refuses writes to root")


def _snapshot(*roots: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha1(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_corpus_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_gpt2, tiny_run, request):
    ws = Workspace(tmp_path / "ws")
    ws.mkdir()
    ws.tiny_run = tiny_run
    for make in case.setup:
        make(ws)
    ro = request.getfixturevalue("readonly_root") if "{ro}" in case.cmd else None
    args = shlex.split(case.cmd.format(ws=ws, model=tiny_gpt2, ro=ro))
    before = _snapshot(ws, tiny_gpt2, tiny_run)
    res = cli(*args)
    out = res.output
    assert res.exit_code == case.code, out
    assert case.phrase.format() in out, out
    assert "Traceback" not in out and (res.exception is None or isinstance(res.exception, SystemExit)), out
    after = _snapshot(ws, tiny_gpt2, tiny_run)
    allowed = str(ws / case.output) if case.output else None
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and not (allowed and k.startswith(allowed))
    )
    assert not changed, f"files changed outside the output: {changed}"
    if case.code == 0 and case.output:
        assert (ws / case.output).exists()


# ---------------------------------------------------------------- data loss: the run survives byte for byte


@pytest.fixture
def old_run(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _train_args(model, data, out, *extra):
    return [
        "train",
        "--set",
        f"model.name={model}",
        "--csv_path",
        data,
        "--output_dir",
        out,
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "memory.mixed_precision=no",
        "--set",
        "data.max_length=128",
        "--set",
        "training.save_steps=1",
        *extra,
    ]


def test_overwrite_with_bad_data_keeps_every_file_of_the_old_run(old_run, tiny_gpt2, tmp_path):
    rows = qa_rows(12)
    rows[4]["answer"] = ""
    bad = write_csv(tmp_path / "bad.csv", rows)
    before = _snapshot(old_run)
    res = cli(*_train_args(tiny_gpt2, bad, old_run, "--overwrite"))
    assert res.exit_code == 2 and "row 6: empty answer" in res.output, res.output
    assert _snapshot(old_run) == before  # same files, same bytes: nothing added, nothing lost


def test_finished_run_without_checkpoints_is_not_overwritten(old_run, tiny_gpt2, qa_csv):
    shutil.rmtree(old_run / "checkpoints")
    before = _snapshot(old_run)
    res = cli(*_train_args(tiny_gpt2, qa_csv, old_run))
    assert res.exit_code == 2 and "already holds a finished run" in res.output and "--overwrite" in res.output
    assert _snapshot(old_run) == before


@pytest.fixture
def gguf_run(tmp_path, tiny_gemma, tiny_gemma_run, monkeypatch):
    """A run whose base model counts as a GGUF (the tiny Gemma written as one), so `export` really writes."""
    from test_fastgen import _template_gguf

    import kotune.infer.gguf_export as ge

    run = tmp_path / "run"
    shutil.copytree(tiny_gemma_run, run)
    template = _template_gguf(tiny_gemma, tmp_path / "base.gguf")
    monkeypatch.setattr(ge, "base_gguf", lambda *a: template)
    return run


@pytest.mark.parametrize(
    "args",
    [
        ["export", "{run}", "--output", "{run}/adapter/adapter_model.safetensors"],
        ["export", "{run}", "--output", "{run}/adapter/model.gguf"],
        ["export", "{run}", "--output", "{run}/checkpoints/x.gguf"],
        ["merge", "{run}", "--output", "{run}"],
        ["merge", "{run}", "--output", "{run}/adapter"],
        ["merge", "{run}", "--output", "{run}/checkpoints/step-0000008"],
    ],
    ids=[
        "export-over-adapter",
        "export-into-adapter",
        "export-into-checkpoints",
        "merge-into-run",
        "merge-into-adapter",
        "merge-into-checkpoint",
    ],
)
def test_export_or_merge_into_the_run_leaves_it_byte_identical(gguf_run, args):
    before = _snapshot(gguf_run)
    res = cli(*[a.format(run=gguf_run) for a in args])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert _snapshot(gguf_run) == before


def test_export_into_the_run_folder_writes_the_default_file_and_no_temp_file(gguf_run):
    """`export RUN --output RUN` crashed and left a temp file: a folder now gets `model-<type>.gguf` in it."""
    before = _snapshot(gguf_run)
    res = cli("export", gguf_run, "--output", gguf_run)
    assert res.exit_code == 0, res.output
    after = _snapshot(gguf_run)
    assert after.keys() - before.keys() == {str(gguf_run / "model-q8_0.gguf")}
    assert all(after[k] == v for k, v in before.items())


def test_a_failed_gguf_write_leaves_no_temp_file(tiny_gemma, tiny_gemma_run, tmp_path, monkeypatch):
    import gguf
    from test_fastgen import _template_gguf

    from kotune.infer.gguf_export import adapted_weights, hf_to_gguf_names, write_merged_gguf

    template = _template_gguf(tiny_gemma, tmp_path / "base.gguf")
    name = hf_to_gguf_names("gemma3", 2)
    merged = {name(k): v for k, v in adapted_weights(tiny_gemma_run).items()}

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
    with pytest.raises(OSError):
        write_merged_gguf(template, merged, tmp_path / "m.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


def test_overwrite_that_fails_before_a_checkpoint_puts_the_old_run_back(old_run, tiny_gpt2, qa_csv, monkeypatch):
    import kotune.train.loop as loop

    def broken(*a, **k):
        raise RuntimeError("model failed to load")

    monkeypatch.setattr(loop, "_build_model", broken)
    before = _snapshot(old_run)
    res = cli(*_train_args(tiny_gpt2, qa_csv, old_run, "--overwrite"))
    assert res.exit_code == 1 and "model failed to load" in res.output and "--debug" in res.output, res.output
    after = _snapshot(old_run)
    new_logs = {k for k in after.keys() - before.keys() if Path(k).name.startswith("training_")}
    assert {k: v for k, v in after.items() if k not in new_logs} == before  # the failed run's own log stays beside it
    assert not (old_run / ".kotune-previous").exists()


def test_overwrite_replaces_the_run_only_when_the_new_one_finishes(old_run, tiny_gpt2, qa_csv):
    old_adapter = (old_run / "adapter" / "adapter_model.safetensors").read_bytes()
    (old_run / "model-q8_0.gguf").write_bytes(b"stale export of the old adapter")
    (old_run / "answers.jsonl").write_text("the user's own file\n", encoding="utf-8")
    res = cli(*_train_args(tiny_gpt2, qa_csv, old_run, "--overwrite"))
    assert res.exit_code == 0, res.output
    assert (old_run / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert not (old_run / ".kotune-previous").exists() and not (old_run / "model-q8_0.gguf").exists()
    assert (old_run / "answers.jsonl").read_text(encoding="utf-8") == "the user's own file\n"
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


# ---------------------------------------------------------------- checkpoints: truncated, full disk


@pytest.mark.parametrize("broken", ["trainable.safetensors", "state.pt"])
def test_resume_falls_back_from_a_truncated_checkpoint(old_run, broken):
    from kotune.train.report import read_metrics

    bad = old_run / "checkpoints" / "step-0000008" / broken
    bad.write_bytes(bad.read_bytes()[:100])
    res = cli("train", "--config", old_run / "config.yaml", "--output_dir", old_run, "--max_steps", 10, "--resume")
    assert res.exit_code == 0, res.output
    assert f"{bad}: unreadable" in res.output and "trying the checkpoint before it" in res.output
    assert "resumed from" in res.output and "step-0000006 at step 6" in res.output
    steps = [r["step"] for r in read_metrics(old_run / "metrics.jsonl") if "loss" in r]
    assert steps[-4:] == [7, 8, 9, 10]


def test_full_disk_during_a_checkpoint_write(old_run, tiny_gpt2, qa_csv, monkeypatch):
    """The partial checkpoint is removed, the message says what happened, and an --overwrite puts the old run back."""
    import torch

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    before = _snapshot(old_run)
    res = cli(*_train_args(tiny_gpt2, qa_csv, old_run, "--overwrite"))
    monkeypatch.setattr(torch, "save", real_save)
    assert res.exit_code == 2, res.output
    assert "could not write checkpoint" in res.output and "the disk is full" in res.output and "removed" in res.output
    assert "Traceback" not in res.output
    after = _snapshot(old_run)
    assert not [k for k in after if "/.tmp-" in k]
    assert {k: v for k, v in after.items() if not Path(k).name.startswith("training_")} == {
        k: v for k, v in before.items() if not Path(k).name.startswith("training_")
    }


def test_load_intact_names_the_broken_file(tmp_path):
    from kotune.train.checkpoint import CheckpointError, load_intact

    ck = tmp_path / "checkpoints" / "step-0000002"
    ck.mkdir(parents=True)
    (ck / "trainable.safetensors").write_bytes(b"\x00" * 10)
    (ck / "state.pt").write_bytes(b"x")
    warnings = []
    with pytest.raises(CheckpointError, match="trainable.safetensors: unreadable"):
        load_intact(tmp_path, warnings.append)
    assert warnings and "no earlier checkpoint" in warnings[0]
    with pytest.raises(CheckpointError, match="no intact checkpoint"):  # a checkpoint named directly is never replaced
        load_intact(ck, warnings.append)


# ---------------------------------------------------------------- the CLI-wide rule for unexpected errors


def _boom(*a, **k):
    raise RuntimeError("something nobody planned for")


def test_unexpected_error_is_one_line_with_command_input_and_debug_hint(qa_csv, monkeypatch):
    import kotune.data

    monkeypatch.setattr(kotune.data, "load_examples", _boom)
    res = cli("validate", qa_csv)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1, res.output
    assert f"`kotune validate {qa_csv}` failed: RuntimeError: something nobody planned for" in lines[0]
    assert "--debug for the traceback" in lines[0]
    res = cli("validate", qa_csv, "--debug")  # after the command, too
    assert isinstance(res.exception, RuntimeError)


def test_unexpected_error_in_a_real_process_prints_no_traceback(qa_csv):
    code = (
        "import sys, kotune.data as d\n"
        "def boom(*a, **k): raise KeyError('row')\n"
        "d.load_examples = boom\n"
        "from kotune.cli import main\n"
        f"sys.argv = ['kotune', 'validate', {str(qa_csv)!r}] + sys.argv[1:]\n"
        "main()\n"
    )
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert "KeyError" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run([sys.executable, "-c", code, "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode == 1 and "KeyError" in debug.stderr and "boom" in debug.stderr
