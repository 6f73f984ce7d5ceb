"""Load question/answer rows from CSV, JSONL or Hugging Face datasets.

Every problem names its file and row; nothing is dropped without being
counted in the returned `DataReport`. No torch or transformers import here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

ENCODINGS = ("utf-8-sig", "cp949")  # utf-8-sig also reads plain utf-8; cp949 is a superset of euc-kr
DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
# Files that are not text at all, recognised by their first bytes: decoding them would only report an encoding problem.
_BINARY = ((b"PAR1", "a Parquet file"), (b"\x7fELF", "a program"), (b"%PDF", "a PDF document"))
_SPREADSHEETS = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")


@dataclass
class Example:
    question: str
    answer: str
    source: str  # "file:row" so any later problem can point back to the row
    category: str = ""
    difficulty: str = ""
    # `data.format: chat`: the whole conversation, [{"role": "system"|"user"|"assistant", "content": str}, …]
    # (a CSV or question/answer row is one user and one assistant turn); `question`/`answer` are then its last
    # user and assistant turns. None with `format: plain`, where every user → assistant pair is its own row.
    messages: list[dict] | None = None


@dataclass
class DataReport:
    path: str
    encoding: str | None = None
    rows_read: int = 0
    problems: list[str] = field(default_factory=list)  # rows with errors (empty cells, broken JSON)
    duplicates: list[str] = field(default_factory=list)
    skipped: int = 0
    unit: str = "record"  # what a problem's number counts: CSV rows, JSONL lines, or records of a JSON array / dataset
    delimiter: str = ","

    def summary(self) -> str:
        enc = f", encoding {self.encoding}" if self.encoding else ""
        if self.delimiter != ",":
            enc += f", {DELIMITERS[self.delimiter]}-separated"
        return (
            f"{self.path}: {self.rows_read} rows read{enc}; {len(self.problems)} bad, "
            f"{len(self.duplicates)} duplicate, {self.skipped} skipped"
        )


def _not_text(path: Path, raw: bytes) -> None:
    """Refuse workbooks and other binary files by what they are; their bytes would only fail to decode."""
    if path.suffix.lower() in _SPREADSHEETS or raw.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise DataError(
            [
                f"{path}: this is a spreadsheet workbook (or another zip/binary file), not a text file. Export "
                "it to CSV (Excel: File → Save As → 'CSV UTF-8 (comma delimited)') and give the .csv file."
            ]
        )
    for magic, what in _BINARY:
        if raw.startswith(magic):
            hint = " Give it as `data.dataset_name` (needs kotune[datasets])." if magic == b"PAR1" else ""
            raise DataError([f"{path}: this is {what}, not a CSV or JSONL text file.{hint}"])
    if b"\x00" in raw[:4096] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError([f"{path}: this is a binary file (it contains NUL bytes), not a CSV or JSONL text file."])


def read_text(path: Path, encoding: str | None) -> tuple[str, str]:
    raw = path.read_bytes()
    _not_text(path, raw)
    if encoding is None and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" export
        return raw.decode("utf-16"), "utf-16"
    tried = [encoding] if encoding else list(ENCODINGS)
    for enc in tried:
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
        except LookupError:
            raise DataError(
                [
                    f"{path}: `data.encoding: {enc}` is not an encoding name Python knows; use e.g. utf-8 or cp949, "
                    "or unset it to detect the encoding."
                ]
            ) from None
    raise DataError(
        [
            f"{path}: cannot decode as {' or '.join(tried)}. Save it as UTF-8, or set `data.encoding` to the file's "
            "encoding."
        ]
    )


def _delimiter(path: Path, header_line: str, qcol: str, acol: str) -> str:
    """The delimiter that splits the header into the expected columns (Excel writes `;` in many locales, tab for
    "Unicode text"); the suffix's own delimiter is tried first."""
    order = ["\t", ",", ";", "|"] if path.suffix.lower() == ".tsv" else [",", "\t", ";", "|"]
    for d in order:
        cells = [c.strip() for c in next(csv.reader([header_line], delimiter=d))]
        if qcol in cells and acol in cells:
            return d
    return order[0]


