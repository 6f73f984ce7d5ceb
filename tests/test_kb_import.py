"""Importing law.go.kr lawService exports (XML and JSON) into the statute KB format.

The fixtures are made-up excerpts in the real export's shape; no network is used.
"""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES

from kotune.legal.kb_import import import_law_file, law_filename, parse_law_export, parse_law_file
from kotune.legal.statutes import load_kb

LAWGOKR = FIXTURES / "lawgokr"
XML = LAWGOKR / "minbeop_excerpt.xml"
JSON = LAWGOKR / "housing_excerpt.json"


def by_article(records: list[dict]) -> dict[str, dict]:
    return {r["article"]: r for r in records}


def test_xml_export_parses():
    records = parse_law_file(XML)
    assert [r["article"] for r in records] == ["303", "312의2", "314", "315"]
    assert {r["law"] for r in records} == {"민법"}
    assert all(set(r) == {"law", "article", "title", "paragraphs", "keywords"} for r in records)
    assert all(r["keywords"] == [] for r in records)
    arts = by_article(records)
    assert arts["303"]["title"] == "전세권의 내용"
    # A title with its own parentheses must not leave a stray ")" behind.
    assert arts["314"]["title"] == "예시 조문(호와 목)"


def test_json_export_parses():
    records = parse_law_file(JSON)
    assert [r["article"] for r in records] == ["3", "3의2", "4"]
    assert {r["law"] for r in records} == {"주택임대차보호법"}


def test_headings_and_deleted_articles_are_skipped_and_reported():
    records, skipped = parse_law_export(XML)
    assert "651" not in by_article(records)
    assert len(skipped) == 3
    assert sum("heading" in s for s in skipped) == 2
    assert any("제7절 임대차" in s for s in skipped)
    assert any("민법 제651조" in s and "deleted" in s for s in skipped)

    records, skipped = parse_law_export(JSON)
    assert "5" not in by_article(records) and "1" not in by_article(records)
    assert any("제1장" in s and "heading" in s for s in skipped)
    assert any("주택임대차보호법 제5조" in s and "deleted" in s for s in skipped)


def test_paragraphs_keep_order_and_items():
    arts = by_article(parse_law_file(XML))
    assert arts["303"]["paragraphs"] == [
        "① 시험용 첫째 항이다. 전세금을 낸 사람은 빌린 집을 쓸 수 있다고 적어 둔 자리표시 문장이다.",
        "② 시험용 둘째 항이다. 첫째 항 뒤에 그대로 따라와야 한다.",
    ]
    first, second = arts["314"]["paragraphs"]
    assert first.startswith("① 다음 각 호의")
    pieces = ["1. 첫째 자리표시 사유", "2. 둘째 자리표시 사유", "가. 첫째 요건", "나. 둘째 요건"]
    positions = [first.index(p) for p in pieces]
    assert positions == sorted(positions)
    assert second == "② 호가 딸린 항 다음의 평범한 항이다."
    # 호 under a 항 without 항내용 continue the article's lead sentence.
    (only,) = arts["315"]["paragraphs"]
    assert only.startswith('이 예시에서 쓰는 말의 뜻은 다음과 같다. 1. "가짜말"')
    assert only.endswith('2. "빈칸"이란 아무것도 적히지 않은 자리를 말한다.')


def test_article_without_paragraphs_keeps_body_without_header():
    arts = by_article(parse_law_file(XML))
    (body,) = arts["312의2"]["paragraphs"]
    assert body.startswith("항이 없는 가지조문의 자리표시 본문이다.")
    assert "제312조의2" not in body and "본조신설" not in body
    assert by_article(parse_law_file(JSON))["4"]["paragraphs"] == ["항이 없는 조문의 본문 자리표시 문장이다."]


def test_amendment_notes_are_dropped():
    for path in (XML, JSON):
        for r in parse_law_file(path):
            for p in r["paragraphs"]:
                assert "<" not in p and "개정" not in p, p


