"""Conversations through the tokenizer's own chat template (`data.format: chat`).

Training renders a whole conversation with `apply_chat_template` and trains only the assistant turns: each turn's
content and the end-of-turn token the template closes it with (what generation must learn to emit). Everything
else — system and user turns, and the header the template opens an assistant turn with — is masked. The masks
come from rendering prefixes: the prompt of assistant turn k is the conversation before it with the generation
prompt, which must be a token prefix of the whole rendering, so answering (which feeds exactly that prompt) sees
the tokens training saw. Retrieved context goes into the last user turn as `{context}\\n\\n{question}`, in
training (`encode_chat`) and answering (`chat_prompt_ids`) alike. No torch import here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config.load import chat_template_text
from .data import chat_turns
from .errors import TemplateError
from .prompt import IGNORE, Encoded, trained_spans

# Where retrieved context goes: the last user turn, before the question (training and answering alike).
CONTEXT_LAYOUT = "{context}\n\n{question}"
_MARK_Q, _MARK_A = "kotune-question", "kotune-answer"


def user_text(question: str, context: str = "") -> str:
    """The last user turn's content: the question, after the retrieved context when there is one."""
    return CONTEXT_LAYOUT.format(context=context, question=question) if context else question


def require_chat_template(tokenizer, model: str | None = None) -> None:
    """Raise the error that says how to give a chat template when the tokenizer has none."""
    if tokenizer.chat_template:
        return
    name = model or getattr(tokenizer, "name_or_path", "") or "this model"
    raise TemplateError(
        f"`data.format: chat` needs a chat template, and the tokenizer of {name} has none: set `data.chat_template` "
        "to a Jinja template (or a file holding one), or use `data.format: plain`."
    )


def use_chat_template(tokenizer, chat_template: str | None, model: str | None = None) -> None:
    """Give `tokenizer` the config's `data.chat_template` (Jinja text or a file), if set, and require that it then has
    a template: what training and `kotune validate` render conversations with."""
    if chat_template:
        tokenizer.chat_template = chat_template_text(chat_template)
    require_chat_template(tokenizer, model)


def _render(tokenizer, messages: list[dict], generation_prompt: bool, source: str = "", chat_template=None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=generation_prompt, tokenize=False
        )
    except Exception as e:  # the template's own raise_exception, a Jinja syntax error, an unexpected message shape
        where = f"{source}: " if source else ""
        raise TemplateError(
            f"{where}the chat template cannot render this conversation ({type(e).__name__}: {e}). Fix the data, or "
            "give a template that accepts it in `data.chat_template`."
        ) from None


def _ids(tokenizer, text: str) -> list[int]:
    # The template writes every special token it wants (BOS included), as `apply_chat_template(tokenize=True)` does.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation(messages: Sequence[dict], system: str | None = None, context: str = "") -> list[dict]:
    """The messages as rendered: `system` first unless the data has its own system message, and `context` in the
    last user turn."""
    conv = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system and (not conv or conv[0]["role"] != "system"):
        conv.insert(0, {"role": "system", "content": system})
    if context:
        last = max(i for i, m in enumerate(conv) if m["role"] == "user")
        conv[last]["content"] = user_text(conv[last]["content"], context)
    return conv


def chat_stop_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """Ids generation may stop on: the tokenizer's EOS, and the end-of-turn token the template closes an assistant
    turn with (the first special or added token after the assistant's content in a rendered dummy conversation,
    e.g. `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`). `chat_template`: a template to use instead of the
    tokenizer's own."""
    if chat_template is None:
        require_chat_template(tokenizer)
    dummy = [{"role": "user", "content": _MARK_Q}, {"role": "assistant", "content": _MARK_A}]
    text = _render(tokenizer, dummy, False, chat_template=chat_template)
    at = text.rfind(_MARK_A)
    tail = _ids(tokenizer, text[at + len(_MARK_A) :]) if at >= 0 else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    end = next((i for i in tail if i in special), None)
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return out + [end] if end is not None and end not in out else out


def _names(tokenizer, ids: Sequence[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))!r}" for i in ids)


def _prefix_len(tokenizer, part: str, whole: str, whole_ids: list[int], what: str, source: str) -> int:
    """Tokens of `part`, checked to be a token prefix of the whole rendering."""
    if not whole.startswith(part):
        i = next((n for n, (a, b) in enumerate(zip(part, whole)) if a != b), min(len(part), len(whole)))
        raise TemplateError(
            f"{source}: the chat template renders {what} differently than inside the whole conversation: at character "
            f"{i} it writes {part[max(0, i - 30) : i + 30]!r} where the whole conversation has "
            f"{whole[max(0, i - 30) : i + 30]!r}. Training would then not see what answering feeds the model; give a "
            "template that renders earlier turns the same whatever follows them (`data.chat_template`)."
        )
    ids = _ids(tokenizer, part)
    if whole_ids[: len(ids)] != ids:
        j = next((n for n, (a, b) in enumerate(zip(ids, whole_ids)) if a != b), min(len(ids), len(whole_ids)))
        raise TemplateError(
            f"{source}: {what} tokenises differently alone than inside the whole conversation (from token {j}: alone "
            f"{tokenizer.convert_ids_to_tokens(ids[j : j + 3])}, in context "
            f"{tokenizer.convert_ids_to_tokens(whole_ids[j : j + 3])}). The template's assistant header must end "
            "with a separator (a newline or a special token), so the answer starts a new token."
        )
    return len(ids)


