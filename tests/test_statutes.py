"""The statute knowledge base and the shipped Q&A data agree: every citation exists."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
from conftest import ROOT

from kotune.data import load_examples
from kotune.legal.statutes import find_citations, load_kb

QA = ROOT / "data" / "civil_law_qa.csv"


@pytest.fixture(scope="module")
def kb():
    return load_kb()


def test_citation_parser():
    text = "주택임대차보호법 제3조의2 제1항과 민법 제303조, 다시 민법 제303조 그리고 민법 제 618 조"
    assert find_citations(text) == [("주택임대차보호법", "3의2"), ("민법", "303"), ("민법", "618")]


def test_kb_covers_required_articles(kb):
    need = {
        ("민법", str(n))
        for n in [
            186,
            187,
            245,
            280,
            281,
            *range(303, 320),
            356,
            357,
            366,
            536,
            544,
            *range(563, 585),
            *range(618, 651),
            652,
            653,
            654,
        ]
    }
    need |= {
        ("주택임대차보호법", a)
        for a in [
            "2",
            "3",
            "3의2",
            "3의3",
            "3의5",
            "3의6",
            "4",
            "6",
            "6의2",
            "6의3",
            "7",
            "7의2",
            "8",
            "10",
            "11",
            "12",
        ]
    }
    assert need - set(kb) == set()
    assert ("민법", "651") not in kb  # deleted in 2016
    for art in kb.values():
        assert art.title and art.paragraphs and all(p.strip() for p in art.paragraphs), art.cite


def _affirms_perpetual(text: str) -> bool:
    """A sentence that says '영구' without negating it."""
    return any("영구" in s and "아니" not in s and "않" not in s for s in text.replace("?", ".").split("."))


def test_superficies_term_is_not_perpetual(kb):
    text = " ".join(kb[("민법", "281")].paragraphs)
    assert "280" in text and "15년" in text and not _affirms_perpetual(text)


def test_qa_csv_shape():
    examples, report = load_examples(QA, duplicates="error")
    assert len(examples) >= 300
    assert not report.problems
    with QA.open(encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["question", "answer", "category", "difficulty"]
    cats = Counter(e.category for e in examples)
    for topic in ["전세권", "주택임대차", "민법임대차", "매매", "물권변동", "취득시효", "담보물권", "지상권"]:
        assert cats[topic] >= 5, (topic, cats)
    assert {e.difficulty for e in examples} <= {"초급", "중급", "고급"}


def test_every_answer_cites_an_article_that_exists(kb):
    examples, _ = load_examples(QA)
    missing = []
    for e in examples:
        cites = find_citations(e.answer)
        if not cites:
            missing.append(f"{e.source}: no citation")
        missing += [
            f"{e.source}: cites {law} 제{art}조, not in the knowledge base"
            for law, art in cites
            if (law, art) not in kb
        ]
    assert not missing, "\n".join(missing[:20])


def test_no_row_calls_an_unspecified_superficies_perpetual():
    examples, _ = load_examples(QA)
    wrong = [e.source for e in examples if "지상권" in e.question + e.answer and _affirms_perpetual(e.answer)]
    assert not wrong, wrong


DEV = ROOT / "data" / "civil_law_dev.jsonl"
NEW_SCOPE = ROOT / "data" / "civil_law_dev_new_scope.jsonl"  # dev questions on the articles added by issue 22


@pytest.mark.parametrize("path,size", [(DEV, 60), (NEW_SCOPE, 40)], ids=["dev", "new_scope"])
def test_dev_set_shape_and_citations_exist(kb, path, size):
    items = _jsonl(path)
    assert len(items) >= size and len({i["id"] for i in items}) == len(items)
    for i in items:
        assert set(i) == {"id", "question", "citations", "key_facts", "reference", "category"}, i["id"]
        assert all(c in i["reference"] for c in i["citations"]), i["id"]
        cites = [c for text in i["citations"] for c in find_citations(text)]
        assert cites and all(c in kb for c in cites), i["id"]
        assert i["key_facts"] and all(
            isinstance(f, list) and f and all(isinstance(x, str) and x for x in f) for f in i["key_facts"]
        ), i["id"]


QUESTIONS = ROOT / "data" / "civil_law_questions.jsonl"  # retrieval example questions (retrieval.extra_examples)


def _questions():
    return _jsonl(QUESTIONS)


def test_example_questions_cite_existing_articles_and_cover_the_kb(kb):
    items = _questions()
    assert all(set(i) == {"question", "citations"} for i in items)
    assert len({i["question"] for i in items}) == len(items), "duplicate questions"
    cited = []
    for i in items:
        cites = [c for text in i["citations"] for c in find_citations(text)]
        assert cites and len(cites) == len(i["citations"]) and all(c in kb for c in cites), i
        cited += cites
    assert set(cited) == set(kb), sorted(set(kb) - set(cited))  # every article has user-phrased questions


USERS = ROOT / "data" / "civil_law_dev_users.jsonl"  # the second evaluation set, in users' wording
OUT_OF_SCOPE = ROOT / "data" / "civil_law_out_of_scope.jsonl"  # evaluation: questions no shipped article answers
OUT_OF_SCOPE_EXAMPLES = ROOT / "data" / "out_of_scope_examples.jsonl"  # calibration of the abstention (retrieval)
LONG = ROOT / "data" / "civil_law_questions_long.jsonl"  # story-like retrieval example questions


def _jsonl(path):
    import json

    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_users_set_shape_and_citations_exist(kb):
    items = _jsonl(USERS)
    assert len(items) >= 60 and len({i["id"] for i in items}) == len(items)
    assert {i["style"] for i in items} == {"typo", "slang", "story", "two-in-one"}
    for i in items:
        assert set(i) == {"id", "question", "citations", "key_facts", "reference", "category", "style"}, i["id"]
        cites = [c for text in i["citations"] for c in find_citations(text)]
        assert cites and all(c in kb for c in cites) and all(c in i["reference"] for c in i["citations"]), i["id"]
        assert i["key_facts"] and all(
            isinstance(f, list) and f and all(isinstance(x, str) and x for x in f) for f in i["key_facts"]
        ), i["id"]


def test_out_of_scope_files_hold_distinct_questions_with_their_area():
    evaluation, examples = _jsonl(OUT_OF_SCOPE), _jsonl(OUT_OF_SCOPE_EXAMPLES)
    assert len(evaluation) >= 60 and all(set(i) == {"id", "question", "area", "why"} for i in evaluation)
    assert all(set(i) == {"question", "area"} and i["question"].strip() and i["area"].strip() for i in examples)
    assert len({i["question"] for i in examples}) == len(examples), "duplicate calibration questions"
    for i in evaluation + examples:  # an out-of-scope question cites nothing: a citation would make it in scope
        assert not find_citations(i["question"]), i


def test_long_example_questions_cite_existing_articles(kb):
    items = _jsonl(LONG)
    assert all(set(i) == {"question", "citations"} for i in items) and len({i["question"] for i in items}) == len(items)
    for i in items:
        cites = [c for text in i["citations"] for c in find_citations(text)]
        assert cites and len(cites) == len(i["citations"]) and all(c in kb for c in cites), i


def _questions_of(source: str) -> list[str]:
    if source == "training CSV":
        return [e.question for e in load_examples(QA)[0]]
    return [
        i["question"]
        for i in _jsonl(
            {
                "example questions": QUESTIONS,
                "long example questions": LONG,
                "out-of-scope examples": OUT_OF_SCOPE_EXAMPLES,
            }[source]
        )
    ]


@pytest.mark.parametrize(
    "evaluation", [DEV, NEW_SCOPE, USERS, OUT_OF_SCOPE], ids=["dev", "new_scope", "users", "out_of_scope"]
)
@pytest.mark.parametrize(
    "source", ["training CSV", "example questions", "long example questions", "out-of-scope examples"]
)
def test_evaluation_questions_do_not_overlap_what_the_system_learns_from(evaluation, source):
    """No evaluation question, nor any 20-character span of one, is in the data a run trains or calibrates on."""
    train = [q.replace(" ", "") for q in _questions_of(source)]
    spans = {q[k : k + 20] for q in train for k in range(max(1, len(q) - 19))}
    for i in _jsonl(evaluation):
        q = i["question"].replace(" ", "")
        assert q not in train, i["id"]
        shared = [q[k : k + 20] for k in range(max(1, len(q) - 19)) if q[k : k + 20] in spans]
        assert not shared, (i["id"], shared[:1])


def test_installed_package_ships_the_kb(tmp_path):
    """A wheel (a non-editable install) carries the knowledge base as package data."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).parent.parent
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("kotune-*.whl"))).namelist()
    kb_files = {"minbeop.jsonl", "housing_lease.jsonl", "commercial_lease.jsonl"}
    assert {f"kotune/legal/kb/{f}" for f in kb_files} <= set(names)


