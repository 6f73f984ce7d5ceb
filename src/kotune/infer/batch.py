"""Continuous batching for the torch engine: sequences join and leave a running batch between decode steps.

Decoding on a CPU reads every weight once per step whatever the batch, so eight sequences cost little more per step
than one. Each sequence is prefilled alone (its prompt's KV cache, batch 1), then merged into the running batch's
cache by left-padding the shorter side; a finished or cancelled sequence is dropped from the batch dimension and
columns that only padding still uses are trimmed. Every sequence keeps its own sampling settings, logits processors
(stop rules, citation constraint), token budget and stop ids, and hands each new token to its own callback.

Only Hugging Face's dynamic caches (full and sliding-window layers) are merged; `supports_batching` says whether a
model's cache is one of them, so the server falls back to one request at a time for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .sampling import penalise, sample


@dataclass(eq=False)
class Sequence:
    """One request's decoding state. `on_token(id)` is called with each new token (it may raise to cancel)."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset = frozenset()
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    logits_processor: list = field(default_factory=list)
    on_token: Callable[[int], None] | None = None
    generator: object = None  # a torch.Generator for this request's sampling, or None for the global one
    new: list[int] = field(default_factory=list)
    finished: bool = False
    error: BaseException | None = None  # what `on_token` raised, which ended this sequence

    @property
    def stopped(self) -> bool:
        """Ended on a stop id (not on the token budget)."""
        return bool(self.new) and self.new[-1] in self.stop_ids


def _layers(cache) -> list | None:
    """The cache's layers if every one is a plain dynamic layer (full or sliding window) we know how to merge."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    known = (DynamicLayer, DynamicSlidingWindowLayer, *_appending_classes().values())
    if not layers or any(type(layer) not in known for layer in layers):
        return None
    return layers


HEADROOM = 256  # columns allocated ahead, per layer, so a decode step appends in place


def _append(layer, key_states, value_states, *args, **kwargs):
    """`update` of an appending layer: the new columns are written into a buffer with room ahead instead of
    concatenated (a copy of the whole cache, every layer, every step). Holds the same values as the dynamic layer's
    `torch.cat`, so attention sees the same keys. `keys`/`values` stay views of the buffer; when something else
    replaces them (a batch merges or drops rows) or the room runs out, the next call copies them into a new buffer."""

    if not layer.is_initialized or layer.keys is None:  # reset since: the dynamic layer's own first update
        return super(type(layer), layer).update(key_states, value_states, *args, **kwargs)
    add = key_states.shape[-2]
    if layer.keys is not layer._view or layer._end + add > layer._kbuf.shape[2]:
        keys, values = layer.keys, layer.values
        n = keys.shape[-2]
        room = n + add + HEADROOM  # keys and values may differ in width (latent attention: MLA)
        layer._kbuf = keys.new_empty((*keys.shape[:2], room, keys.shape[3]))
        layer._vbuf = values.new_empty((*values.shape[:2], room, values.shape[3]))
        layer._kbuf[:, :, :n], layer._vbuf[:, :, :n] = keys, values
        layer._end = n
    start, end = layer._end - layer.keys.shape[-2], layer._end + add
    layer._kbuf[:, :, layer._end : end] = key_states
    layer._vbuf[:, :, layer._end : end] = value_states
    layer._end = end
    full_keys, full_values = layer._kbuf[:, :, start:end], layer._vbuf[:, :, start:end]
    window = getattr(layer, "sliding_window", None)
    if window is None:
        layer.keys, layer.values = full_keys, full_values
    else:  # as the sliding layer: keep the last window - 1 columns, return them with the new ones
        layer.cumulative_length += add
        layer.keys, layer.values = full_keys[:, :, -window + 1 :], full_values[:, :, -window + 1 :]
    layer._view = layer.keys
    return full_keys, full_values


_APPENDING: dict = {}


def _appending_classes() -> dict:
    """The dynamic layer classes, each with an appending subclass (built once, transformers imported lazily)."""
    if not _APPENDING:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        for base in (DynamicLayer, DynamicSlidingWindowLayer):
            _APPENDING[base] = type(f"Appending{base.__name__}", (base,), {"update": _append})
    return _APPENDING


def appending(cache):
    """Switch a dynamic cache's layers (after the prefill) to append in place; returns the cache. Layers of other
    kinds, and sliding layers that record their past, are left as they are."""
    classes = _appending_classes()
    for layer in getattr(cache, "layers", ()):
        cls = classes.get(type(layer))
        if cls is not None and getattr(layer, "is_initialized", False) and not getattr(layer, "record_past", False):
            layer.__class__ = cls
            layer._view = layer._kbuf = layer._vbuf = None
            layer._end = 0
    return cache


def _kept(layer, width: int) -> int:
    """How many positions a layer keeps for a frame `width` wide: all of them, or a sliding window's last w-1."""
    window = getattr(layer, "sliding_window", None)
    return width if window is None else min(width, window - 1)


