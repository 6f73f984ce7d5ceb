"""Data loaders: formats, encodings, and every bad-input case names file and row."""

from __future__ import annotations

import json

import pytest
from conftest import qa_rows, write_csv

from kotune.data import DataError, load_examples


def test_csv_utf8_with_optional_columns(qa_csv):
    ex, rep = load_examples(qa_csv)
    assert len(ex) == 24 and rep.rows_read == 24
    assert ex[0].category == "테스트" and ex[0].source.endswith(":2")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "cp949", "euc-kr"])
def test_excel_korean_encodings_detected(tmp_path, encoding):
    path = write_csv(tmp_path / "x.csv", qa_rows(3), encoding=encoding)
    ex, rep = load_examples(path)
    assert ex[0].question.startswith("전세권")
    assert rep.encoding in ("utf-8-sig", "cp949")


def test_undecodable_file_names_the_fix(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"question,answer\n\xff\xfe\xfa,\x80\x81\n")
    with pytest.raises(DataError, match="data.encoding"):
        load_examples(path)


def test_missing_column_names_file_and_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("질문,answer\n가,나\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert "x.csv: row 1 (header) lacks column(s) question" in str(e.value)


def test_empty_cells_and_bad_rows_all_reported(tmp_path):
    rows = qa_rows(5)
    rows[1]["answer"] = ""
    rows[3]["question"] = "  "
    path = write_csv(tmp_path / "x.csv", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("a,b,c,d,e\n")
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert "row 3: empty answer" in msg and "row 5: empty question" in msg and "row 7 has 5 cells" in msg
    ex, rep = load_examples(path, bad_rows="skip")
    assert len(ex) == 3 and rep.skipped == 3 and rep.rows_read == 6


def test_duplicates_dropped_with_count_or_error(tmp_path):
    rows = qa_rows(4) + [qa_rows(4)[0]]
    path = write_csv(tmp_path / "x.csv", rows)
    ex, rep = load_examples(path)
    assert len(ex) == 4 and len(rep.duplicates) == 1 and "row 6: duplicate of row 2" in rep.duplicates[0]
    with pytest.raises(DataError, match="duplicate"):
        load_examples(path, duplicates="error")


def test_jsonl_three_shapes(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [
        {"question": "질문1", "answer": "답1"},
        {"instruction": "설명하세요", "input": "전세권", "output": "답2"},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "질문3"},
                {"role": "assistant", "content": "답3"},
                {"role": "user", "content": "질문4"},
                {"role": "assistant", "content": "답4"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    ex, _ = load_examples(path)
    assert [(e.question, e.answer) for e in ex] == [
        ("질문1", "답1"),
        ("설명하세요\n전세권", "답2"),
        ("질문3", "답3"),
        ("질문4", "답4"),
    ]


def test_jsonl_broken_line_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": \n{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert "line 2 is not valid JSON" in str(e.value) and "line 3: no `question`" in str(e.value)


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(qa_rows(6)).save_to_disk(str(folder))
    ex, rep = load_examples(dataset_name=str(folder))
    assert len(ex) == 6
    ex2, _ = load_examples(folder)  # a folder given as train_file works too
    assert len(ex2) == 6


def test_hf_local_data_file(tmp_path, qa_csv):
    pytest.importorskip("datasets")
    ex, _ = load_examples(dataset_name=str(qa_csv), dataset_cache_dir=str(tmp_path / "cache"))
    assert len(ex) == 24


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "nope.csv")