def encode_chat(
    tokenizer,
    messages: Sequence[dict],
    system: str | None = None,
    source: str = "",
    context: str = "",
    *,
    stop_ids: Sequence[int] | None = None,
) -> Encoded:
    """One conversation rendered by the tokenizer's chat template, with labels on the assistant turns only (their
    content and the end-of-turn token that closes each; the newline a template may write after it stays masked).
    `system`: put first unless the messages have their own system message. `context`: retrieved text put into the
    last user turn as `{context}\\n\\n{question}`, as `chat_prompt_ids` does. `stop_ids`: `chat_stop_ids(tokenizer)`,
    computed when not given."""
    require_chat_template(tokenizer)
    turns, problems = chat_turns(list(messages), source or "conversation")
    if turns is None:
        raise TemplateError(" ".join(problems))
    stops = set(chat_stop_ids(tokenizer) if stop_ids is None else stop_ids)
    conv = conversation(turns, system, context)
    whole = _render(tokenizer, conv, False, source)
    ids = _ids(tokenizer, whole)
    labels = [IGNORE] * len(ids)
    turn = 0
    for k, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        turn += 1
        before = f"messages 1–{k}" if k > 1 else "message 1"
        head = f"the prompt of assistant turn {turn} ({before} with the generation prompt)"
        start = _prefix_len(tokenizer, _render(tokenizer, conv[:k], True, source), whole, ids, head, source)
        upto = f"the conversation up to the end of assistant turn {turn}"
        end = _prefix_len(tokenizer, _render(tokenizer, conv[: k + 1], False, source), whole, ids, upto, source)
        last = max((i for i in range(start, end) if ids[i] in stops), default=None)
        if last is None:
            raise TemplateError(
                f"{source}: assistant turn {turn} does not end with an end token ({_names(tokenizer, sorted(stops))}) "
                "in the chat template's rendering, so generation would never learn to stop. Give a template that "
                "closes each assistant turn with EOS or an end-of-turn token (`data.chat_template`)."
            )
        labels[start : last + 1] = ids[start : last + 1]
    return Encoded(ids, labels, source)


def check_chat_encoded(enc: Encoded, stop_ids: Sequence[int], pad_id: int | None, tokenizer=None) -> None:
    """The chat analogue of `prompt.check_encoded`: every trained span (one per assistant turn) ends with a trained
    end token generation can stop on, and padding is not one of them."""
    stops = set(stop_ids)
    names = _names(tokenizer, sorted(stops)) if tokenizer is not None else ", ".join(map(str, sorted(stops)))
    if pad_id in stops:
        raise TemplateError(
            f"pad token id {pad_id} is an end token ({names}): padding would be indistinguishable from the end of an "
            "answer."
        )
    spans = trained_spans(enc.labels)
    if enc.n_trained < 2:
        raise TemplateError(f"{enc.source}: no answer tokens are trained.")
    for n, (_, end) in enumerate(spans, start=1):
        if enc.labels[end - 1] not in stops:
            raise TemplateError(
                f"{enc.source}: assistant turn {n} does not end with a trained end token ({names}); generation would "
                "not learn to stop."
            )


def chat_prompt_ids(
    tokenizer,
    question: str,
    context: str = "",
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
) -> list[int]:
    """Ids to feed for answering `question` in the chat format: `system` (if any), the earlier (user, assistant)
    turns of `history`, then the question — after the retrieved `context` when there is one, laid out as in
    training — and the template's generation prompt (the assistant header)."""
    require_chat_template(tokenizer)
    conv = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        conv += [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": assistant.strip()}]
    conv.append({"role": "user", "content": user_text(question.strip(), context)})
    return _ids(tokenizer, _render(tokenizer, conv, True))


def encode_all_chat(
    tokenizer,
    examples,
    max_length: int,
    too_long: str = "drop",
    contexts: list[str] | None = None,
    system: str | None = None,
):
    """`prompt.encode_all` for `data.format: chat`: every example's conversation (`Example.messages`, or its
    question and answer as one user and one assistant turn) with its retrieved `contexts`, if any.
    Returns (kept, too_long_messages, template_errors, all_lengths)."""
    stops = chat_stop_ids(tokenizer)
    kept, long_rows, errors, lengths = [], [], [], []
    for i, ex in enumerate(examples):
        messages = ex.messages or [
            {"role": "user", "content": ex.question},
            {"role": "assistant", "content": ex.answer},
        ]
        try:
            enc = encode_chat(tokenizer, messages, system, ex.source, contexts[i] if contexts else "", stop_ids=stops)
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
