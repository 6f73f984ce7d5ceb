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


# A whole invented law ("가상임대차특례법") in the full lawService shape: 편·장·절 headings, 의N articles, 항→호→목
# (with 호가지번호 and 목 sub-items), deleted articles and 항, a moved-away article slot, 조문참고자료, several
# 부칙단위 whose text has its own 제1조·제2조, 별표, 개정문 and 제개정이유. The JSON twin is the same law as type=JSON
# shapes it (attributes as keys, single children as objects, 부칙내용·목내용 as lists of line lists).
WHOLE_XML = LAWGOKR / "whole_law.xml"
WHOLE_JSON = LAWGOKR / "whole_law.json"
WHOLE_LAW = "가상임대차특례법"
WHOLE_ARTICLES = [
    *("1", "2", "3", "3의2", "4", "6", "6의2", "6의3", "7", "7의2", "9", "10", "11", "12"),
    *("13", "14", "15", "16", "17", "18", "20", "21", "22"),
]


@pytest.fixture(scope="module")
def whole() -> tuple[list[dict], list[str]]:
    return parse_law_export(WHOLE_XML)


def test_whole_law_fixture_is_a_whole_law():
    # Guard the fixture itself: ≥ 25 조문단위 and every block a real response carries around the articles.
    data = json.loads(WHOLE_JSON.read_text(encoding="utf-8"))["법령"]
    assert set(data) >= {"법령키", "기본정보", "조문", "부칙", "별표", "개정문", "제개정이유"}
    units = data["조문"]["조문단위"]
    assert len(units) == 37
    assert {u["조문여부"] for u in units} == {"조문", "전문"}
    assert len(data["부칙"]["부칙단위"]) == 3


def test_whole_law_xml_and_json_give_identical_records(whole):
    assert parse_law_export(WHOLE_JSON) == whole


def test_whole_law_article_count_and_order(whole):
    records, skipped = whole
    assert [r["article"] for r in records] == WHOLE_ARTICLES
    assert {r["law"] for r in records} == {WHOLE_LAW}
    assert len(skipped) == 37 - len(WHOLE_ARTICLES)
    assert all(r["paragraphs"] and all(r["paragraphs"]) for r in records)


def test_whole_law_branch_articles(whole):
    arts = by_article(whole[0])
    assert [a for a in arts if "의" in a] == ["3의2", "6의2", "6의3", "7의2"]
    assert arts["6의2"]["title"] == "갱신 거절의 제한"
    (moved,) = arts["7의2"]["paragraphs"]
    assert moved == "빌려준 사람은 계약이 끝나면 가상주택을 돌려받는 것과 맞바꾸어 맡긴 돈을 돌려주어야 한다."


def test_whole_law_supplementary_provisions_are_not_imported(whole):
    # 부칙 has its own "제1조(시행일)", "제2조(…경과조치)", "제3조(다른 법률의 개정)":
    # none may become or touch an article.
    records, skipped = whole
    arts = by_article(records)
    assert (arts["1"]["title"], arts["2"]["title"], arts["3"]["title"]) == ("목적", "정의", "적용 범위")
    titles = {r["title"] for r in records}
    assert not titles & {"시행일", "적용례", "계약 갱신에 관한 경과조치", "다른 법률의 개정"}
    text = " ".join(p for r in records for p in r["paragraphs"])
    # Nor may 개정문, 제개정이유, 별표 or 조문참고자료.
    needles = ("시행한다", "부칙", "가상주거법", "생략", "공포", "개정이유", "법제처")
    needles += ("별표", "과태료 금액", "종전 제8조")
    for needle in needles:
        assert needle not in text, needle
    assert not any("부칙" in s for s in skipped)


def test_whole_law_deleted_and_empty_articles_are_reported(whole):
    records, skipped = whole
    for gone in ("5", "8", "10의2", "19"):
        assert gone not in by_article(records)
    deleted = [s for s in skipped if "deleted" in s]
    assert [s.split(":")[0] for s in deleted] == [f"{WHOLE_LAW} 제5조", f"{WHOLE_LAW} 제10조의2", f"{WHOLE_LAW} 제19조"]
    # 제8조 was moved to 제7조의2: only its number is left (the move note sits in 조문참고자료).
    assert f"{WHOLE_LAW} 제8조: no text" in skipped


def test_whole_law_headings_are_skipped(whole):
    headings = [s for s in whole[1] if "heading" in s]
    assert [h.removeprefix(f"{WHOLE_LAW} ").split(":")[0] for h in headings] == [
        "제1편 총칙",
        "제1장 통칙",
        "제2편 임대차 특례",
        "제1장 계약",
        "제1절 계약의 체결",
        "제2절 보증금 <개정 2020. 6. 9.>",
        "제2장 분쟁의 조정",
        "제3편 보칙과 벌칙",
        "제1장 보칙",
        "제2장 벌칙",
    ]


