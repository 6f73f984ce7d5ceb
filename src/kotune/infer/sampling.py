"""How the next token is picked from last-position logits, shared by both engines (the torch loop in `fastgen.py` and
llama.cpp in `llamacpp.py`), so a run answers the same way whichever engine computes its logits: `generate`'s
processors in `generate`'s order."""

from __future__ import annotations


def stop_ids(eos_token_id) -> frozenset:
    """`eos_token_id` as `generate` takes it (an id, a list of ids, or None) as a set."""
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def warp_scores(
    logits,
    seen,
    *,
    repetition_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    logits_processor=None,
):
    """Last-position logits [batch, vocab] → scores after `generate`'s processors, in its
    order: repetition penalty over `seen` (all ids so far, prompt included), the caller's
    `logits_processor` (on `seen`), then, when sampling, temperature, top-k and top-p
    (removed tokens get -inf)."""
    scores = penalise(logits.float(), seen, repetition_penalty, logits_processor)
    return warp(scores, temperature, top_k, top_p) if do_sample else scores


def penalise(scores, seen, repetition_penalty: float = 1.0, logits_processor=None):
    """The repetition penalty over `seen`, then the caller's `logits_processor` (on `seen`): `generate`'s order."""
    import torch

    if repetition_penalty and repetition_penalty != 1.0:
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
        scores = scores.scatter(1, seen, picked)
    for proc in logits_processor or ():
        scores = proc(seen, scores)
    return scores


def warp(scores, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None):
    """The sampling warpers in `generate`'s order: temperature, top-k, top-p (removed tokens get -inf)."""
    import torch

    few = _survivors(scores, temperature, top_k, top_p)
    if few is not None:
        ids, kept = few
        return torch.full_like(scores, float("-inf")).scatter(1, ids, kept)
    # Only reached when the survivors cannot be listed (a tie at the k-th finite score, or a flat row without top-k):
    # the whole row, as `generate`'s warpers do it.
    if temperature and temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        scores = scores.masked_fill(_nucleus_drops(scores, top_p), float("-inf"))
    return scores


def sample(scores, generators, temperature: float | None = None, top_k: int | None = None, top_p=None):
    """`draw(warp(scores, ...), generators)`, over the survivors alone when the warpers leave a few (top-k, or a
    nucleus among the 1024 most likely): no softmax, cumulative sum or -inf row over the whole vocabulary. The
    survivors are drawn from in vocabulary order, as the full row would be, so a uniform draw picks the same token."""
    few = _survivors(scores, temperature, top_k, top_p)
    if few is None:
        return draw(warp(scores, temperature, top_k, top_p), generators)
    ids, kept = few
    ids, order = ids.sort(-1)
    return ids.gather(1, draw(kept.gather(1, order), generators)[:, None])[:, 0]


def _survivors(scores, temperature, top_k, top_p):
    """(ids, warped scores) of the tokens the warpers keep, or None when they keep too many to list (no top-k and a
    flat distribution, or a tie at the k-th score): then only the whole row gives `warp`'s answer."""
    if top_k and top_k < scores.shape[-1]:
        return _top_k_survivors(scores, temperature, top_k, top_p)
    if top_p is not None and top_p < 1.0 and not top_k:
        if temperature and temperature != 1.0:
            scores = scores / temperature
        return _nucleus_among_top(scores, top_p)
    return None


def _nucleus_drops(row, top_p: float):
    """Which entries of `row` top-p removes: those whose ascending cumulative probability stays within 1 - top_p."""
    import torch

    sorted_scores, order = torch.sort(row, descending=False)
    drop = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
    drop[:, -1] = False  # the most likely token always stays
    return drop.scatter(1, order, drop)


def _top_k_survivors(scores, temperature, top_k: int, top_p):
    """`warp` with top-k, computed on the k survivors only (each pass over a 262k vocabulary costs about a
    millisecond a row, a sort of it ten): their ids and scores, or None when a row ties at its k-th finite score
    (then more than k survive)."""
    import torch

    top, ids = torch.topk(scores, top_k + 1)
    if temperature and temperature != 1.0:
        top = top / temperature  # the k+1 largest after the division too: it keeps the order (ties may appear)
    # A tie at the k-th score keeps more than k tokens, unless the tie is at -inf: then fewer than k tokens are left
    # (a citation constraint allows a handful) and top-k keeps them all, which are among these k.
    if not bool(((top[:, top_k] < top[:, top_k - 1]) | (top[:, top_k - 1] == float("-inf"))).all()):
        return None
    kept, ids = top[:, :top_k], ids[:, :top_k]
    if top_p is not None and top_p < 1.0:
        kept = kept.masked_fill(_nucleus_drops(kept, top_p), float("-inf"))
    return ids, kept


def _nucleus_among_top(scores, top_p: float, k: int = 1024):
    """Top-p without top-k, without sorting the vocabulary (a 262k-entry sort costs ~12 ms a token on 2 cores): when
    the k most likely tokens already hold more than `top_p` of the probability, every other token is dropped anyway,
    and the drops among the k follow from their probabilities plus the mass outside them. None when they do not
    (a flat distribution): then the caller sorts the whole row. Returns the k ids and their scores (-inf if dropped)."""
    import torch

    k = min(k, scores.shape[-1])
    top, ids = torch.topk(scores, k)  # descending
    logp = top - torch.logsumexp(scores, -1, keepdim=True)
    probs = logp.exp()
    mass = probs.sum(-1, keepdim=True)
    if not bool((mass > top_p).all()):
        return None
    # ascending cumulative probability over the whole vocabulary, as the full sort computes it
    cum = (1 - mass) + probs.flip(-1).cumsum(-1)
    drop = (cum <= (1 - top_p)).flip(-1)
    drop[:, 0] = False  # the most likely token always stays
    return ids, top.masked_fill(drop, float("-inf"))


def next_tokens(
    logits, seen, *, do_sample=False, generator=None, logits_processor=None, repetition_penalty=1.0, **warp_kw
):
    """Next ids [batch]: argmax of the penalised logits, or a sample from the warped ones.
    `logits_processor` (as in `generate`, e.g. constrained citations) runs before the sampling warpers, as there."""
    scores = penalise(logits.float(), seen, repetition_penalty, logits_processor)
    if not do_sample:
        return scores.argmax(-1)
    return sample(scores, [generator] * scores.shape[0], **warp_kw)


def draw(scores, generators):
    """One sample per row of warped scores [batch, vocab]; `generators[i]`: row i's torch.Generator or None (the
    global one). Inverse CDF: one uniform draw per row against the cumulative probabilities. The same distribution as
    torch.multinomial, which takes ~5 ms per row over Gemma's 262k-token vocabulary on 2 CPU cores (this: ~0.5 ms)."""
    import torch

    cdf = scores.softmax(-1).cumsum(-1)
    if len({id(g) for g in generators}) == 1:  # one generator (or the global one) for every row
        u = torch.rand(cdf.shape[0], 1, generator=generators[0], device=cdf.device, dtype=cdf.dtype)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device, dtype=cdf.dtype) for g in generators])
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(1)
