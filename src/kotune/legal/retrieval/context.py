"""What of an article a prompt or an answer shows: its summary cut to a budget, keeping the paragraphs most relevant
to the question (ranked by `Retriever.paragraph_ranking`) in their own order."""

from __future__ import annotations

from ..statutes import Article


def format_context(articles: list[Article], snippet_chars: int, rankings: list[list[int]] | None = None) -> str:
    """One line per article: citation, title and its summary, cut to `snippet_chars`. `rankings`: for each
    article, its paragraph indices most relevant first (`Retriever.paragraph_ranking`); a long summary then
    shows the most relevant paragraphs that fit, in their own order, instead of its start."""
    return "\n".join(
        context_line(a, excerpt(a, snippet_chars, None if rankings is None else rankings[n]))
        for n, a in enumerate(articles)
    )


def context_line(a: Article, text: str) -> str:
    return f"- {a.cite}({a.title}): {text}"


def excerpt(a: Article, snippet_chars: int, ranking: list[int] | None = None) -> str:
    """`a`'s summary cut to `snippet_chars`: its best-ranked paragraphs that fit (`ranking`), else its start."""
    text = a.summary
    if len(text) <= snippet_chars:
        return text
    return (
        _pick_paragraphs(a.paragraphs, ranking, snippet_chars)
        if ranking is not None
        else text[:snippet_chars].rstrip() + "…"
    )


def _pick_paragraphs(paragraphs: tuple[str, ...], ranking: list[int], budget: int) -> str:
    """The best-ranked paragraphs that fit in `budget` characters (always the first of them; the `…` marks between
    paragraphs left out are not counted), in document order."""
    chosen: list[int] = []
    used = 0
    for i in ranking:
        if not chosen or used + 1 + len(paragraphs[i]) <= budget:
            chosen.append(i)
            used += len(paragraphs[i]) + (1 if used else 0)
    if len(chosen) == 1 and used > budget:
        return paragraphs[chosen[0]][:budget].rstrip() + "…"
    chosen.sort()
    parts = [paragraphs[chosen[0]]]
    for prev, i in zip(chosen, chosen[1:]):
        parts.append(("… " if i > prev + 1 else "") + paragraphs[i])
    return " ".join(parts)
