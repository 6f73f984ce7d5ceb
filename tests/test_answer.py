"""A grounded answer's parts: the quantity check on the model's application, and the refusals."""

from __future__ import annotations

from kotune.legal.answer import ABSTAIN_MESSAGE, LANGUAGE_MESSAGE, SentenceGate, quantities, refusal, unsupported


def test_quantities_are_periods_shares_and_multiples_not_dates_or_money():
    got = quantities(
        "지상권은 30년, 15년 또는 5년보다 짧게 못 정하고, 한 달 안에 두 배를 돌려주며 5% 이내, 6개월, 1.5배"
    )
    assert got == {(30, "년"), (15, "년"), (5, "년"), (1, "개월"), (2, "배"), (5, "%"), (6, "개월"), (1.5, "배")}
    assert quantities("3월 21일에 전입하고 2024년 5월에 계약했으며 보증금은 1억 5천만 원입니다") == set()
    assert quantities("제가 한 일이 있어요. 세 번째 집") == set()  # number words count only before unambiguous units
    assert quantities("6달 뒤, 14일 안에") == {(6, "개월"), (14, "일")}  # 달 is 개월


def test_gate_drops_a_sentence_whose_period_the_sources_do_not_state():
    allowed = quantities("존속기간을 정하지 않으면 견고한 건물은 30년, 그 밖의 건물은 15년입니다.")
    text = "지상권은 20년이 지나면 소멸합니다. 목조 주택이라면 15년이 적용됩니다. (근거: 민법 제281조)"
    gate = SentenceGate(allowed)
    gate.feed(text)
    assert gate.close() == "목조 주택이라면 15년이 적용됩니다. (근거: 민법 제281조)"
    assert gate.dropped == ["지상권은 20년이 지나면 소멸합니다."]
    assert unsupported("20년이 지나면", allowed) == {(20, "년")}


def test_streamed_pieces_give_what_the_whole_text_gives():
    allowed = quantities("계약금의 배액을 상환하고 해제할 수 있다")
    text = "매도인은 받은 돈의 두 배를 돌려줘야 합니다. 3년 안에 하세요.\n기한은 3.5년입니다. (근거: 민법 제565조)"
    whole = SentenceGate(allowed)
    whole.feed(text)
    shown: list[str] = []
    streamed = SentenceGate(allowed, shown.append)
    for i in range(0, len(text), 3):
        streamed.feed(text[i : i + 3])
    kept = "매도인은 받은 돈의 두 배를 돌려줘야 합니다. (근거: 민법 제565조)"  # 배액 is 두 배
    assert streamed.close() == whole.close() == kept
    assert "".join(shown).strip() == kept  # nothing dropped was ever shown
    assert streamed.dropped == ["3년 안에 하세요.", "기한은 3.5년입니다."]


def test_refusals():
    assert refusal("What is a jeonse deposit?", in_scope=True) == LANGUAGE_MESSAGE
    assert refusal("전세금은 언제 돌려받나요?", in_scope=False) == ABSTAIN_MESSAGE
    assert refusal("전세금은 언제 돌려받나요?", in_scope=True) is None
    assert "132" in ABSTAIN_MESSAGE and "Korean" in LANGUAGE_MESSAGE


def test_gate_drops_restatements_of_the_rule_and_a_sentence_cut_by_the_token_limit():
    rule = "임차인은 임차주택의 매각대금에서 후순위권리자보다 먼저 보증금을 변제받을 권리가 있다."
    gate = SentenceGate(set(), rule=rule)
    gate.feed(
        "임차인은 매각대금에서 후순위권리자보다 먼저 보증금을 변제받을 수 없습니다. "  # a near-copy that flips it
        "집이 경매로 넘어가도 배당요구를 하면 은행보다 먼저 받습니다. (근거: 주택임대차보호법 제3조의2) 그리고 보증"
    )
    assert (
        gate.close(complete=False)
        == "집이 경매로 넘어가도 배당요구를 하면 은행보다 먼저 받습니다. (근거: 주택임대차보호법 제3조의2)"
    )
    assert gate.restated == ["임차인은 매각대금에서 후순위권리자보다 먼저 보증금을 변제받을 수 없습니다."]
