"""Reading a config: YAML file + overrides (`--set section.key=value` and the seed's flags)
into a validated `KotuneConfig`, with every problem reported at once; plus the helpers the
entry points share (`cache_root`, column names, the generated reference in docs/config.md)."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .sections import SECTIONS, DataSection, KotuneConfig

PLACEHOLDERS = ("question", "answer", "context")  # what `data.template` fills in; prompt.split_template
# The seed's flags (`main_train_cpu.py` / `main_inference_cpu.py`) map onto dotted keys.
FLAG_KEYS = {
    "csv_path": "data.train_file",
    "output_dir": "model.output_dir",
    "max_steps": "training.max_steps",
    "batch_size": "data.batch_size",
    "epochs": "training.epochs",
    "learning_rate": "training.learning_rate",
    "model_name": "model.name",
    "max_length": "data.max_length",
    "dataset": "data.dataset_name",
    "task": "model.task",
}


SEED_MAPPING = {
    "model.task": "`causal-lm`, `text-classification`, `text2text`; seed spellings such as `Text2Text Generation` are "
    "read as these.",
    "model.cache_dir": "the same key: kotune's model cache (converted GGUF models live in `<cache_dir>/models`).",
    "data.dataset_name": "the same key (hub name, local data file or `save_to_disk` folder); it takes precedence over "
    "`data.train_file`.",
    "data.text_column": "input column: the text to classify; for `causal-lm`/`text2text` it replaces "
    "`data.question_column` when set.",
    "data.label_column": "target column: the label; for `causal-lm`/`text2text` it replaces `data.answer_column` when "
    "set.",
    "training.cuda_cleanup_freq": "empties the CUDA cache every N steps, like `memory.empty_cache_freq` (both are "
    "honoured).",
    "memory.mixed_precision": "`true` → `auto`, `false` → `no`.",
    "memory.optimize_memory_usage": "turns on `memory.gradient_checkpointing` and empties the CUDA cache at each epoch "
    "end.",
    "--dataset (flag)": "`data.dataset_name`",
    "--model_name, --max_length, --batch_size, --epochs (flags)": "`model.name`, `data.max_length`, `data.batch_size`, "
    "`training.epochs`",
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else f" Known keys: {', '.join(options)}."


def _known_keys(loc: tuple) -> list[str]:
    """Field names valid at the parent of `loc` (for 'did you mean' hints)."""
    model: type[BaseModel] = KotuneConfig
    for part in loc[:-1]:
        ann = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"`{key}`: unknown key.{_suggest(loc[-1], _known_keys(loc))}"
    if err["type"] == "missing":
        return f"`{key}`: required key is missing."
    value = err.get("input")
    return f"`{key}`: {err['msg']} (got {value!r})."


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        problems.append(f"override `{dotted}`: use `section.key=value`, e.g. `training.learning_rate=1e-4`.")
        return
    section, key = parts
    if section not in SECTIONS:
        problems.append(f"override `{dotted}`: unknown section `{section}`.{_suggest(section, list(SECTIONS))}")
        return
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        problems.append(f"override `{dotted}`: `{section}` in the file is not a mapping.")
        return
    node[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`training.learning_rate=1e-4` → ('training.learning_rate', 0.0001); values are YAML."""
    if "=" not in text:
        raise ConfigError([f"override `{text}`: expected `section.key=value`."])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:  # `Q: {question} A: {answer}` is no YAML, but plainly meant as text
        value = raw.strip()
    if isinstance(value, dict):  # `{question}…` and `Q: x` read as YAML mappings, and no key takes a mapping
        value = raw.strip()
    # YAML reads `1e-4` as a string (it wants `1.0e-4`); users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> KotuneConfig:
    """Read YAML (optional), apply `--set` overrides then seed-style flags, validate.

    Every problem — YAML, unknown keys, bad values, bad overrides — is gathered
    and raised together in one `ConfigError`.
    """
    source = str(path) if path else None
    problems: list[str] = []
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(["file not found. Check the path, or start from `configs/civil_law.yaml`."], source)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["top level must be a mapping of sections (model:, data:, …)."], source)
        tree = loaded
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        _set_dotted(tree, key, value, problems)
    for flag, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, FLAG_KEYS[flag], value, problems)
    try:
        config = KotuneConfig.model_validate(tree)
    except ValidationError as e:
        problems.extend(_describe(err) for err in e.errors())
        config = None
    if config is not None:
        problems.extend(_semantic_problems(config))
    if problems:
        raise ConfigError(problems, source)
    return config