def test_whole_law_items_stay_in_their_paragraph_in_order(whole):
    arts = by_article(whole[0])
    first, *rest = arts["6"]["paragraphs"]
    pieces = ["① 빌려준 사람은", "1. 빌린 사람이", "2. 빌려준 사람이", "가. 빌려준 사람 본인", "나. 건물을 고쳐"]
    pieces += ["1) 계약을 맺을 때", "2) 건물이 낡아", "다. 다른 법령에", "3. 빌린 사람이 몰래"]
    positions = [first.index(p) for p in pieces]
    assert positions == sorted(positions)
    assert first.startswith("① ") and first.endswith("다시 빌려준 경우")
    # The next 항 starts its own paragraph; a deleted 항 keeps its number so ④ is not read as ③.
    assert [p[:1] for p in rest] == ["②", "③", "④"]
    assert rest[1] == "③ 삭제"
    # 호 in a 항 without number or text continue the lead sentence, 호가지번호 "3의2." in its place.
    (definitions,) = arts["2"]["paragraphs"]
    order = ["다음과 같다.", "1. ", "2. ", "가. ", "나. ", "3. ", "3의2. ", "4. "]
    assert [definitions.index(p) for p in order] == sorted(definitions.index(p) for p in order)
    # 항번호 "① " with 항내용 "①이 법은" (no space) keeps its number once.
    assert arts["3"]["paragraphs"][0].startswith("①이 법은")
    assert arts["11"]["paragraphs"][1].endswith("가. 소재지 나. 빌린 부분이 일부인 경우 그 도면")


def test_whole_law_bodies_without_paragraphs(whole):
    arts = by_article(whole[0])
    for article in ("1", "3의2", "6의3", "12", "16", "18", "22"):
        (body,) = arts[article]["paragraphs"]
        assert not body.startswith("제"), body  # the "제N조(제목)" header is removed
        assert "(" + arts[article]["title"] + ")" not in body
    assert arts["22"]["paragraphs"][0].endswith("과(科)한다.")


def test_whole_law_notes_are_dropped(whole):
    for r in whole[0]:
        for p in r["paragraphs"]:
            for note in ("<", ">", "[", "]", "개정", "신설", "이동", "전문개정"):
                assert note not in p, (r["article"], p)
    arts = by_article(whole[0])
    assert arts["4"]["paragraphs"][1] == "② 계약서에는 맡긴 돈의 액수와 돌려줄 날을 적어야 한다."
    assert arts["6의3"]["paragraphs"][0].endswith("3개월이 지나면 효력이 생긴다.")


def test_whole_law_import_writes_a_loadable_kb(tmp_path):
    n, skipped = import_law_file(WHOLE_JSON, tmp_path / "kb")
    assert n == len(WHOLE_ARTICLES) and len(skipped) == 37 - n
    kb = load_kb(tmp_path / "kb")
    assert sorted(a for _, a in kb) == sorted(WHOLE_ARTICLES)
    assert kb[(WHOLE_LAW, "6의2")].cite == "가상임대차특례법 제6조의2"
    assert kb[(WHOLE_LAW, "10")].paragraphs[1].startswith("② 제1항에 따라")
    assert (tmp_path / "kb" / f"{WHOLE_LAW}.jsonl").exists()


@pytest.mark.parametrize(
    "content",
    [
        "제5조 삭제 <2025. 1. 1.>",
        "제5조(옛 제목) 삭제 <2025. 1. 1.>",
        "제5조 삭제 <2025. 1. 1.> [종전 제5조는 제6조로 이동 <2020. 6. 9.>]",
        "삭제",
    ],
)
@pytest.mark.parametrize("title", [None, "삭제"])
def test_deleted_article_variants_are_skipped(tmp_path, content, title):
    unit = {"조문번호": "5", "조문여부": "조문", "조문내용": content, **({"조문제목": title} if title else {})}
    body = {"조문번호": "1", "조문여부": "조문", "조문제목": "목적", "조문내용": "제1조(목적) 본문이다."}
    path = tmp_path / "law.json"
    law = {"법령": {"기본정보": {"법령명_한글": "시험법"}, "조문": {"조문단위": [body, unit]}}}
    path.write_text(json.dumps(law, ensure_ascii=False), encoding="utf-8")
    records, skipped = parse_law_export(path)
    assert [r["article"] for r in records] == ["1"]
    assert skipped == [f"시험법 제5조: deleted ({content})"]
