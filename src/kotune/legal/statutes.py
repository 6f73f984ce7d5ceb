"""The shipped statute knowledge base and citation parsing.

Records live in `src/kotune/legal/kb/*.jsonl` (package data, so an installed kotune has them), one article per line:
`{"law", "article" ("3의2" form), "title", "paragraphs", "keywords"}`.
Citations are written `법령명 제N조` or `법령명 제N조의M`; the laws are 민법, 주택임대차보호법 and 상가건물 임대차보호법
(also recognised without its space).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

COMMERCIAL_LEASE = "상가건물 임대차보호법"
CITATION = re.compile(r"(민법|주택임대차보호법|상가건물\s*임대차보호법)\s*제\s*(\d+)\s*조(?:\s*의\s*(\d+))?")
DEFAULT_KB = Path(__file__).resolve().parent / "kb"


@dataclass(frozen=True)
class Article:
    law: str
    article: str
    title: str
    paragraphs: tuple[str, ...]
    keywords: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.law, self.article)

    @property
    def cite(self) -> str:
        return format_cite(self.law, self.article)

    @property
    def summary(self) -> str:
        return " ".join(self.paragraphs)

    def record(self) -> dict:
        """The article as `ask` output lines and the API's `citations` carry it."""
        return {
            "law": self.law,
            "article": self.article,
            "title": self.title,
            "cite": self.cite,
            "summary": self.summary,
        }


def format_cite(law: str, article: str) -> str:
    """('주택임대차보호법', '3의2') → '주택임대차보호법 제3조의2'."""
    num, _, branch = article.partition("의")
    return f"{law} 제{num}조" + (f"의{branch}" if branch else "")


def find_citations(text: str) -> list[tuple[str, str]]:
    """Every `(law, article)` cited in `text`, in order, without repeats."""
    out: list[tuple[str, str]] = []
    for law, num, branch in CITATION.findall(text):
        law = COMMERCIAL_LEASE if law.startswith("상가") else law  # written with or without its space
        key = (law, f"{num}의{branch}" if branch else num)
        if key not in out:
            out.append(key)
    return out


def load_kb(folder: str | Path = DEFAULT_KB) -> dict[tuple[str, str], Article]:
    kb: dict[tuple[str, str], Article] = {}
    problems = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                art = Article(
                    r["law"], str(r["article"]), r["title"], tuple(r["paragraphs"]), tuple(r.get("keywords", ()))
                )
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                problems.append(f"{path}: line {i}: {type(e).__name__}: {e}")
                continue
            if art.key in kb:
                problems.append(f"{path}: line {i}: duplicate article {art.cite}")
            kb[art.key] = art
    if problems:
        raise ValueError("statute knowledge base problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return kb
