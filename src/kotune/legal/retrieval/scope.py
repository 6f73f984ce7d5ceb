"""Is a question inside what the knowledge base covers? Two binary classifiers, in scope (the example questions,
which cite KB articles) against out of scope (questions written to have no basis in the KB: other laws, other
civil-law topics, real-estate questions no article answers, chat), over the same two feature sets as the article
classifiers (e5 vectors; Kiwi morphemes and bigrams, TF-IDF). Their mean probability is the scope score; the
chatbot abstains below a threshold.

The threshold is not hand-picked: `calibrate` scores every question once while it is held out of a 5-fold
cross-validation and takes the highest threshold that abstains on at most a given share of the in-scope examples
(`retrieval.abstain_in_scope`). The curve it came from is kept (`Retriever.scope_curve`, bench/abstain_curve.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .classify import WordFeatures, train_classifier

FOLDS = 5


def _p_in(scores) -> float:
    """Probability of class 0 (in scope) from the two logits of one row (the classifier's scale applied)."""
    import numpy as np

    z = 10.0 * np.asarray(scores, dtype=np.float64)
    z = z - z.max()
    e = np.exp(z)
    return float(e[0] / e.sum())


class ScopeModel:
    """Trained on rows of (e5 vector, morphemes, in_scope); the two classes weigh the same however many rows each
    has."""

    def __init__(self, vectors, tokens: list[list[str]], in_scope: list[bool]):
        import numpy as np

        n_in = sum(in_scope)
        n_out = len(in_scope) - n_in
        if not n_in or not n_out:
            raise ValueError("the scope classifier needs in-scope and out-of-scope example questions.")
        # Targets carry the class weights: train_classifier averages (p - t) over rows, so a row's target mass is its
        # weight.
        w_in, w_out = len(in_scope) / (2 * n_in), len(in_scope) / (2 * n_out)
        targets = np.array([[w_in, 0.0] if s else [0.0, w_out] for s in in_scope])
        mass = targets.sum(1)
        self.e5 = train_classifier(vectors, targets, row_mass=mass)
        self.words = WordFeatures(tokens)
        self.word_w = train_classifier(self.words.train_rows, targets, row_mass=mass)

    def score(self, vector, tokens: list[str]) -> float:
        """P(in scope): the mean of the e5 and the word classifier's probabilities."""
        return 0.5 * (_p_in(vector @ self.e5) + _p_in(self.words.scores(tokens, self.word_w)))


@dataclass
class Calibration:
    threshold: float
    in_scope_rate: float  # the target: share of in-scope examples abstained at most
    curve: list[dict] = field(default_factory=list)  # {"threshold", "in_scope_abstained", "out_of_scope_abstained"}
    examples: dict = field(default_factory=dict)  # {"in_scope": n, "out_of_scope": n}


def calibrate(
    vectors, tokens: list[list[str]], in_scope: list[bool], in_scope_rate: float, seed: int = 0
) -> Calibration:
    """Out-of-fold scores of every example (each scored by a model trained without its fold), the curve of abstention
    rates against the threshold, and the highest threshold that abstains on at most `in_scope_rate` of the in-scope
    examples (ties broken towards abstaining more on the out-of-scope ones)."""
    import numpy as np

    order = list(range(len(in_scope)))
    random.Random(seed).shuffle(order)
    oof = np.zeros(len(in_scope))
    for k in range(FOLDS):
        held = set(order[k::FOLDS])
        keep = [i for i in order if i not in held]
        model = ScopeModel(vectors[keep], [tokens[i] for i in keep], [in_scope[i] for i in keep])
        for i in held:
            oof[i] = model.score(vectors[i], tokens[i])
    s_in = np.sort(oof[np.array(in_scope)])
    s_out = oof[~np.array(in_scope)]
    # Abstain when score < threshold: the largest threshold abstaining on <= rate of in-scope is the k-th lowest score.
    allowed = int(np.floor(in_scope_rate * len(s_in)))
    threshold = float(s_in[allowed]) if allowed < len(s_in) else 1.0
    curve = []
    for t in sorted(set(np.round(np.linspace(0.05, 0.95, 19), 2).tolist() + [round(threshold, 4)])):
        curve.append(
            {
                "threshold": t,
                "in_scope_abstained": float(np.mean(s_in < t)),
                "out_of_scope_abstained": float(np.mean(s_out < t)),
            }
        )
    return Calibration(threshold, in_scope_rate, curve, {"in_scope": int(len(s_in)), "out_of_scope": int(len(s_out))})