def _left_pad(t, n: int):
    import torch

    if n <= 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


class BatchDecoder:
    """The running batch of one model (a `FastGenerator`). Not thread-safe: one thread calls `add` and `step`."""

    def __init__(self, engine):
        self.engine = engine
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask = None  # [batch, frame]: 1 where a row has a real token
        self.last = None  # [batch]: each row's newest token, the next step's input
        self.pos = None  # [batch]: each row's next position id

    def __len__(self) -> int:
        return len(self.seqs)

    @staticmethod
    def _pick(logits, seqs: list[Sequence]) -> list[int]:
        """Each row's next token: its own penalty and processors row by row, then the warpers and draws of the rows
        that share sampling settings together (one pass over the vocabulary instead of one per row)."""
        import torch

        scores = logits.float()
        for i, s in enumerate(seqs):
            if s.repetition_penalty != 1.0 or s.logits_processor:
                seen = torch.tensor([s.prompt + s.new], device=scores.device)
                scores[i : i + 1] = penalise(scores[i : i + 1], seen, s.repetition_penalty, s.logits_processor)
        groups: dict = {}
        for i, s in enumerate(seqs):
            groups.setdefault((s.temperature, s.top_k, s.top_p) if s.do_sample else None, []).append(i)
        tokens = [0] * len(seqs)
        for key, rows in groups.items():
            sub = scores if len(rows) == len(seqs) else scores[rows]
            picked = sub.argmax(-1) if key is None else sample(sub, [seqs[i].generator for i in rows], *key)
            for i, t in zip(rows, picked.tolist()):
                tokens[i] = t
        return tokens

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.new.append(token)
        if token in seq.stop_ids or len(seq.new) >= seq.max_new_tokens:
            seq.finished = True
        if seq.on_token is not None:
            seq.on_token(token)

    def add(self, seq: Sequence) -> None:
        """Prefill `seq`'s prompt alone, pick its first token, and merge it into the batch. Raises what `on_token`
        raises (the sequence is then not added)."""
        import torch

        device = self.engine.device
        ids = torch.tensor([seq.prompt], device=device)
        with torch.inference_mode():
            logits, cache = self.engine._forward(
                ids, torch.ones_like(ids), torch.arange(len(seq.prompt), device=device)[None], None
            )
            token = self._pick(logits, [seq])[0]
        self._emit(seq, token)
        if seq.finished:
            return
        if _layers(cache) is None:
            raise TypeError(f"cannot batch a {type(cache).__name__}: only dynamic caches are merged")
        appending(cache)
        row_mask = torch.ones(1, len(seq.prompt), dtype=torch.long, device=device)
        last = torch.tensor([token], device=device)
        pos = torch.tensor([len(seq.prompt)], device=device)
        if not self.seqs:
            self.cache, self.mask, self.last, self.pos = cache, row_mask, last, pos
        else:
            self._merge(cache, row_mask)
            self.last = torch.cat([self.last, last])
            self.pos = torch.cat([self.pos, pos])
        self.seqs.append(seq)

    def _merge(self, cache, row_mask) -> None:
        import torch

        old, new = self.mask.shape[1], row_mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            # each side holds the last _kept(frame) positions of its own frame; after padding, of the common one
            keep = _kept(mine, width)
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([_left_pad(a, keep - a.shape[2]), _left_pad(b, keep - b.shape[2])]))
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = width
        pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], dim=1) if n > 0 else m  # noqa: E731
        self.mask = torch.cat([pad(self.mask, width - old), pad(row_mask, width - new)])

    def drop(self, keep: list[int]) -> None:
        """Keep only the rows `keep` (indices into `seqs`), then trim columns no remaining row uses."""
        import torch

        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = self.pos = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.mask, self.last, self.pos = self.mask[idx], self.last[idx], self.pos[idx]
        used = self.mask.any(0).nonzero()
        unused = int(used[0]) if len(used) else 0  # leading columns that are padding in every remaining row
        width = self.mask.shape[1] - unused
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:
            keys, values = layer.keys[idx], layer.values[idx]
            keep_n = _kept(layer, width)
            if keys.shape[2] > keep_n:
                keys, values = keys[:, :, -keep_n:], values[:, :, -keep_n:]
            layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = width

    def remove(self, seqs) -> None:
        gone = {id(s) for s in seqs}
        self.drop([i for i, s in enumerate(self.seqs) if id(s) not in gone])

    def step(self) -> list[Sequence]:
        """One decode step for every row; returns the sequences that finished (and left the batch). A row whose
        `on_token` raised is dropped and returned too, with the exception in `seq.error`."""
        import torch

        if not self.seqs:
            return []
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        with torch.inference_mode():
            logits, self.cache = self.engine._forward(self.last[:, None], self.mask, self.pos[:, None], self.cache)
            tokens = self._pick(logits, self.seqs)
        self.last = torch.tensor(tokens, device=self.last.device)
        self.pos = self.pos + 1
        done = []
        for seq, token in zip(self.seqs, tokens):
            try:
                self._emit(seq, token)
            except Exception as e:  # the request's own callback (a cancelled client): only that row ends
                seq.error, seq.finished = e, True
            if seq.finished:
                done.append(seq)
        if done:
            self.remove(done)
        return done


