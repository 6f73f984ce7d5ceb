"""infer/sampling.py: the token picker both engines share."""

from __future__ import annotations

import torch

from kotune.infer.sampling import _top_k_survivors, draw, next_tokens, sample, warp, warp_scores


def _full_sort_top_p(scores, top_k, top_p, temperature=1.0):
    """The reference: temperature, top-k, then top-p over the whole sorted row (HF's warpers, in their order)."""
    scores = scores / temperature
    kth = torch.topk(scores, top_k).values[:, -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    ordered, order = torch.sort(scores)
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def test_top_p_over_the_top_k_candidates_drops_what_a_full_sort_drops():
    torch.manual_seed(0)
    seen = torch.zeros(4, 1, dtype=torch.long)
    for vocab, k, p, t in [(50, 20, 0.8, 1.0), (4096, 50, 0.9, 0.7), (1000, 5, 0.5, 1.3), (4096, 50, 0.99, 1.0)]:
        for _ in range(10):
            logits = torch.randn(4, vocab) * 3
            got = warp_scores(logits, seen, do_sample=True, temperature=t, top_k=k, top_p=p)
            want = _full_sort_top_p(logits, k, p, t)
            assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(
                got[~got.isinf()], want[~want.isinf()]
            )
    tied = torch.zeros(2, 100)  # 100 tokens tie with the 10th score: all survive top-k, top-p sorts the whole row
    tied[:, 0] = 5
    assert torch.equal(
        warp_scores(tied, seen[:2], do_sample=True, top_k=10, top_p=0.9).isinf(),
        _full_sort_top_p(tied, 10, 0.9).isinf(),
    )


def test_samples_follow_the_warped_distribution_and_never_a_removed_token():
    g = torch.Generator().manual_seed(0)
    n = 20000
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(n, 1)
    ids = next_tokens(logits, torch.zeros(n, 1, dtype=torch.long), do_sample=True, generator=g)
    freq = torch.bincount(ids, minlength=5).float() / n
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)
    removed = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]]).repeat(n, 1)
    ids = next_tokens(removed, torch.zeros(n, 1, dtype=torch.long), do_sample=True, generator=g)
    assert set(ids.tolist()) == {0, 2}
    again = next_tokens(
        logits[:50], torch.zeros(50, 1, dtype=torch.long), do_sample=True, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(
        again,
        next_tokens(
            logits[:50],
            torch.zeros(50, 1, dtype=torch.long),
            do_sample=True,
            generator=torch.Generator().manual_seed(1),
        ),
    )  # a seed gives the same draw


def _full_sort_nucleus(scores, top_p):
    ordered, order = torch.sort(scores)
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def test_top_p_without_top_k_keeps_what_a_full_sort_keeps():
    # peaked rows take the top-1024 path; flat ones (the 1024 best hold less than top_p) fall back to the sort
    torch.manual_seed(0)
    seen = torch.zeros(3, 1, dtype=torch.long)
    for vocab, scale, p in [(50000, 8.0, 0.9), (50000, 8.0, 0.5), (4096, 0.1, 0.9), (300, 3.0, 0.95)]:
        for _ in range(5):
            logits = torch.randn(3, vocab) * scale
            got = warp_scores(logits, seen, do_sample=True, top_p=p)
            want = _full_sort_nucleus(logits, p)
            assert torch.equal(torch.isinf(got), torch.isinf(want))
            assert torch.equal(got[~got.isinf()], want[~want.isinf()])


def test_drawing_among_the_survivors_picks_what_the_whole_row_picks():
    # top-k, and top-p alone on peaked rows, draw over their survivors only; flat rows and ties fall back to the row
    torch.manual_seed(0)
    cases = [
        (50000, 6.0, 0.7, 50, 0.9),
        (50000, 6.0, 1.0, None, 0.9),
        (4096, 0.1, 1.0, None, 0.9),
        (300, 2.0, 1.3, 10, None),
    ]
    for vocab, scale, t, k, p in cases:
        logits = torch.randn(64, vocab) * scale
        for seed in range(5):
            g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            want = draw(warp(logits, t, k, p), [g1] * 64)
            got = sample(logits, [g2] * 64, t, k, p)
            assert (got == want).float().mean() > 0.98  # the same uniform draw (rounding may move a boundary)
            assert torch.isfinite(warp(logits, t, k, p).gather(1, got[:, None])).all()
    tied = torch.zeros(4, 100)
    got = sample(tied, [torch.Generator().manual_seed(0)] * 4, None, 10, 0.9)  # a tie: the whole row's draw
    assert torch.equal(got, draw(warp(tied, None, 10, 0.9), [torch.Generator().manual_seed(0)] * 4))


def test_a_constrained_row_with_fewer_than_k_tokens_left_takes_the_short_path():
    # a citation constraint leaves a handful of tokens and sets the rest to -inf: their tie at -inf is no reason to
    # sort the whole vocabulary, and the result is the full sort's
    torch.manual_seed(0)
    logits = torch.full((3, 50000), float("-inf"))
    for row, n in enumerate((3, 20, 49)):
        logits[row, torch.randperm(50000)[:n]] = torch.randn(n) * 2
    assert _top_k_survivors(logits, 0.7, 50, 0.9) is not None
    got = warp(logits, 0.7, 50, 0.9)
    want = _full_sort_top_p(logits, 50, 0.9, 0.7)
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[~got.isinf()], want[~want.isinf()])
    picked = sample(logits, [torch.Generator().manual_seed(0)] * 3, 0.7, 50, 0.9)
    assert torch.isfinite(logits.gather(1, picked[:, None])).all()
