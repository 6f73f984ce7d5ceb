"""Checking the citations of an answer against the KB (and the articles retrieved for it), and marking or dropping
the ones that do not hold (`retrieval.citation_policy`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .statutes import Article, find_citations, format_cite


@dataclass
class CitationCheck:
    valid: list[Article]  # exist and were in the retrieved context
    invented: list[str]  # cite an article the KB does not have
    out_of_context: list[str]  # exist, but were not among the retrieved articles


def check_citations(
    answer: str, kb: dict[tuple[str, str], Article], context: list[Article] | None = None
) -> CitationCheck:
    allowed = {a.key for a in context} if context is not None else None
    valid, invented, outside = [], [], []
    for law, art in find_citations(answer):
        cite = format_cite(law, art)
        if (law, art) not in kb:
            invented.append(cite)
        elif allowed is not None and (law, art) not in allowed:
            outside.append(cite)
        else:
            valid.append(kb[(law, art)])
    return CitationCheck(valid, invented, outside)


def apply_citation_policy(answer: str, check: CitationCheck, policy: str = "mark") -> str:
    """`mark`: flag bad citations in place; `drop`: remove them from the text."""
    out = answer
    for cite in check.invented + check.out_of_context:
        flag = "지식 베이스에 없는 조문" if cite in check.invented else "검색된 조문 밖"
        pattern = re.escape(cite).replace(r"\ ", r"\s*") + r"(?!\d|의\d)"
        out = re.sub(pattern, "" if policy == "drop" else f"{cite}[확인 필요: {flag}]", out)
    if policy == "drop":
        out = re.sub(r"\(근거:\s*[,\s]*\)", "", out)
        out = re.sub(r",\s*,", ",", out).replace("(근거: ,", "(근거:").replace(", )", ")")
    return out.strip()