ROW_ATTENTION = "kotune_rows"


def _one_query(q, key, value, softcap):
    """Attention of one row's single query: `q` [kv heads, heads sharing each, d] in fp32, already scaled; `key`,
    `value` [kv heads, L, d] its own keys. fp32 throughout: the same arithmetic for a row alone or in a batch."""
    import torch

    scores = torch.matmul(q, key.float().transpose(1, 2))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.matmul(scores.softmax(-1), value.float()).reshape(-1, value.shape[-1])


def _spans(attention_mask, rows: int, width: int) -> list:
    """Each row's keys as (start, end) of the frame, or None where its unmasked keys are not one contiguous span."""
    import torch

    if attention_mask is None:
        return [(0, width)] * rows
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    valid = valid[:, 0, -1, :].expand(rows, -1)
    first = valid.int().argmax(1)
    end = width - valid.flip(1).int().argmax(1)
    count = valid.sum(1)
    return [(a, b) if b - a == n else None for a, b, n in zip(*torch.stack([first, end, count]).tolist())]


def _row_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """SDPA, except for a decode step (one query per row): there each row attends to its own contiguous span of keys,
    with no mask, through `_one_query`, exactly as it would alone. Attention over a left-padded frame is not
    bit-identical to attention over the row's keys alone (the kernel blocks the keys differently), and with bf16
    weights that is enough to change a greedy token now and then. The rows' products are a few hundred thousand
    multiply-adds each: on one thread they take about half the time they take on two (the second thread's wake-up
    costs more than it saves), so the loop runs on one."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout or any(kwargs.get(k) is not None for k in ("s_aux", "position_bias")):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    # grouped-query attention: the query heads that share a kv head, together
    q = (query[:, :, 0].float() * scale).reshape(rows, kv_heads, heads // kv_heads, dim)
    out = torch.empty(rows, heads, value.shape[-1], dtype=torch.float32, device=query.device)  # MLA: v ≠ q width
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, span in enumerate(_spans(attention_mask, rows, key.shape[2])):
            if span is None:  # not one span (no such mask is built here): the masked kernel for this row
                one, _ = sdpa_attention_forward(
                    module,
                    query[i : i + 1],
                    key[i : i + 1],
                    value[i : i + 1],
                    attention_mask[i : i + 1],
                    scaling=scaling,
                    softcap=softcap,
                    **kwargs,
                )
                out[i] = one[0, 0].float()
            else:
                out[i] = _one_query(q[i], key[i, :, span[0] : span[1]], value[i, :, span[0] : span[1]], softcap)
    finally:
        torch.set_num_threads(threads)
    return out[:, None].to(query.dtype), None  # [batch, query, heads, d], as the SDPA path returns


def use_row_attention(model) -> bool:
    """Switch an SDPA model to `_row_attention` (same results alone, bit-identical rows in a batch). Models on
    another attention implementation are left as they are; returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROW_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROW_ATTENTION)
    return True


def supports_batching(engine) -> bool:
    """Can this engine's model decode a running batch (torch engine, a dynamic cache)?"""
    import torch

    if not hasattr(engine, "_forward"):
        return False
    ids = torch.zeros(1, 2, dtype=torch.long, device=engine.device)
    with torch.inference_mode():
        _, cache = engine._forward(ids, torch.ones_like(ids), torch.arange(2, device=engine.device)[None], None)
    return _layers(cache) is not None
