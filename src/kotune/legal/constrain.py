"""Constrained citations, as a `generate` logits processor (the grounding's logits rule).

While the model writes `(근거: …)`, it may only cite the articles that were retrieved for the question (optionally
with a paragraph, `제N항`, that the article has), separated by commas, closed by `)`.

The rule is checked on text, not tokens: a candidate token is allowed when the citation written so far plus the
token's text is still the beginning of an allowed citation list. Only the most likely candidates are checked each
step, so the cost is a few dozen short decodes per token, and only inside a citation.
"""

from __future__ import annotations

from ..infer.constrain import open_citation

CANDIDATES = 64  # most likely tokens checked per step; widened once if none fits
WINDOW = 16  # tokens of the answer decoded before each candidate: enough context for its text, not the whole answer


def citation_items(articles) -> list[str]:
    """`민법 제303조` and `민법 제303조 제1항` … for each article, longest first."""
    items = []
    for a in articles:
        items.append(a.cite)
        items += [f"{a.cite} 제{n}항" for n in range(1, len(a.paragraphs) + 1)]
    return sorted(set(items), key=len, reverse=True)


def fits(tail: str, items: list[str]) -> bool:
    """Is `tail` (the text after `근거:`) the beginning of `item, item, … )`?"""
    t = tail.lstrip()
    while t:
        for it in items:  # longest first: `제3조의2` and `제3조 제1항` are tried before `제3조`
            if not t.startswith(it):
                continue
            rest = t[len(it) :]
            if rest == "" or rest.startswith(")"):
                return True
            if rest.startswith(","):
                t = rest[1:].lstrip()
                break
        else:
            return any(it.startswith(t) for it in items)
    return True


class CitationConstraint:
    """A `generate` logits processor. `contexts[b]`: the articles row b may cite;
    `prompt_len`: where generated tokens start (rows are left-padded to one width)."""

    def __init__(self, tokenizer, contexts: list[list], prompt_len: int):
        self.tok, self.prompt_len = tokenizer, prompt_len
        self.contexts = contexts
        self.items = [citation_items(c) for c in contexts]
        self.special = set(tokenizer.all_special_ids)

    def for_row(self, b: int) -> "CitationConstraint":
        """The constraint of row b alone (engines that generate one row at a time)."""
        return CitationConstraint(self.tok, [self.contexts[b]], self.prompt_len)

    def __call__(self, input_ids, scores):
        import torch

        for b in range(scores.shape[0]):
            if not self.items[b]:
                continue
            gen = input_ids[b, self.prompt_len :].tolist()
            text = self.tok.decode(gen, skip_special_tokens=True)
            tail = open_citation(text)
            if tail is None:
                continue
            allowed = self._allowed(gen, text, tail, scores[b], self.items[b])
            if not allowed:  # nothing sensible among the candidates: leave the step alone; the checker flags it
                continue
            keep = torch.full_like(scores[b], float("-inf"))
            idx = torch.tensor(allowed, device=scores.device)
            vals = scores[b, idx]
            # Sampling filters (top-k/top-p) may already have set an allowed token to -inf.
            keep[idx] = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals) - 1e4)
            scores[b] = keep
        return scores

    def _allowed(self, gen, text, tail, row_scores, items) -> list[int]:
        for width in (CANDIDATES, CANDIDATES * 16):
            ids = [
                t for t in row_scores.topk(min(width, row_scores.shape[0])).indices.tolist() if t not in self.special
            ]
            pieces = self.pieces(gen, text, ids)
            out = [t for t, piece in zip(ids, pieces) if piece and fits(tail + piece, items)]
            if out:
                return out
        return []

    def pieces(self, gen: list[int], text: str, candidates: list[int]) -> list[str]:
        """The text each candidate would add to `text` (the decoded `gen`): the last `WINDOW` tokens plus the
        candidate, decoded together in one call, minus the window's own text. Decoding is local, so this is what
        decoding the whole answer plus the candidate gives, without that cost per candidate (up to 1 024 a step);
        where the window's text is not the end of `text` (a character split across its first token), the whole
        answer is used instead."""
        window = gen[-WINDOW:]
        base = self.tok.decode(window, skip_special_tokens=True)
        if len(window) < len(gen) and not text.endswith(base):
            window, base = gen, text
        full = self.tok.batch_decode([window + [t] for t in candidates], skip_special_tokens=True)
        return [f[len(base) :] for f in full]
