"""`data.format: chat`: conversations through the tokenizer's own chat template, only assistant turns trained.

The tiny tokenizer is the one conftest trains here, with ChatML's `<|im_start|>`/`<|im_end|>` added and a ChatML
template written below; nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import _train_tokenizer, qa_rows, tiny_config, write_csv
from transformers import AutoTokenizer

from kotune.chat import (
    chat_prompt_ids,
    chat_stop_ids,
    check_chat_encoded,
    encode_all_chat,
    encode_chat,
    require_chat_template,
)
from kotune.config import ConfigError, load_config
from kotune.data import DataError, load_examples
from kotune.errors import TemplateError
from kotune.prompt import IGNORE, render_sample, trained_spans

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders the last message with a mark: a prompt (whose last message is the user's) differs from the same turns
# inside the whole conversation.
LAST_MARKED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ ' (latest)' if loop.last else '' }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The assistant header ends inside a word ("근"): the answer "거…" merges with it into one token in context.
OPEN_HEADER = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}근{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n근{% endif %}"
)
# Never closes an assistant turn: nothing to stop on.
UNCLOSED = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)

TWO_TURNS = [
    {"role": "user", "content": "전세권이란?"},
    {"role": "assistant", "content": "전세금을 내고 남의 부동산을 쓰는 물권입니다."},
    {"role": "user", "content": "대항력은 언제 생기나요?"},
    {"role": "assistant", "content": "주택 인도와 전입신고를 마친 다음 날부터 생깁니다."},
]


def _chat_model(folder, template: str | None):
    """The tiny GPT-2 of conftest with ChatML's two special tokens (and `template`, when given)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    _train_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template:
        tok.chat_template = template
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return _chat_model(tmp_path_factory.mktemp("tiny_chat"), CHATML)


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """The same tiny model whose tokenizer has no chat template."""
    return _chat_model(tmp_path_factory.mktemp("tiny_chat_bare"), None)


@pytest.fixture(scope="module")
def tok(chat_model):
    return AutoTokenizer.from_pretrained(chat_model)


def _trained_texts(tok, enc) -> list[str]:
    return [tok.decode(enc.input_ids[s:e]) for s, e in trained_spans(enc.labels)]


def _conversations(n: int = 12) -> list[dict]:
    rows = qa_rows(2 * n)
    return [
        {
            "messages": [
                {"role": "user", "content": rows[2 * i]["question"]},
                {"role": "assistant", "content": rows[2 * i]["answer"]},
                {"role": "user", "content": rows[2 * i + 1]["question"]},
                {"role": "assistant", "content": rows[2 * i + 1]["answer"]},
            ]
        }
        for i in range(n)
    ]


def _jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- encoding


def test_only_assistant_turns_and_their_end_tokens_are_trained(tok):
    enc = encode_chat(tok, TWO_TURNS, source="x.jsonl:1")
    assert _trained_texts(tok, enc) == [TWO_TURNS[1]["content"] + "<|im_end|>", TWO_TURNS[3]["content"] + "<|im_end|>"]
    # the headers, the user turns and the newline after each end token stay masked
    first = trained_spans(enc.labels)[0][0]
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert enc.labels[-1] == IGNORE and tok.decode(enc.input_ids[-1:]) == "\n"
    check_chat_encoded(enc, chat_stop_ids(tok), tok.pad_token_id, tok)
    shown = render_sample(tok, enc)
    assert "in order (2 trained spans" in shown and "⟦<|im_end|>⟧[\\n][<|im_start|>]" in shown
    assert "last is id" in shown and "'<|im_end|>'" in shown


def test_system_prompt_is_rendered_first_and_untrained(tok):
    enc = encode_chat(tok, TWO_TURNS, system="당신은 법률 상담가입니다.")
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n당신은 법률 상담가입니다.<|im_end|>\n<|im_start|>user\n")
    assert all("법률 상담가" not in t for t in _trained_texts(tok, enc)) and len(trained_spans(enc.labels)) == 2
    # the data's own system message replaces the configured one
    own = encode_chat(tok, [{"role": "system", "content": "데이터의 지시"}] + TWO_TURNS, system="설정의 지시")
    own_text = tok.decode(own.input_ids)
    assert "데이터의 지시" in own_text and "설정의 지시" not in own_text


