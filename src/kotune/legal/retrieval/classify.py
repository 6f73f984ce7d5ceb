"""Article classifiers for retrieval: softmax regression (torch on the CPU, Adam, full batch) from a question to the
articles its answer cites, trained on the example questions and on each article's own text when the
retriever starts. Two feature sets, each a ranking in the fusion:

- `classifier`: e5 vectors (dense, 384 dims);
- `word-classifier`: Kiwi morphemes and morpheme bigrams, TF-IDF weighted (sparse). It learns the words that
  tell neighbouring articles apart (기간 vs 갱신, 수선 vs 비용), which e5 vectors blur.

Settings (l2 1e-3, scale 10, unigrams + bigrams) were chosen by 5-fold cross-validation on the training
questions (bench/retrieval.py --cv), not on the dev set. Training uses torch (a kotune dependency) on the CPU:
its sparse products make the word classifier's 400 steps take about a second for 1691 examples.
"""

from __future__ import annotations

import math
from collections import Counter


def sparse_rows(rows: list[list[tuple[int, float]]], dim: int):
    """(column, value) rows → a torch CSR matrix and its transpose (torch's sparse products are ~50× numpy's here)."""
    import warnings

    import torch

    rid = [i for i, r in enumerate(rows) for _ in r]
    idx = torch.tensor([rid, [c for r in rows for c, _ in r]], dtype=torch.int64).reshape(2, -1)
    coo = torch.sparse_coo_tensor(
        idx, torch.tensor([v for r in rows for _, v in r], dtype=torch.float32), (len(rows), dim), check_invariants=True
    ).coalesce()
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta", once per conversion
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()


def train_classifier(
    x, targets, l2: float = 1e-3, scale: float = 10.0, steps: int = 400, lr: float = 0.05, row_mass=None
):
    """Softmax regression from unit-length rows of `x` (a dense array, or `sparse_rows`' pair) to classes (articles):
    `targets` rows are each example's classes, weights summing to 1, or to the row's weight in the loss when
    `row_mass` gives those weights (the scope classifier balances its two classes so). Adam on the full batch
    (torch's formula with weight decay l2 is the same as the gradient of cross-entropy + l2/2·|W|²). Returns the
    (dim × classes) weight matrix W as numpy; a class's score for a query row q is q @ W."""
    import torch

    if isinstance(x, tuple):
        x, xt = x
    else:
        x = torch.as_tensor(x, dtype=torch.float32)
        xt = x.T
    t = torch.as_tensor(targets, dtype=torch.float32)
    mass = torch.as_tensor(row_mass, dtype=torch.float32)[:, None] if row_mass is not None else 1.0
    w = torch.zeros(x.shape[1], t.shape[1])
    w.grad = torch.zeros_like(w)
    opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=l2)
    with torch.no_grad():
        for _ in range(steps):
            p = torch.softmax(scale * (x @ w), dim=1)
            w.grad.copy_(scale * (xt @ (p * mass - t)) / x.shape[0])
            opt.step()
    return w.numpy().copy()


def _terms(tokens: list[str]) -> Counter:
    return Counter(list(tokens) + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])])


class WordFeatures:
    """TF-IDF rows over the morphemes and morpheme bigrams that occur in at least two training texts
    (a rarer term cannot generalise; it would only memorise its one example)."""

    def __init__(self, token_lists: list[list[str]]):
        docs = [_terms(t) for t in token_lists]
        df = Counter(term for d in docs for term in d)
        kept = sorted(term for term, c in df.items() if c >= 2)
        self.column = {term: i for i, term in enumerate(kept)}
        self.idf = [math.log(len(docs) / df[term]) + 1.0 for term in kept]
        self.train_rows = sparse_rows([self._row(d) for d in docs], len(kept))

    def _row(self, terms: Counter) -> list[tuple[int, float]]:
        row = [
            (self.column[t], (1.0 + math.log(c)) * self.idf[self.column[t]])
            for t, c in terms.items()
            if t in self.column
        ]
        norm = math.sqrt(sum(v * v for _, v in row)) or 1.0
        return [(i, v / norm) for i, v in row]

    def scores(self, tokens: list[str], w):
        """The classifier's article scores for one question's morphemes."""
        import numpy as np

        s = np.zeros(w.shape[1], dtype=np.float32)
        for i, v in self._row(_terms(tokens)):
            s += v * w[i]
        return s