def _quote_problem(path: Path, text: str, first: int, last: int, err: csv.Error, row: int) -> str:
    """Where a strict parse failed: the line that opens a quote it never closes, or text after a closing quote."""
    lines = text.split("\n")  # the line breaks csv counts (splitlines would also break at \x0b, \x1c, …)
    for n in range(first, min(last, len(lines)) + 1):
        if lines[n - 1].count('"') % 2:
            end = (
                "is never closed"
                if "end of data" in str(err)
                else f"has no closing quote (the next quote, line {last}, is followed by text)"
            )
            return (
                f"{path}: row {row} (line {n}): the quoted cell that opens here {end}, so the rows after it would be "
                'read as part of this cell. Close the quote, or write a quote inside a cell as "".'
            )
    return (
        f"{path}: row {row} (line {first}): text follows a closing quote ({err}). A quoted cell must end with its "
        'quote; write a quote inside a cell as "".'
    )


def _csv_rows(path: Path, text: str, qcol: str, acol: str, report: DataReport) -> list[dict]:
    report.unit = "row"
    report.delimiter = d = _delimiter(path, text.split("\n", 1)[0], qcol, acol)
    csv.field_size_limit(2**31 - 1)  # a long cell is a length problem for the tokenizer to report, not a crash here
    # strict: an unclosed quote raises instead of silently swallowing the rest of the file into one cell
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=d, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(
            [f"{path}: the file is empty. Expected a header row `{qcol},{acol},category,difficulty`."]
        ) from None
    except csv.Error as e:
        raise DataError([_quote_problem(path, text, 1, reader.line_num, e, 1)]) from None
    header = [h.strip() for h in header]
    missing = [c for c in (qcol, acol) if c not in header]
    if missing:
        raise DataError(
            [
                f"{path}: row 1 (header) lacks column(s) {', '.join(missing)}; found {', '.join(header) or 'nothing'}. "
                f"Rename the columns or set `data.question_column`/`data.answer_column` "
                f"(`data.text_column`/`data.label_column` for classification)."
            ]
        )
    rows = []
    i, line = 1, reader.line_num
    try:
        for i, cells in enumerate(reader, start=2):  # spreadsheet numbering: header is row 1
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                report.problems.append(
                    f"{path}: row {i} has {len(cells)} cells but the header has {len(header)}; quote cells that "
                    "contain "
                    f"{'commas' if d == ',' else DELIMITERS[d] + 's'}."
                )
                continue
            rows.append({"_row": i, **dict(zip(header, cells))})
    except csv.Error as e:  # fatal: past an unclosed quote no row can be trusted
        raise DataError([_quote_problem(path, text, line + 1, reader.line_num, e, i + 1)]) from None
    return rows


