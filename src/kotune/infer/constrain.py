"""A generic decoding rule, as a `generate` logits processor.

RepeatGuard: no run of n generated tokens a third time (loops), outside a citation list `(근거: …)`, where a law's
name rightly repeats. The civil-law recipe's citation rule is `kotune.legal.constrain`.
"""

from __future__ import annotations

MARKER = "근거:"


def open_citation(text: str) -> str | None:
    """The unfinished citation list at the end of `text`, or None outside one."""
    i = text.rfind(MARKER)
    if i < 0:
        return None
    tail = text[i + len(MARKER) :]
    return None if ")" in tail else tail


class RepeatGuard:
    """A `generate` logits processor that stops loops: a run of `n` generated tokens may occur at most twice in an
    answer, so the token that would start its third occurrence is forbidden. Small models otherwise fall into
    `등등등…` or `소유자에게도 소유자에게도 …` and never reach EOS. Unlike `no_repeat_ngram_size` it ignores the prompt
    (a grounded answer should be free to copy its article) and open citation lists (a law's name repeats there)."""

    def __init__(self, tokenizer, n: int, prompt_len: int, limit: int = 2):
        self.tok, self.n, self.prompt_len, self.limit = tokenizer, n, prompt_len, limit

    def for_row(self, b: int) -> "RepeatGuard":
        return self

    def banned(self, gen: list[int]) -> list[int]:
        """Tokens that would complete a third occurrence of an n-gram of `gen`."""
        n = self.n
        if len(gen) < n:
            return []
        prefix = gen[len(gen) - n + 1 :] if n > 1 else []
        counts: dict[int, int] = {}
        for i in range(len(gen) - n + 1):
            if gen[i : i + n - 1] == prefix:
                t = gen[i + n - 1]
                counts[t] = counts.get(t, 0) + 1
        return [t for t, c in counts.items() if c >= self.limit]

    def __call__(self, input_ids, scores):
        for b in range(scores.shape[0]):
            gen = input_ids[b, self.prompt_len :].tolist()
            ban = self.banned(gen)
            if ban and open_citation(self.tok.decode(gen, skip_special_tokens=True)) is None:
                scores[b, ban] = float("-inf")
        return scores
