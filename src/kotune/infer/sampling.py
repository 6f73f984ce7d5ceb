"""How the next token is picked from last-position logits, shared by both engines (the torch loop in `fastgen.py` and
llama.cpp in `llamacpp.py`), so a run answers the same way whichever engine computes its logits: `generate`'s
processors in `generate`'s order."""

from __future__ import annotations


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
    import torch

    scores = logits.float()
    if repetition_penalty and repetition_penalty != 1.0:
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
        scores = scores.scatter(1, seen, picked)
    for proc in logits_processor or ():
        scores = proc(seen, scores)
    if not do_sample:
        return scores
    if temperature and temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def next_tokens(logits, seen, *, do_sample: bool = False, generator=None, logits_processor=None, **warp):
    """Next ids [batch]: argmax of the penalised logits, or a sample from the warped ones.
    `logits_processor` (as in `generate`, e.g. constrained citations) runs before the sampling warpers, as there."""
    import torch

    scores = warp_scores(logits, seen, do_sample=do_sample, logits_processor=logits_processor, **warp)
    if not do_sample:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