def json_records(path: Path, text: str, problems: list[str]) -> tuple[str, list[tuple[int, object]]]:
    """(unit, [(number, value)]): the lines of a JSONL file, or the items of a JSON array file (alpaca's own
    format). A line that is not JSON goes to `problems`; a whole file that cannot be read raises."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                [
                    f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). A file starting "
                    "with `[` must be one array of objects; JSON lines need one object per line."
                ]
            ) from None
        if isinstance(data, list):
            return "record", list(enumerate(data, start=1))
    items = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            if not items and not problems:
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    raise DataError(
                        [
                            f"{path}: one JSON object spread over several lines. Write one object per line "
                            "(JSON lines), or an array of objects `[{…}, {…}]`."
                        ]
                    ) from None
            problems.append(f"{path}: line {i} is not valid JSON ({e.msg} at column {e.colno}).")
    return "line", items


def _jsonl_rows(path: Path, text: str, qcol: str, acol: str, report: DataReport, chat: bool = False) -> list[dict]:
    rows = []
    report.unit, items = json_records(path, text, report.problems)
    for i, obj in items:
        if not isinstance(obj, dict):
            report.problems.append(f"{path}: {report.unit} {i} is not a JSON object.")
            continue
        rows.extend(_normalise_record(obj, f"{i}", qcol, acol, path, report, report.unit, chat))
    return rows


CHAT_ROLES = ("system", "user", "assistant")


def chat_turns(msgs, where: str) -> tuple[list[dict] | None, list[str]]:
    """A `messages` list checked for `data.format: chat`: (turns, problems). Turns are {role, content} with the
    content stripped: an optional system message first, then user and assistant turns alternating, starting with a
    user turn and ending with an assistant turn. `where` ("file: line 3") starts every problem."""
    if not isinstance(msgs, list) or not msgs:
        return None, [f"{where}: `messages` must be a non-empty list of {{role, content}}."]
    turns, problems = [], []
    for n, m in enumerate(msgs, start=1):
        if not isinstance(m, dict):
            problems.append(f"{where}: message {n} is not an object with `role` and `content`.")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            problems.append(f"{where}: message {n} has role {role!r}; the roles are system, user and assistant.")
        if not isinstance(content, str):
            problems.append(f"{where}: message {n} ({role}) has no text `content`.")
        elif not content.strip():
            problems.append(f"{where}: message {n} ({role}) has empty content; fill it in or delete the message.")
        turns.append({"role": role, "content": content.strip() if isinstance(content, str) else ""})
    if problems:
        return None, problems
    first = 1 if turns[0]["role"] == "system" else 0
    roles = [t["role"] for t in turns]
    if "system" in roles[first:]:
        n = roles.index("system", first) + 1
        return None, [f"{where}: message {n} is a system message; one may only come first."]
    if "assistant" not in roles:
        return None, [f"{where}: no assistant turn in `messages`, so nothing would be trained."]
    if roles[first] != "user":
        return None, [
            f"{where}: message {first + 1} is an assistant turn with no user turn before it; a conversation starts "
            "with a user turn (after an optional system message)."
        ]
    for n in range(first + 1, len(roles)):
        if roles[n] == roles[n - 1]:
            return None, [
                f"{where}: messages {n} and {n + 1} are both {roles[n]} turns; user and assistant turns must "
                "alternate (join them into one message)."
            ]
    if roles[-1] != "assistant":
        return None, [
            f"{where}: the last message ({len(roles)}) is a user turn that no assistant turn answers; end the "
            "conversation with an assistant turn or remove it."
        ]
    return turns, []


def _normalise_record(
    obj: dict, where: str, qcol: str, acol: str, path, report: DataReport, unit: str, chat: bool = False
) -> list[dict]:
    """Map the accepted record shapes onto question/answer rows (with `chat`, a `messages` record is one row that
    keeps its turns under `_messages`)."""
    if qcol in obj or acol in obj:
        return [{"_row": where, **obj}]
    if "instruction" in obj and "output" in obj:  # alpaca
        q = str(obj["instruction"]).strip()
        extra = str(obj.get("input") or "").strip()
        return [{"_row": where, qcol: f"{q}\n{extra}" if extra else q, acol: obj["output"]}]
    if "messages" in obj and chat:
        turns, problems = chat_turns(obj["messages"], f"{path}: {unit} {where}")
        if turns is None:
            report.problems.extend(problems)
            return []
        last = {t["role"]: t["content"] for t in turns}  # the last user and assistant turns
        extra = {k: obj[k] for k in ("category", "difficulty") if k in obj}
        return [{"_row": where, qcol: last["user"], acol: last["assistant"], "_messages": turns, **extra}]
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            report.problems.append(f"{path}: {unit} {where}: `messages` must be a list of {{role, content}}.")
            return []
        out, pending = [], None
        for turn, m in enumerate(msgs, start=1):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "user":
                pending = m.get("content", "")
            elif role == "assistant":
                if pending is None:
                    report.problems.append(
                        f"{path}: {unit} {where}: message {turn} is an assistant turn with no user turn before it."
                    )
                    continue
                out.append({"_row": f"{where}.{turn}", qcol: pending, acol: m.get("content", "")})
                pending = None
        if not out:
            report.problems.append(f"{path}: {unit} {where}: no user→assistant pair in `messages`.")
        return out
    report.problems.append(
        f"{path}: {unit} {where}: no `{qcol}`/`{acol}`, `instruction`/`output` or `messages` keys (found: "
        f"{', '.join(obj) or 'none'})."
    )
    return []


def _hf_rows(
    name: str, split: str, cache_dir: str | None, qcol: str, acol: str, report: DataReport, chat: bool = False
) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(["loading Hugging Face datasets needs the extra: pip install 'kotune[datasets]'"]) from None
    p = Path(name)
    try:
        if p.is_dir() and (
            (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()
        ):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError([f"{name}: no split `{split}`; it has {', '.join(ds)}. Set `data.dataset_split`."])
                ds = ds[split]
        elif p.is_file():
            builder = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(p.suffix.lower())
            if builder is None:
                raise DataError([f"{name}: unsupported data file type; use .csv, .jsonl, .json or .parquet."])
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:  # network, missing dataset, bad files: say which and how to fix
        raise DataError(
            [
                f"{name}: could not load the dataset ({type(e).__name__}: {e}). "
                "Check the name, the network, or pass a local `save_to_disk` folder."
            ]
        ) from None
    rows = []
    report.unit = "record"
    for i, rec in enumerate(ds, start=1):
        rows.extend(_normalise_record(dict(rec), str(i), qcol, acol, name, report, "record", chat))
    return rows


def load_examples(
    path: str | Path | None = None,
    *,
    dataset_name: str | None = None,
    dataset_split: str = "train",
    dataset_cache_dir: str | None = None,
    encoding: str | None = None,
    question_column: str = "question",
    answer_column: str = "answer",
    bad_rows: str = "error",
    duplicates: str = "drop",
    chat: bool = False,
) -> tuple[list[Example], DataReport]:
    """Read and check one data source. Raises `DataError` listing every problem
    that `bad_rows='error'` makes fatal; otherwise records them in the report.
    `chat` (`data.format: chat`): every example carries its conversation in `messages`."""
    qcol, acol = question_column, answer_column
    if dataset_name:
        report = DataReport(path=dataset_name)
        rows = _hf_rows(dataset_name, dataset_split, dataset_cache_dir, qcol, acol, report, chat)
        origin = dataset_name
    else:
        p = Path(path)
        report = DataReport(path=str(p))
        if p.is_dir():
            return load_examples(
                dataset_name=str(p),
                dataset_split=dataset_split,
                encoding=encoding,
                question_column=qcol,
                answer_column=acol,
                bad_rows=bad_rows,
                duplicates=duplicates,
                chat=chat,
            )
        if not p.is_file():
            raise DataError([f"{p}: file not found. Check `data.train_file` (or `--csv_path`)."])
        text, report.encoding = read_text(p, encoding)
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _jsonl_rows(p, text, qcol, acol, report, chat)
        elif suffix in (".csv", ".tsv", ".txt"):
            rows = _csv_rows(p, text, qcol, acol, report)
        else:
            raise DataError(
                [f"{p}: unknown file type `{suffix}`; use .csv, .tsv or .jsonl, or a `save_to_disk` folder."]
            )
        origin = str(p)
    report.rows_read = len(rows) + len(report.problems)
    unit = report.unit
    examples: list[Example] = []
    seen: dict[tuple, str] = {}
    for r in rows:
        where = f"{origin}: {unit} {r['_row']}"
        q = r.get(qcol)
        a = r.get(acol)
        q = "" if q is None else str(q).strip()
        a = "" if a is None else str(a).strip()
        empty = [c for c, v in ((qcol, q), (acol, a)) if not v]
        if empty:
            report.problems.append(f"{where}: empty {' and '.join(empty)}; fill it in or delete the row.")
            continue
        messages = None
        if chat:
            messages = r.get("_messages") or [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        key = (q, a) if messages is None else tuple((t["role"], t["content"]) for t in messages)
        if key in seen:
            msg = f"{where}: duplicate of {seen[key]}"
            if duplicates == "error":
                report.problems.append(msg + "; delete one of them.")
                continue
            report.duplicates.append(msg)
            if duplicates == "drop":
                continue
        seen.setdefault(key, f"{unit} {r['_row']}")
        examples.append(
            Example(
                q,
                a,
                source=f"{origin}:{r['_row']}",
                category=str(r.get("category") or "").strip(),
                difficulty=str(r.get("difficulty") or "").strip(),
                messages=messages,
            )
        )
    if report.problems and bad_rows == "error":
        raise DataError(report.problems + ["(set `data.bad_rows: skip` to train without these rows)"])
    report.skipped = len(report.problems)
    if not examples:
        raise DataError([f"{origin}: no usable rows. Expected columns `{qcol}` and `{acol}` with text."])
    return examples, report


def read_question_lines(path: str | Path, required: tuple[str, ...] = ("question",)) -> list[dict]:
    """JSONL (or a JSON array) of question records (for `ask` and `eval`): every record an object whose
    `required` keys are present and whose `question` is non-empty; `id` defaults to the line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            [f"{path}: file not found." if not path.is_dir() else f"{path}: is a folder; give a .jsonl file."]
        )
    text, _ = read_text(path, None)
    problems: list[str] = []
    unit, items = json_records(path, text, problems)
    if problems:
        raise ValueError(problems[0] + ' Each line must be one JSON object, e.g. {"id": 1, "question": "…"}.')
    records = []
    for i, rec in items:
        if not isinstance(rec, dict) or not str(rec.get("question") or "").strip():
            raise ValueError(f'{path}: {unit} {i} needs a non-empty "question" field.')
        missing = [k for k in required if k not in rec]
        if missing:
            raise ValueError(f"{path}: {unit} {i} lacks {', '.join(missing)}.")
        rec.setdefault("id", i)
        records.append(rec)
    if not records:
        raise ValueError(
            f"{path}: no questions in the file. Write one JSON object per line, e.g. "
            '{"id": 1, "question": "전세권이란 무엇인가요?"}.'
        )
    return records