def test_stop_ids_are_eos_and_the_end_of_turn_token(tok):
    assert chat_stop_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_answer_prompt_matches_training_with_history_and_context(tok):
    """What answering feeds (`chat_prompt_ids`) is exactly what training saw before the last answer."""
    ctx = "민법 제303조(전세권의 내용) 전세권자는 전세금을 지급하고 …"
    enc = encode_chat(tok, TWO_TURNS, system="상담", context=ctx)
    start = trained_spans(enc.labels)[-1][0]
    history = [(TWO_TURNS[0]["content"], TWO_TURNS[1]["content"])]
    ids = chat_prompt_ids(tok, TWO_TURNS[2]["content"], context=ctx, history=history, system="상담")
    assert ids == enc.input_ids[:start]
    text = tok.decode(ids)
    assert f"<|im_start|>user\n{ctx}\n\n{TWO_TURNS[2]['content']}<|im_end|>" in text  # the last user turn only
    assert text.count(ctx) == 1 and text.endswith("<|im_start|>assistant\n")
    plain = tok.decode(chat_prompt_ids(tok, "  질문?  "))
    assert plain == "<|im_start|>user\n질문?<|im_end|>\n<|im_start|>assistant\n"


def test_no_template_names_the_option(bare_model):
    bare = AutoTokenizer.from_pretrained(bare_model)
    with pytest.raises(TemplateError, match=r"data\.chat_template.*data\.format: plain"):
        encode_chat(bare, TWO_TURNS)
    with pytest.raises(TemplateError, match="tokenizer of my-model has none"):
        require_chat_template(bare, "my-model")
    with pytest.raises(TemplateError, match=r"data\.chat_template"):
        chat_prompt_ids(bare, "질문")
    assert chat_stop_ids(bare, CHATML)[-1] == bare.convert_tokens_to_ids("<|im_end|>")


def test_template_rendering_history_differently_refused(tok):
    saved, tok.chat_template = tok.chat_template, LAST_MARKED
    try:
        with pytest.raises(TemplateError) as e:
            encode_chat(tok, TWO_TURNS, source="x.jsonl:3")
    finally:
        tok.chat_template = saved
    msg = str(e.value)
    assert msg.startswith("x.jsonl:3: the chat template renders the prompt of assistant turn 1")
    assert "(latest)" in msg and "data.chat_template" in msg  # what differs, and where to fix it


def test_header_merging_with_the_answer_refused(tok):
    assert len(tok("근거")["input_ids"]) < len(tok("근")["input_ids"]) + len(tok("거")["input_ids"])
    saved, tok.chat_template = tok.chat_template, OPEN_HEADER
    try:
        with pytest.raises(TemplateError, match="x.jsonl:4: the prompt of assistant turn 1 .*tokenises differently"):
            turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "거: 민법"}]
            encode_chat(tok, turns, None, "x.jsonl:4")
    finally:
        tok.chat_template = saved


def test_untrained_end_token_refused(tok):
    saved, tok.chat_template = tok.chat_template, UNCLOSED
    try:
        assert chat_stop_ids(tok) == [tok.eos_token_id]
        with pytest.raises(TemplateError, match="assistant turn 1 does not end with an end token"):
            encode_chat(tok, TWO_TURNS, source="x.jsonl:5")
    finally:
        tok.chat_template = saved
    enc = encode_chat(tok, TWO_TURNS, source="x.jsonl:6")
    enc.labels[trained_spans(enc.labels)[0][1] - 1] = IGNORE  # the first turn's <|im_end|> masked
    with pytest.raises(TemplateError, match="x.jsonl:6: assistant turn 1 does not end with a trained end token"):
        check_chat_encoded(enc, chat_stop_ids(tok), tok.pad_token_id, tok)
    with pytest.raises(TemplateError, match="pad token id"):
        check_chat_encoded(enc, chat_stop_ids(tok), tok.eos_token_id, tok)