def apply_overrides(section: BaseModel, name: str, overrides: dict[str, Any]) -> BaseModel:
    """`section` (the `name` section of a config) with `overrides` from command-line flags (None: not given),
    validated by the section's own model: a flag cannot set what the YAML file may not."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            flag = f" (--{key})" if key in given else ""
            msg = f"`{name}.{key}`{flag}: {err['msg']} (got {err.get('input')!r})."
            if key == "temperature" and given.get(key) == 0:
                msg += (
                    " Temperature 0 means no sampling: use --greedy for deterministic answers, or a temperature "
                    "above 0."
                )
            problems.append(msg)
        raise ConfigError(problems) from None


def _semantic_problems(cfg: KotuneConfig) -> list[str]:
    # `data.template` is not used with `format: chat`: its rules (and `{context}` for retrieval) do not apply there
    plain = cfg.data.format == "plain"
    return (_template_problems(cfg) if plain else []) + _chat_problems(cfg) + _other_problems(cfg)


def _template_problems(cfg: KotuneConfig) -> list[str]:
    out = []
    t = cfg.data.template
    if "{question}" not in t or "{answer}" not in t:
        out.append("`data.template`: must contain `{question}` and `{answer}`.")
    elif not t.rstrip().endswith("{answer}"):
        out.append(
            "`data.template`: `{answer}` must be the last thing in the template (EOS is appended right after it)."
        )
    unknown = sorted(set(re.findall(r"\{(\w+)\}", t)) - set(PLACEHOLDERS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], PLACEHOLDERS, n=1, cutoff=0.6)
        out.append(
            f"`data.template`: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; only "
            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} are filled in, anything else would stay as "
            "literal text in every sample." + (f" Did you mean `{{{close[0]}}}`?" if close else "")
        )
    if "\\n" in t:
        out.append(
            "`data.template` contains a literal backslash-n: in YAML write the template in double quotes "
            '("질문: {question}\\n답변: {answer}") or as a block, so `\\n` becomes a newline; on the command '
            "line: --set 'data.template=\"질문: {question}\\n답변: {answer}\"'."
        )
    if "</s>" in t or "<eos>" in t:
        out.append("`data.template`: remove the literal EOS string; kotune appends the tokenizer's real EOS id.")
    if cfg.retrieval.enabled and "{context}" not in t:
        out.append(
            "`data.template`: with `retrieval.enabled`, the template needs `{context}` before `{answer}`, e.g. "
            "`참고 조문:\\n{context}\\n질문: {question}\\n답변: {answer}`."
        )
    if not cfg.retrieval.enabled and "{context}" in t:
        out.append("`data.template` uses `{context}`: set `retrieval.enabled: true` (or remove `{context}`).")
    return out


def _chat_problems(cfg: KotuneConfig) -> list[str]:
    """`data.format: chat` and the two options that only it uses."""
    d, task, out = cfg.data, cfg.model.task, []
    if d.format == "chat" and task != "causal-lm":
        out.append(
            f"`data.format: chat` works with `model.task: causal-lm` only (task is `{task}`): a chat template "
            "renders a conversation for a decoder to continue. Use `data.format: plain` for this task."
        )
    for key in ("system_prompt", "chat_template"):
        value = getattr(d, key)
        if value is None:
            continue
        if d.format != "chat":
            out.append(
                f"`data.{key}` is used only with `data.format: chat` (the plain `data.template` has no system "
                f"message or chat template): set `data.format: chat`, or unset `data.{key}`."
            )
        elif not value.strip():
            out.append(f"`data.{key}` is empty: unset it instead.")
    # A `chat_template` path is read when training starts (`chat_template_text`), not here: the run folder's saved
    # config must load from anywhere, and its tokenizer already holds the template.
    return out


def chat_template_text(value: str) -> str:
    """The Jinja text `data.chat_template` stands for: the value itself when it holds Jinja (`{{` or `{%`), else
    the contents of the file it names (a path relative to the working directory, like `data.train_file`).
    Raises `ConfigError` naming the option when the file is missing or holds no template."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value.strip()).expanduser()
    if not path.is_file():
        raise ConfigError(
            [
                f"`data.chat_template`: `{value.strip()}` is not a Jinja template (it has no `{{{{` or `{{%`) and no "
                "such file exists. Give the template itself, or the path of a `.jinja`/`.txt` file holding one."
            ]
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"`data.chat_template`: cannot read {path} as UTF-8 text ({e})."]) from None
    if "{{" not in text and "{%" not in text:
        raise ConfigError(
            [
                f"`data.chat_template`: {path} holds no Jinja template (no `{{{{` or `{{%` in it); give a chat "
                "template file such as a model's `chat_template.jinja`."
            ]
        )
    return text


