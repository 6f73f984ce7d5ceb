"""Render question/answer rows through the template and tokenise them with labels.

Only answer tokens and the EOS id are trained. The prompt is tokenised alone
and must be a prefix of the tokenised full text, so inference (which feeds
the prompt alone) sees exactly the tokens training saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TemplateError

IGNORE = -100


def split_template(template: str, question: str, answer: str = "", context: str = "") -> tuple[str, str]:
    """Return (prompt, answer_text). Whitespace before `{answer}` moves to the answer
    side: a prompt ending in a space tokenises differently alone than in context."""
    head = template.split("{answer}")[0].replace("{context}", context).replace("{question}", question)
    prompt = head.rstrip()
    return prompt, head[len(prompt) :] + answer


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    # Some tokenizers are configured to append EOS to every text; a prompt must not end the sequence.
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def encode_example(
    tokenizer, template: str, question: str, answer: str, eos_id: int, source: str = "", context: str = ""
) -> Encoded:
    prompt, answer_text = split_template(template, question, answer, context)
    p_ids = encode_prompt(tokenizer, prompt)
    full = encode_prompt(tokenizer, prompt + answer_text)
    if full[: len(p_ids)] != p_ids:
        raise TemplateError(
            f"{source}: the prompt tokenises differently alone than followed by the answer "
            f"(alone ends {tokenizer.convert_ids_to_tokens(p_ids[-3:])}, in context "
            f"{tokenizer.convert_ids_to_tokens(full[len(p_ids) - 3 : len(p_ids) + 1])}). "
            "End the prompt part of `data.template` with a separator such as `:` or a newline."
        )
    ids = full + [eos_id]
    labels = [IGNORE] * len(p_ids) + full[len(p_ids) :] + [eos_id]
    return Encoded(ids, labels, source)


def check_encoded(enc: Encoded, eos_id: int, pad_id: int) -> None:
    """Refuse the two defects of the seed: EOS not trained, and pad == eos."""
    if pad_id == eos_id:
        raise TemplateError("pad token id equals EOS id: padding would be indistinguishable from the end of an answer.")
    if enc.labels[-1] != eos_id or enc.input_ids[-1] != eos_id:
        raise TemplateError(f"{enc.source}: the sample does not end with a trained EOS token.")
    if enc.n_trained < 2:
        raise TemplateError(f"{enc.source}: no answer tokens are trained.")


def token_pieces(tokenizer, ids: list[int], trained: list[bool]) -> list[tuple[str, bool]]:
    """Each token's text as the user reads it, not its vocabulary entry: byte-level BPE (GPT-2, KoGPT2) spells a
    Korean syllable as `ìłĦ`-like glyphs and often splits it over two or three tokens. Tokens that only together
    make a character are joined into one piece (never across the prompt/answer boundary)."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    for i in range(len(ids)):
        boundary = i + 1 == len(ids) or trained[i + 1] != trained[i]
        text = tokenizer.decode(ids[start : i + 1])
        if text.endswith("\ufffd") and not boundary:  # an unfinished UTF-8 character: wait for its next byte
            continue
        pieces.append((text, trained[i]))
        start = i + 1
    return pieces


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained labels: one per answer (per assistant turn in a chat sample)."""
    spans: list[tuple[int, int]] = []
    for i, lab in enumerate(labels):
        if lab == IGNORE:
            continue
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def render_sample(tokenizer, enc: Encoded) -> str:
    """Human-readable view: prompt tokens in [ ], trained tokens inside ⟦ ⟧. A sample with several trained spans
    (a multi-turn chat sample: one per assistant turn) also gets a line with all tokens in their order."""
    marks = [lab != IGNORE for lab in enc.labels]
    pieces = [(t.replace("\n", "\\n"), tr) for t, tr in token_pieces(tokenizer, enc.input_ids, marks)]
    prompt = "".join(f"[{p}]" for p, tr in pieces if not tr)
    trained = "".join(f"⟦{p}⟧" for p, tr in pieces if tr)
    joined = (
        " (tokens that only together make one character are shown as one piece)" if len(pieces) < len(marks) else ""
    )
    spans = trained_spans(enc.labels)
    last = enc.labels[spans[-1][1] - 1] if spans else IGNORE
    if last == tokenizer.eos_token_id:
        ends = f"last is EOS id {last}"
    else:
        ends = f"last is id {last} {tokenizer.convert_ids_to_tokens(last)!r}" if spans else "none"
    text = (
        f"source: {enc.source}\n"
        f"text: {tokenizer.decode(enc.input_ids)!r}\n"
        f"prompt tokens (not trained, {len(enc.labels) - enc.n_trained}): {prompt}\n"
        f"trained tokens ({enc.n_trained}, {ends}): {trained}{joined}"
    )
    if len(spans) > 1:
        ordered = "".join(f"⟦{p}⟧" if tr else f"[{p}]" for p, tr in pieces)
        text += f"\nin order ({len(spans)} trained spans, one per assistant turn): {ordered}"
    return text


def length_stats(lengths: list[int], max_length: int) -> dict:
    if not lengths:
        return {"rows": 0}
    s = sorted(lengths)

    def pct(q: float) -> int:
        return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]

    return {
        "rows": len(s),
        "tokens_total": sum(s),
        "p50": pct(50),
        "p90": pct(90),
        "p95": pct(95),
        "p99": pct(99),
        "max": s[-1],
        "over_max_length": sum(1 for x in s if x > max_length),
    }


def collate(batch: list[Encoded], pad_id: int):
    """Right-pad to the longest row; padding is masked in attention and labels."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_all(
    tokenizer, examples, template: str, max_length: int, too_long: str = "drop", contexts: list[str] | None = None
):
    """Encode every example (with its retrieved `contexts`, if any).
    Returns (kept, too_long_messages, template_errors, all_lengths)."""
    eos = tokenizer.eos_token_id
    kept, long_rows, errors, lengths = [], [], [], []
    for i, ex in enumerate(examples):
        try:
            enc = encode_example(
                tokenizer, template, ex.question, ex.answer, eos, ex.source, contexts[i] if contexts else ""
            )
        except TemplateError as e:
            errors.append(str(e))
            continue
        lengths.append(len(enc.input_ids))
        if len(enc.input_ids) > max_length:
            long_rows.append(f"{ex.source}: {len(enc.input_ids)} tokens > max_length {max_length}")
            if too_long == "drop":
                continue
        kept.append(enc)
    return kept, long_rows, errors, lengths
