"""Generation: Hangul-safe streaming, EOS stop, batch answers, the ask file format."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from kotune.infer.generate import Chatbot, HangulSafeStreamer, ask_file


def test_streamer_never_splits_a_hangul_syllable(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    text = "임차권등기명령을 신청하세요. 대항력은 다음 날부터!"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) / 2  # byte-level pieces: syllables are split across tokens
    chunks = []
    s = HangulSafeStreamer(tok, chunks.append)
    s.put(torch.tensor([[0]]))  # the prompt, skipped
    for i in ids:
        s.put(torch.tensor([i]))
    s.end()
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) > 3  # it did stream


@pytest.fixture
def bot(any_run):
    return Chatbot.from_run(any_run, greedy=True, max_new_tokens=12)


def test_answer_reports_stop_and_streams_same_text(bot):
    streamed = []
    a = bot.answer("전세권이란?", on_text=streamed.append)
    assert a.new_tokens <= 12 and a.seconds > 0
    assert "".join(streamed).strip() == a.text
    assert a.stopped or a.new_tokens == 12  # without EOS it can only have run out of tokens


def test_batch_answers_match_single_answers(bot):
    qs = ["전세권이란?", "대항력은 언제 생기나요 아주 길게 물어봅니다?", "계약금"]
    single = [bot.answer(q).text for q in qs]
    batch = [a.text for a in bot.answer_batch(qs, batch_size=3)]
    assert batch == single


def test_ask_file_keeps_ids_and_adds_answers(bot, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "a1", "question": "전세권이란?"}\n\n{"id": 2, "question": "계약금 해제?", "extra": 1}\n',
        encoding="utf-8",
    )
    stats = ask_file(bot, src, tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["id"] for x in lines] == ["a1", 2] and lines[1]["extra"] == 1
    assert all(isinstance(x["answer"], str) for x in lines)
    assert stats["questions"] == 2


def test_ask_file_bad_line_named(bot, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "question": "q"}\n{"id": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 needs a non-empty"):
        ask_file(bot, src, tmp_path / "out.jsonl")


def test_context_contrast_runs_each_prompt_beside_its_articles_free_twin(tiny_gpt2):
    pytest.importorskip("kiwipiepy")
    pytest.importorskip("bm25s")
    from transformers import GPT2LMHeadModel

    from kotune.config import GenerationSection, RetrievalSection
    from kotune.infer.fastgen import FastGenerator
    from kotune.legal.grounding import StatuteGrounding
    from kotune.legal.retrieval import Retriever
    from kotune.legal.statutes import load_kb

    calls = []

    class Recording(FastGenerator):
        def generate(self, input_ids, attention_mask=None, **kw):
            calls.append((input_ids, attention_mask, kw))
            return super().generate(input_ids, attention_mask, **kw)

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    kb = load_kb()
    gen = GenerationSection(greedy=True, max_new_tokens=6, context_contrast=0.5)
    bot = Chatbot(
        Recording(GPT2LMHeadModel.from_pretrained(tiny_gpt2)),
        tok,
        "참고 조문:\n{context}\n질문: {question}\n답변: {answer}",
        gen,
        StatuteGrounding(kb, RetrievalSection(enabled=True, k=1, snippet_chars=60, method="bm25"), Retriever(kb)),
    )
    qs = ["전세권이란 무엇인가요?", "임대차 기간을 정하지 않으면 몇 년인가요 주택이요?"]
    answers = bot.answer_batch(qs, batch_size=2)
    ids, mask, kw = calls[-1]
    assert kw["contrast_weight"] == 0.5
    for b, q in enumerate(qs):
        twin = [t for t, m in zip(kw["contrast_ids"][b].tolist(), kw["contrast_mask"][b].tolist()) if m]
        assert twin == bot.prompt_ids(q)  # the same prompt with `{context}` empty
        full = [t for t, m in zip(ids[b].tolist(), mask[b].tolist()) if m]
        assert full == bot.prompt_ids(q, answers[b].context) and len(full) > len(twin)
    assert bot.answer(qs[0]).text == answers[0].text  # streaming-path single answer, same contrast

    class NoContrast:  # an engine without context-aware decoding (llama.cpp) is refused with the fix
        device = torch.device("cpu")
        config = bot.model.config

        def generate(self, **kw):
            raise AssertionError("must not be called")

    bot.model = NoContrast()
    with pytest.raises(ValueError, match="context_contrast.*torch"):
        bot.answer(qs[0])


def test_chat_repl_reads_follow_ups_in_the_conversation_until_reset(tiny_run, monkeypatch):
    from typer.testing import CliRunner

    from kotune.cli import app
    from kotune.infer.generate import Chatbot

    seen = []
    prompt_ids = Chatbot.prompt_ids

    def spy(self, question, context=None, history=()):
        seen.append((question, [q for q, _ in history]))
        return prompt_ids(self, question, context, history)

    monkeypatch.setattr(Chatbot, "prompt_ids", spy)
    said = "전세 계약이 끝났는데 보증금을 안 줘요\n그럼 월세는요?\n/reset\n그럼 월세는요?\n종료\n"
    res = CliRunner().invoke(app, ["chat", str(tiny_run), "--max_new_tokens", "4"], input=said)
    assert res.exit_code == 0, res.output
    assert "/reset" in res.output and "새 대화를 시작합니다" in res.output
    assert seen == [
        ("전세 계약이 끝났는데 보증금을 안 줘요", []),
        ("그럼 월세는요?", ["전세 계약이 끝났는데 보증금을 안 줘요"]),
        ("그럼 월세는요?", []),  # after /reset the conversation starts over
    ]