def _other_problems(cfg: KotuneConfig) -> list[str]:
    out = []
    if cfg.generation.context_contrast and not cfg.retrieval.enabled:
        out.append(
            "`generation.context_contrast` contrasts the prompt with and without its retrieved articles: it needs "
            "`retrieval.enabled: true` (or set it to 0)."
        )
    if cfg.generation.context_contrast and cfg.generation.backend != "torch":
        out.append(
            "`generation.context_contrast` needs `generation.backend: torch` (llama.cpp runs one prompt per answer); "
            "set it to 0 to use llama.cpp."
        )
    task = cfg.model.task
    if task != "causal-lm" and cfg.retrieval.enabled:
        out.append(f"`retrieval.enabled` works with `model.task: causal-lm` only (task is `{task}`).")
    if cfg.training.early_stopping_metric in ("accuracy", "macro_f1") and task != "text-classification":
        out.append(
            f"`training.early_stopping_metric: {cfg.training.early_stopping_metric}` needs `model.task: "
            f"text-classification`; use `eval_loss` for `{task}`."
        )
    if cfg.training.early_stopping_metric and cfg.data.eval_ratio == 0 and not cfg.data.eval_file:
        out.append(
            "`training.early_stopping_metric` needs evaluation data: set `data.eval_ratio` > 0 or `data.eval_file`."
        )
    if cfg.model.quantization != "none" and not cfg.lora.enabled:
        out.append(
            f"`model.quantization: {cfg.model.quantization}` freezes the base in low precision; it needs "
            "`lora.enabled: true` (QLoRA). For a full fine-tune set `model.quantization: none`."
        )
    return out


def input_column(d: DataSection, task: str) -> str:
    """The column read as the model input: the one mapping between the seed's names and kotune's."""
    if task == "text-classification":
        return d.text_column or "text"
    return d.text_column or d.question_column


def target_column(d: DataSection, task: str) -> str:
    if task == "text-classification":
        return d.label_column or "label"
    return d.label_column or d.answer_column


def cache_root(cfg_cache_dir: str | None = None) -> Path:
    if cfg_cache_dir:
        return Path(cfg_cache_dir).expanduser()
    env = os.environ.get("KOTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kotune"


def config_reference() -> str:
    """Markdown reference of every key, generated from the field definitions."""
    lines = [
        "# Config reference",
        "",
        "Generated from `src/kotune/config/sections.py` (`kotune config --reference`).",
        "",
    ]
    for section, model in SECTIONS.items():
        lines += [f"## `{section}`", "", "| key | default | meaning |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            shown = (
                yaml.safe_dump(default, allow_unicode=True, default_flow_style=True).strip().removesuffix("...").strip()
            )
            shown = shown.replace("\n", " ").replace("|", "\\|")
            if len(shown) > 60:
                shown = shown[:57] + "…"
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | `{shown}` | {desc} |")
        lines.append("")
    lines += [
        "## Seed `config.yaml` keys",
        "",
        "A config in the seed tool's layout works as is: every seed key is a field above. Where the seed "
        "and kotune name the same thing twice, this is the one mapping:",
        "",
        "| seed key | kotune |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in SEED_MAPPING.items()]
    lines.append("")
    return "\n".join(lines)
