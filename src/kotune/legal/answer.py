"""What a grounded answer is made of, and what it may not say.

A grounded answer states the rule first, in the knowledge base's words for the paragraphs relevant to the question
(`rule_line`), then the model's application of it to the user's facts. The application is checked sentence by
sentence while it streams (`SentenceGate`):
- a sentence that names a period, share or multiple (`2년`, `6개월`, `5%`, `두 배`) found neither in the articles
  the model was given nor in the question is dropped: that is how a small model is confidently wrong (a 20-year
  term where the statute says 15);
- a sentence that restates the rule shown above it is dropped: it adds nothing, and a small model's near-copy of
  a rule sometimes flips its meaning (`먼저 받을 수 있다` → `먼저 받을 수 없다`);
- a sentence cut off by `max_new_tokens` is dropped.
Questions outside what the KB covers, and questions with no Korean in them, get a plain refusal instead of an
answer (`refusal`).
"""

from __future__ import annotations

import re
from typing import Callable

ABSTAIN_MESSAGE = (
    "이 질문은 이 상담 챗봇이 근거로 삼는 조문(민법의 부동산·계약·임대차 관련 조문, 주택임대차보호법, "
    "상가건물 임대차보호법) 밖의 내용이라 답변하지 않겠습니다. 잘못된 근거로 답하는 것보다 전문가에게 확인하시는 것이 "
    "안전합니다. 대한법률구조공단(국번 없이 132)의 무료 법률상담이나 변호사와 상담해 보세요."
)
LANGUAGE_MESSAGE = (
    "한국어로 질문해 주세요. 이 챗봇은 한국의 부동산·전세·임대차 관련 법(민법, 주택임대차보호법, "
    "상가건물 임대차보호법)에 대한 한국어 질문에 답합니다. / Please ask in Korean: this chatbot answers Korean "
    "questions about Korean real-estate and lease law."
)

_HANGUL = re.compile(r"[\uac00-\ud7a3\u3131-\u318e]")
_NUMBER_WORDS = {"한": 1, "두": 2, "세": 3, "네": 4, "다섯": 5, "여섯": 6, "일곱": 7, "여덟": 8, "아홉": 9, "열": 10}
# A legal quantity: a number with a unit of time, share or multiple. Dates (`3월 21일`, `2024년`) are facts of the
# user's case, not rules, and amounts of money are computed from them: neither is checked. Number words only count
# before units they cannot be confused with (`한 달`, `두 배`, not `한 일`).
_DATE = re.compile(r"\d{4}\s*년|\d{1,2}\s*월(?:\s*\d{1,2}\s*일)?")
_QUANTITY = re.compile(
    r"(?<![\d.])(\d+(?:\.\d+)?)\s*(년|개월|달|주일|주|일|%|퍼센트|배)"
    r"|(?<![가-힣])(한|두|세|네|다섯|여섯|일곱|여덟|아홉|열)\s*(달|개월|배|해)"
)
_UNITS = {"달": "개월", "퍼센트": "%", "주일": "주", "해": "년"}
# A sentence made of the shown rule's character bigrams at least this much restates it. On the 428 rule-then-application
# training answers, 53% of the rule-restating first sentences and 1.5% of the application sentences after them reach
# 0.7 (bench/restatement_threshold.py).
RESTATEMENT = 0.7
_CITATION_END = re.compile(r"\(근거:[^()]*\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=다\.)|(?<=요\.)|\n")


def has_hangul(text: str) -> bool:
    return bool(_HANGUL.search(text))


def quantities(text: str) -> set[tuple[float, str]]:
    """The (number, unit) pairs of periods, shares and multiples written in `text`."""
    out = set()
    for num, unit, word, wunit in _QUANTITY.findall(_DATE.sub(" ", text)):
        value, unit = (float(num), unit) if num else (float(_NUMBER_WORDS[word]), wunit)
        out.add((value, _UNITS.get(unit, unit)))
    if "배액" in text:  # the statutes' word for twice the amount (계약금의 배액)
        out.add((2.0, "배"))
    return out


def unsupported(sentence: str, allowed: set[tuple[float, str]]) -> set[tuple[float, str]]:
    """The quantities of `sentence` that its sources do not state."""
    return quantities(sentence) - allowed


def bigrams(text: str) -> set[str]:
    t = re.sub(r"\s+", "", text)
    return {t[i : i + 2] for i in range(len(t) - 1)}


def overlap(sentence: str, rule: set[str]) -> float:
    """Share of the sentence's character bigrams (spaces ignored) found in the rule's."""
    b = bigrams(sentence)
    return len(b & rule) / len(b) if b else 0.0


class SentenceGate:
    """Streams text on whole sentences, dropping a sentence with a quantity its sources do not state (`dropped`) or
    one that restates `rule` (`restated`). `on_text` receives what is kept; the `(근거: …)` citation is never
    dropped."""

    def __init__(self, allowed: set[tuple[float, str]], on_text: Callable[[str], None] | None = None, rule: str = ""):
        self.allowed, self.on_text = allowed, on_text
        self.rule = bigrams(rule) if rule else set()
        self.buf = ""
        self.kept: list[str] = []
        self.dropped: list[str] = []
        self.restated: list[str] = []

    def feed(self, piece: str) -> None:
        self.buf += piece
        while True:
            cut = None
            m = _SENTENCE_END.search(self.buf)
            # after a period, wait for what follows: `3.5년` or a closing quote must not split a sentence
            if m is not None and (m.end() < len(self.buf) or self.buf.endswith(("\n", " "))):
                cut = m.end()
            c = _CITATION_END.search(self.buf)  # a finished `(근거: …)` ends what precedes it
            if c is not None and (cut is None or c.end() < cut):
                cut = c.end()
            if cut is None:
                break
            sentence, self.buf = self.buf[:cut], self.buf[cut:]
            self._emit(sentence)

    def close(self, complete: bool = True) -> str:
        """The kept text. `complete=False`: the generation stopped at its token limit, so the unfinished last
        sentence is dropped (a cut citation too: the rule line above already names the article)."""
        if self.buf:
            if complete:
                self._emit(self.buf)
            self.buf = ""
        return "".join(self.kept).strip()

    def _emit(self, sentence: str) -> None:
        if not sentence.strip():
            if self.kept:
                self.kept.append(sentence)
            return
        if "(근거" not in sentence:
            if unsupported(sentence, self.allowed):
                self.dropped.append(sentence.strip())
                return
            if self.rule and overlap(sentence, self.rule) >= RESTATEMENT:
                self.restated.append(sentence.strip())
                return
        self.kept.append(sentence)
        if self.on_text is not None:
            self.on_text(sentence)


def rule_line(article, excerpt: str) -> str:
    """The rule an answer rests on: the article and its relevant paragraphs, as the KB words them."""
    return f"{article.cite}({article.title}): {excerpt}"


def refusal(question: str, in_scope: bool) -> str | None:
    """The message instead of an answer, or None to answer."""
    if not has_hangul(question):
        return LANGUAGE_MESSAGE
    if not in_scope:
        return ABSTAIN_MESSAGE
    return None