def test_encode_all_chat_builds_one_turn_from_question_and_answer(tok):
    from kotune.data import Example

    kept, long_rows, errors, lengths = encode_all_chat(
        tok, [Example("질문", "답변입니다", "x.csv:2")], max_length=16, contexts=["조문"], system="상담"
    )
    assert not errors and kept == [] and long_rows and "x.csv:2" in long_rows[0]  # over 16 tokens: dropped
    kept, *_ = encode_all_chat(tok, [Example("질문", "답변입니다", "x.csv:2")], max_length=256)
    assert _trained_texts(tok, kept[0]) == ["답변입니다<|im_end|>"]


# ---------------------------------------------------------------- data


def test_chat_data_keeps_turns_and_reads_csv_rows_as_one_exchange(tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": " 지시 "}] + TWO_TURNS}])
    (ex,), _ = load_examples(path, chat=True)
    assert ex.messages[0] == {"role": "system", "content": "지시"} and ex.messages[1:] == TWO_TURNS
    assert (ex.question, ex.answer) == (TWO_TURNS[2]["content"], TWO_TURNS[3]["content"]) and ex.source.endswith(":1")
    plain, _ = load_examples(path)  # plain format: flattened into pairs, as before
    assert [e.messages for e in plain] == [None, None] and len(plain) == 2
    csv_ex, _ = load_examples(write_csv(tmp_path / "q.csv", qa_rows(2)), chat=True)
    assert csv_ex[0].messages == [
        {"role": "user", "content": csv_ex[0].question},
        {"role": "assistant", "content": csv_ex[0].answer},
    ]


def test_bad_conversations_name_file_and_line(tmp_path):
    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    records = [
        {"messages": [u, {"role": "bot", "content": "a"}]},
        {"messages": [u, {"role": "assistant", "content": "  "}]},
        {"messages": [u]},
        {"messages": [a, u, a]},
        {"messages": [u, a, u]},
        {"messages": [u, u, a]},
        {"messages": [u, a, {"role": "system", "content": "s"}, u, a]},
        {"messages": "hi"},
        {"messages": [u, a]},
    ]
    path = _jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as e:
        load_examples(path, chat=True)
    problems = e.value.problems
    expected = [
        "line 1: message 2 has role 'bot'",
        "line 2: message 2 (assistant) has empty content",
        "line 3: no assistant turn",
        "line 4: message 1 is an assistant turn with no user turn before it",
        "line 5: the last message (3) is a user turn",
        "line 6: messages 1 and 2 are both user turns",
        "line 7: message 3 is a system message",
        "line 8: `messages` must be a non-empty list",
    ]
    for want in expected:
        assert any(f"bad.jsonl: {want}" in p for p in problems), (want, problems)
    ex, rep = load_examples(path, chat=True, bad_rows="skip")
    assert len(ex) == 1 and rep.skipped == 8


# ---------------------------------------------------------------- config


def test_chat_options_checked_with_the_other_problems():
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "data.system_prompt=당신은 상담가입니다",
                "data.chat_template={{ messages }}",
                "generation.context_contrast=1",
            ],
        )
    msg = str(e.value)
    assert "`data.system_prompt` is used only with `data.format: chat`" in msg
    assert "`data.chat_template` is used only with `data.format: chat`" in msg
    assert "generation.context_contrast" in msg and len(e.value.problems) == 3
    with pytest.raises(ConfigError, match="`data.format: chat` works with `model.task: causal-lm` only"):
        load_config(None, ["data.format=chat", "model.task=text-classification"])
    with pytest.raises(ConfigError, match="causal-lm` only \(task is `text2text`\)"):
        load_config(None, ["data.format=chat", "model.task=text2text"])
    # the plain template's rules do not apply to chat, where it is not used
    cfg = load_config(None, ["data.format=chat", "retrieval.enabled=true", "data.system_prompt=상담"])
    assert cfg.data.format == "chat" and cfg.data.system_prompt == "상담"


# ---------------------------------------------------------------- through prepare and training