def test_a_summary_mentions_other_articles_in_statute_style_not_as_citations():
    """A grounded answer starts with an article's summary: a cross-reference written like a citation
    (`주택임대차보호법 제7조`) would read as the answer citing that article. The statutes' own style,
    「법령명」 제N조, does not."""
    from kotune.legal.statutes import find_citations, load_kb

    for key, art in load_kb().items():
        assert set(find_citations(art.summary)) <= {key}, art.cite


FOLLOWUPS = ROOT / "data" / "civil_law_followups.jsonl"  # two-turn dev cases: the second turn needs the first


def test_followup_set_shape_and_citations_exist(kb):
    items = _jsonl(FOLLOWUPS)
    assert len(items) >= 30 and len({i["id"] for i in items}) == len(items)
    for i in items:
        assert set(i) == {"id", "turns", "first_citations", "citations", "alone", "reference", "category"}, i["id"]
        assert len(i["turns"]) == 2 and all(t.strip() for t in i["turns"]), i["id"]
        for field in ("first_citations", "citations"):
            cites = [c for text in i[field] for c in find_citations(text)]
            assert cites and len(cites) == len(i[field]) and all(c in kb for c in cites), (i["id"], field)
        assert all(c in i["reference"] for c in i["citations"]), i["id"]
    # most follow-ups move to another article: the first turn's retrieval would not answer them
    moved = sum(not set(i["citations"]) & set(i["first_citations"]) for i in items)
    assert moved >= 0.7 * len(items)