def test_json_single_object_and_list_text():
    arts = by_article(parse_law_file(JSON))
    assert arts["3의2"]["title"] == "보증금의 회수"
    assert arts["3의2"]["paragraphs"] == [
        "① 항이 하나뿐이라 객체로 온 자리표시 항이며 다음 호가 하나 딸려 있다. 1. 객체로 온 하나뿐인 호"
    ]
    assert arts["3"]["paragraphs"] == [
        "① 집에 들어가 살면서 신고까지 마친 사람에 관한 시험용 첫째 항이다.",
        "② 줄이 나뉘어 배열로 온 시험용 둘째 항의 앞부분이고, 뒷부분이다.",
        "③ 번호 없이 온 시험용 셋째 항이다.",
    ]


def test_format_detected_by_content_not_suffix(tmp_path):
    renamed = tmp_path / "export.txt"
    renamed.write_bytes(JSON.read_bytes())
    assert parse_law_file(renamed) == parse_law_file(JSON)


def test_import_writes_a_loadable_kb(tmp_path):
    out = tmp_path / "kb"
    n, skipped = import_law_file(XML, out)
    assert n == 4 and len(skipped) == 3
    assert (out / "민법.jsonl").exists()
    n2, _ = import_law_file(JSON, out)
    assert n2 == 3
    kb = load_kb(out)
    assert len(kb) == 7
    assert kb[("민법", "312의2")].cite == "민법 제312조의2"
    assert kb[("주택임대차보호법", "3의2")].cite == "주택임대차보호법 제3조의2"
    assert kb[("민법", "303")].paragraphs[1].startswith("②")


def test_keywords_kept_from_existing_kb(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    rows = [
        {
            "law": "주택임대차보호법",
            "article": "3의2",
            "title": "보증금의 회수",
            "paragraphs": ["요약"],
            "keywords": ["확정일자", "우선변제"],
        },
        {
            "law": "민법",
            "article": "4",
            "title": "다른 법의 같은 번호",
            "paragraphs": ["요약"],
            "keywords": ["엉뚱한 키워드"],
        },
    ]
    (old / "old.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "new"
    import_law_file(JSON, out, keep_keywords_from=old)
    kb = load_kb(out)
    assert kb[("주택임대차보호법", "3의2")].keywords == ("확정일자", "우선변제")
    assert kb[("주택임대차보호법", "3의2")].paragraphs[0].startswith("① 항이 하나뿐이라")
    assert kb[("주택임대차보호법", "4")].keywords == ()
    assert kb[("주택임대차보호법", "3")].keywords == ()


def test_law_filename_is_sanitised():
    assert law_filename("주택임대차보호법 시행령") == "주택임대차보호법_시행령"
    assert "/" not in law_filename("이상한/이름:법") and law_filename("...") == "law"


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("notes.txt", "그냥 글자입니다.\n", "XML or a JSON object"),
        ("empty.xml", "<법령><기본정보><법령명_한글>민법</법령명_한글></기본정보></법령>", "no 조문"),
        ("broken.xml", "<법령><조문>", "not a readable"),
        ("list.json", "[1, 2]", "XML or a JSON object"),
        (
            "noname.json",
            json.dumps(
                {
                    "법령": {
                        "기본정보": {},
                        "조문": {"조문단위": {"조문번호": "1", "조문여부": "조문", "조문내용": "제1조(목적) 본문"}},
                    }
                }
            ),
            "법령명",
        ),
        ("error.xml", "<Law>일치하는 법령이 없습니다.</Law>", "no 조문"),
    ],
)
def test_bad_input_raises_value_error_naming_the_file(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=needle) as err:
        import_law_file(path, tmp_path / "out")
    assert name in str(err.value)
    assert not (tmp_path / "out").exists()


def test_non_utf8_file_raises_value_error(tmp_path):
    path = tmp_path / "euckr.xml"
    path.write_bytes("<법령><기본정보><법령명_한글>민법</법령명_한글></기본정보></법령>".encode("euc-kr"))
    with pytest.raises(ValueError, match="euckr.xml.*UTF-8"):
        parse_law_file(path)