def test_chat_template_option_as_text_or_file(bare_model, tmp_path):
    from kotune.prepare import prepare

    data = _jsonl(tmp_path / "c.jsonl", _conversations())
    cfg = tiny_config(bare_model, data, tmp_path / "r", data={"format": "chat", "max_length": 512})
    with pytest.raises(TemplateError, match=f"tokenizer of {bare_model} has none: set `data.chat_template`"):
        prepare(cfg)
    cfg.data.chat_template = CHATML
    prep = prepare(cfg)
    assert prep.tokenizer.chat_template == CHATML
    assert _trained_texts(prep.tokenizer, prep.train[0])[-1].endswith("<|im_end|>")
    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    cfg.data.chat_template = str(tmp_path / "chatml.jinja")
    assert prepare(cfg).tokenizer.chat_template == CHATML
    cfg.data.chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(ConfigError, match="`data.chat_template`: .*missing.jinja` is not a Jinja template"):
        prepare(cfg)


def test_chat_dry_run_shows_every_assistant_turn(chat_model, tmp_path):
    from kotune.prepare import dry_run_report, prepare

    data = _jsonl(tmp_path / "c.jsonl", _conversations())
    chat = {"format": "chat", "system_prompt": "상담", "max_length": 512}
    cfg = tiny_config(chat_model, data, tmp_path / "r", data=chat)
    prep = prepare(cfg)
    assert len(prep.train) + len(prep.eval) == 12
    report = dry_run_report(cfg, prep)
    assert "format: chat" in report and "'<|im_end|>' (id" in report
    assert "in order (2 trained spans" in report and "⟦<|im_end|>⟧" in report
    assert "[<|im_start|>][s][y][s][t][e][m][\\n][상]" in report  # the system turn is shown, untrained


def test_chat_format_trains_and_saves_the_template(bare_model, tmp_path):
    from kotune.train import train
    from kotune.train.report import read_metrics

    model = shutil.copytree(bare_model, tmp_path / "model")
    data = _jsonl(tmp_path / "c.jsonl", _conversations())
    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    cfg = tiny_config(
        model,
        data,
        tmp_path / "run",
        data={"format": "chat", "chat_template": tmp_path / "chatml.jinja", "max_length": 512},
        training={"max_steps": 2},
    )
    out = train(cfg)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(x == x and x > 0 for x in losses)
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == CHATML
    assert chat_stop_ids(saved) == [saved.eos_token_id, saved.convert_tokens_to_ids("<|im_end|>")]
    # answering reads the run folder alone: the chat prompt, stopping on <|im_end|>, through both decoders
    from kotune.infer.generate import Chatbot
    from kotune.serve.worker import Job, Worker

    bot = Chatbot.from_run(out, greedy=True, max_new_tokens=12)
    assert bot.chat and bot.stop_ids == chat_stop_ids(saved)
    history = [("첫 질문", "첫 답변")]
    assert bot.prompt_ids("두 번째 질문", [], history) == chat_prompt_ids(saved, "두 번째 질문", history=history)
    alone = bot.answer("두 번째 질문", history=history)
    worker = Worker(bot, max_batch=2)
    try:
        batched = worker.submit(Job("두 번째 질문", history=history)).result(60)[0]
    finally:
        worker.close()
    assert batched.text == alone.text and batched.new_tokens == alone.new_tokens


def test_validate_encodes_a_chat_config_through_its_template(chat_model, bare_model, tmp_path):
    from typer.testing import CliRunner

    from kotune.cli import app

    data = _jsonl(tmp_path / "c.jsonl", _conversations())
    cfg = tiny_config(chat_model, data, tmp_path / "r", data={"format": "chat", "max_length": 512})
    path = tmp_path / "chat.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    r = CliRunner().invoke(app, ["validate", str(data), "--config", str(path)])
    assert r.exit_code == 0 and "tokens: p50" in r.output and r.output.rstrip().endswith("ok"), r.output
    # a model without a template: the error names the option, no traceback
    cfg = tiny_config(bare_model, data, tmp_path / "r2", data={"format": "chat", "max_length": 512})
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    r = CliRunner().invoke(app, ["validate", str(data), "--config", str(path)])
    assert r.exit_code == 2 and "data.chat_template" in r.output and "Traceback" not in r.output, r.output
