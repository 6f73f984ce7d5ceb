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

ENCODINGS = ("utf-8-sig", "cp949")  # utf-8-sig also reads plain utf-8; cp949 is a superset of euc-kr


class DataError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__("data problems:\n" + "\n".join(f"  - {p}" for p in shown) + more)


@dataclass
class Example:
    question: str
    answer: str
    source: str  # "file:row" so any later problem can point back to the row
    category: str = ""
    difficulty: str = ""


@dataclass
class DataReport:
    path: str
    encoding: str | None = None
    rows_read: int = 0
    problems: list[str] = field(default_factory=list)  # rows with errors (empty cells, broken JSON)
    duplicates: list[str] = field(default_factory=list)
    skipped: int = 0

    def summary(self) -> str:
        enc = f", encoding {self.encoding}" if self.encoding else ""
        return (
            f"{self.path}: {self.rows_read} rows read{enc}; {len(self.problems)} bad, "
            f"{len(self.duplicates)} duplicate, {self.skipped} skipped"
        )


def read_text(path: Path, encoding: str | None) -> tuple[str, str]:
    raw = path.read_bytes()
    tried = [encoding] if encoding else list(ENCODINGS)
    for enc in tried:
        try:
            return raw.decode(enc), enc
        except (UnicodeDecodeError, LookupError):
            continue
    raise DataError(
        [f"{path}: cannot decode as {' or '.join(tried)}. Save it as UTF-8, or set `data.encoding` to the file's encoding."]
    )


def _csv_rows(path: Path, text: str, qcol: str, acol: str, report: DataReport) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError([f"{path}: the file is empty. Expected a header row `{qcol},{acol},category,difficulty`."]) from None
    header = [h.strip() for h in header]
    missing = [c for c in (qcol, acol) if c not in header]
    if missing:
        raise DataError(
            [f"{path}: row 1 (header) lacks column(s) {', '.join(missing)}; found {', '.join(header) or 'nothing'}. "
             f"Rename the columns or set `data.question_column`/`data.answer_column` "
             f"(`data.text_column`/`data.label_column` for classification)."]
        )
    rows = []
    for i, cells in enumerate(reader, start=2):  # spreadsheet numbering: header is row 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            report.problems.append(
                f"{path}: row {i} has {len(cells)} cells but the header has {len(header)}; quote cells that contain commas."
            )
            continue
        rows.append({"_row": i, **dict(zip(header, cells))})
    return rows


def _jsonl_rows(path: Path, text: str, qcol: str, acol: str, report: DataReport) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.problems.append(f"{path}: line {i} is not valid JSON ({e.msg} at column {e.colno}).")
            continue
        if not isinstance(obj, dict):
            report.problems.append(f"{path}: line {i} is not a JSON object.")
            continue
        rows.extend(_normalise_record(obj, f"{i}", qcol, acol, path, report, "line"))
    return rows


def _normalise_record(obj: dict, where: str, qcol: str, acol: str, path, report: DataReport, unit: str) -> list[dict]:
    """Map the accepted record shapes onto question/answer rows."""
    if qcol in obj or acol in obj:
        return [{"_row": where, **obj}]
    if "instruction" in obj and "output" in obj:  # alpaca
        q = str(obj["instruction"]).strip()
        extra = str(obj.get("input") or "").strip()
        return [{"_row": where, qcol: f"{q}\n{extra}" if extra else q, acol: obj["output"]}]
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
                    report.problems.append(f"{path}: {unit} {where}: message {turn} is an assistant turn with no user turn before it.")
                    continue
                out.append({"_row": f"{where}.{turn}", qcol: pending, acol: m.get("content", "")})
                pending = None
        if not out:
            report.problems.append(f"{path}: {unit} {where}: no user→assistant pair in `messages`.")
        return out
    report.problems.append(
        f"{path}: {unit} {where}: no `{qcol}`/`{acol}`, `instruction`/`output` or `messages` keys (found: {', '.join(obj) or 'none'})."
    )
    return []


def _hf_rows(name: str, split: str, cache_dir: str | None, qcol: str, acol: str, report: DataReport) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(["loading Hugging Face datasets needs the extra: pip install 'kotune[datasets]'"]) from None
    p = Path(name)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()):
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
        raise DataError([f"{name}: could not load the dataset ({type(e).__name__}: {e}). "
                         "Check the name, the network, or pass a local `save_to_disk` folder."]) from None
    rows = []
    for i, rec in enumerate(ds, start=1):
        rows.extend(_normalise_record(dict(rec), str(i), qcol, acol, name, report, "record"))
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
) -> tuple[list[Example], DataReport]:
    """Read and check one data source. Raises `DataError` listing every problem
    that `bad_rows='error'` makes fatal; otherwise records them in the report."""
    qcol, acol = question_column, answer_column
    if dataset_name:
        report = DataReport(path=dataset_name)
        rows = _hf_rows(dataset_name, dataset_split, dataset_cache_dir, qcol, acol, report)
        origin = dataset_name
    else:
        p = Path(path)
        report = DataReport(path=str(p))
        if p.is_dir():
            return load_examples(dataset_name=str(p), dataset_split=dataset_split, encoding=encoding,
                                 question_column=qcol, answer_column=acol, bad_rows=bad_rows, duplicates=duplicates)
        if not p.is_file():
            raise DataError([f"{p}: file not found. Check `data.train_file` (or `--csv_path`)."])
        text, report.encoding = read_text(p, encoding)
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _jsonl_rows(p, text, qcol, acol, report)
        elif suffix in (".csv", ".tsv", ".txt"):
            rows = _csv_rows(p, text, qcol, acol, report)
        else:
            raise DataError([f"{p}: unknown file type `{suffix}`; use .csv or .jsonl, or a `save_to_disk` folder."])
        origin = str(p)
    report.rows_read = len(rows) + len(report.problems)
    unit = "row" if origin.endswith(".csv") else "line" if origin.endswith((".jsonl", ".json")) else "record"
    examples: list[Example] = []
    seen: dict[tuple[str, str], str] = {}
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
        key = (q, a)
        if key in seen:
            msg = f"{where}: duplicate of {seen[key]}"
            if duplicates == "error":
                report.problems.append(msg + "; delete one of them.")
                continue
            report.duplicates.append(msg)
            if duplicates == "drop":
                continue
        seen.setdefault(key, f"{unit} {r['_row']}")
        examples.append(Example(q, a, source=f"{origin}:{r['_row']}",
                                category=str(r.get("category") or "").strip(),
                                difficulty=str(r.get("difficulty") or "").strip()))
    if report.problems and bad_rows == "error":
        raise DataError(report.problems + ["(set `data.bad_rows: skip` to train without these rows)"])
    report.skipped = len(report.problems)
    if not examples:
        raise DataError([f"{origin}: no usable rows. Expected columns `{qcol}` and `{acol}` with text."])
    return examples, report


def read_question_lines(path: str | Path, required: tuple[str, ...] = ("question",)) -> list[dict]:
    """JSONL of question records (for `ask` and `eval`): every line an object whose
    `required` keys are present and whose `question` is non-empty; `id` defaults to the line number."""
    records = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg}).") from None
        if not isinstance(rec, dict) or not str(rec.get("question") or "").strip():
            raise ValueError(f"{path}: line {i} needs a non-empty \"question\" field.")
        missing = [k for k in required if k not in rec]
        if missing:
            raise ValueError(f"{path}: line {i} lacks {', '.join(missing)}.")
        rec.setdefault("id", i)
        records.append(rec)
    return records
