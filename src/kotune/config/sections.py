"""Typed run configuration: the YAML file is the saved form of `KotuneConfig`.

Section and key names follow the seed tool's `config.yaml` (model / data /
training / memory / logging) so its users find what they know; kotune adds
`lora` and `generation`. Every field is documented where it is defined; the
same descriptions feed `docs/config.md` (see `config_reference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TEMPLATE = "질문: {question}\n답변: {answer}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(
        "gemma3-270m",
        description="Base model: a preset name (`gemma3-270m`, `kogpt2`), a Hugging Face hub id "
        "(e.g. `skt/kogpt2-base-v2`, used when the hub is reachable or the model is cached), "
        "a local folder in HF format, or a `.gguf` file.",
    )
    task: Literal["causal-lm", "text-classification", "text2text"] = Field(
        "causal-lm",
        description="What is trained. `causal-lm`: a decoder learns question → answer (loss on the answer and EOS). "
        "`text-classification`: text → label with a classification head (accuracy and macro-F1 each evaluation). "
        "`text2text`: an encoder-decoder (T5, BART) learns input → target. The seed's spellings "
        "(`Text2Text Generation`, `sequence-classification`, `text-generation`) are accepted.",
    )
    output_dir: str = Field(
        "runs/default", description="Run folder: config, adapter, tokenizer, metrics, logs and checkpoints go here."
    )
    cache_dir: str | None = Field(
        None,
        description="Where converted models (GGUF → safetensors) are cached. Default: `$KOTUNE_CACHE` or "
        "`~/.cache/kotune`.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repository. Off: turn on only for repositories you trust."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the frozen base weights are loaded in. LoRA weights are always float32."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="Load the frozen base weights in 8-bit or 4-bit (NF4, QLoRA) through bitsandbytes. "
        "Needs a CUDA GPU and the extra `kotune[quantization]`; needs LoRA (`lora.enabled`).",
    )

    @field_validator("task", mode="before")
    @classmethod
    def _seed_task_names(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        key = v.strip().lower().replace(" ", "-").replace("_", "-")
        return TASK_ALIASES.get(key, key)


class DataSection(_Section):
    train_file: str | None = Field(
        None,
        description="Training data: a CSV (`question,answer[,category,difficulty]`), a JSONL file "
        "(`question/answer`, alpaca `instruction/input/output`, or chat `messages`: each user → assistant pair a row "
        "with `format: plain`, the whole conversation one row with `format: chat`), or a `save_to_disk` folder.",
    )
    eval_file: str | None = Field(
        None,
        description="Optional separate evaluation file (same formats). When unset, `eval_ratio` of the training rows "
        "are held out.",
    )
    dataset_name: str | None = Field(
        None,
        description="A Hugging Face dataset instead of `train_file`: hub name (when reachable), local data file, or "
        "`save_to_disk` folder.",
    )
    dataset_split: str = Field("train", description="Split of `dataset_name` to train on.")
    dataset_cache_dir: str | None = Field(None, description="Cache folder for `dataset_name` downloads.")
    encoding: str | None = Field(
        None, description="Text encoding of CSV/JSONL files. Unset: detect utf-8, utf-8 with BOM, cp949/euc-kr."
    )
    question_column: str = Field("question", description="Column holding the question (CSV, JSONL, HF datasets).")
    answer_column: str = Field("answer", description="Column holding the answer.")
    text_column: str | None = Field(
        None,
        description="Input column (seed name). `text-classification`: the text to classify (unset: `text`). "
        "`causal-lm`/`text2text`: when set, used instead of `question_column`.",
    )
    label_column: str | None = Field(
        None,
        description="Target column (seed name). `text-classification`: the label (unset: `label`); label names are "
        "sorted and saved as `labels.json` in the run folder. `causal-lm`/`text2text`: when set, used instead of "
        "`answer_column`.",
    )
    format: Literal["plain", "chat"] = Field(
        "plain",
        description="How a row becomes text. `plain`: through `data.template`. `chat`: through the tokenizer's own "
        "chat template (`apply_chat_template`), in training and in answering, as instruction models (Qwen2.5-Instruct, "
        "EXAONE, Gemma-it, Llama-3-Instruct) expect; chat `messages` keep all their turns and every assistant turn is "
        "trained. `causal-lm` only. See docs/chat_templates.md.",
    )
    system_prompt: str | None = Field(
        None,
        description="`format: chat` only: a system message put first in every conversation, in training and in "
        "answering. A system message inside a data record replaces it for that record. Unset: none.",
    )
    chat_template: str | None = Field(
        None,
        description="`format: chat` only: a Jinja chat template, or the path of a `.jinja`/`.txt` file holding one, "
        "used instead of the tokenizer's own (needed when the tokenizer has none). The run folder's tokenizer is saved "
        "with it, so answering uses the same template. Unset: the tokenizer's template.",
    )
    template: str = Field(
        DEFAULT_TEMPLATE,
        description="Prompt template with `{question}` and `{answer}`; `{answer}` must come last. "
        "The tokenizer's EOS id is appended after the answer; never write `</s>` into the template. "
        "Not used with `format: chat`.",
    )
    max_length: int = Field(
        256,
        ge=16,
        description="Longest training sample in tokens: prompt + answer + EOS (`causal-lm`), the text "
        "(`text-classification`), the input and the target each (`text2text`).",
    )
    too_long: Literal["drop", "error"] = Field(
        "drop",
        description="Rows longer than `max_length`: `drop` (counted and listed in the log) or `error`. They are never "
        "truncated, which would cut off EOS.",
    )
    duplicates: Literal["drop", "keep", "error"] = Field(
        "drop", description="Rows whose question and answer repeat an earlier row."
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="Rows with an empty question/answer or broken JSON: `error` stops with the list; `skip` drops them "
        "with a count in the log.",
    )
    eval_ratio: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of rows held out for evaluation when `eval_file` is unset (0 disables evaluation).",
    )
    batch_size: int = Field(4, ge=1, description="Micro-batch size per optimizer micro-step.")
    group_by_length: bool = Field(
        True, description="Batch rows of similar length together so little compute is spent on padding."
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=16,
        description="Split a micro-batch whose padded size (rows × longest row) is over this many tokens "
        "into smaller ones run one after the other. The step's gradient is the same (the loss is normalised by the "
        "step's trained tokens); only the peak memory of the longest batches falls. Single-process training only "
        "(distributed processes must run the same micro-batches). Unset: no split.",
    )


class LoraSection(_Section):
    enabled: bool = Field(
        True,
        description="Train LoRA adapters on a frozen base. `false`: full fine-tune (every weight trained; the run "
        "folder holds the whole model in `model/` instead of `adapter/`).",
    )
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input. Above 0, PEFT keeps a dropped copy of each "
        "adapted module's input for the backward pass: on the grounded recipe 0.05 took 30 % more peak memory and "
        "23 % more time than 0 (docs/benchmarks.md).",
    )
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt. Unset: the model preset's choice (e.g. `c_attn`,`c_proj` for GPT-2/KoGPT2; "
        "attention and MLP projections for Gemma/Llama).",
    )
    last_layers: int | None = Field(
        None,
        ge=1,
        description="Adapt only the last N transformer layers (unset: all). No layer below them needs a "
        "gradient, so the backward pass stops at the lowest adapted one (turn off `memory.gradient_checkpointing`, "
        "which makes every layer's input carry a gradient). Measurements: docs/benchmarks.md.",
    )
    fan_in_fan_out: bool | None = Field(
        None, description="Set for GPT-2 style Conv1D layers. Unset: detected from the architecture."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")


class TrainingSection(_Section):
    epochs: float = Field(3, gt=0, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on LoRA weights.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Warm-up as a share of all steps, used when `warmup_steps` is 0."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm (unset: no clipping).")
    seed: int = Field(42, description="Seed for the eval split, data order, LoRA init and dropout.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps. Unset: at the end of each epoch and of training."
    )
    save_steps: int = Field(50, ge=1, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    logging_steps: int = Field(5, ge=1, description="Log loss and speed every N optimizer steps.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch. Unset: one per physical core.")
    cuda_cleanup_freq: int | None = Field(
        None,
        ge=1,
        description="Seed name: empty the CUDA cache every N optimizer steps, the same action as "
        "`memory.empty_cache_freq`; when both are set the cache is emptied at multiples of either.",
    )
    early_stopping_metric: Literal["eval_loss", "accuracy", "macro_f1"] | None = Field(
        None,
        description="Stop when this evaluation metric has not improved for `early_stopping_patience` evaluations, "
        "and keep the best weights (`accuracy`/`macro_f1`: text-classification only). Unset: no early stopping.",
    )
    early_stopping_patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")


class MemorySection(_Section):
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step; the loss is averaged over all answer tokens of the whole step.",
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype. `auto`: bf16 on a CUDA GPU that supports it or a CPU with native bf16 (AVX-512 "
        "BF16 / AMX), else none. `true`/`false` are accepted as `auto`/`no`.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, more time (measured on the "
        "civil-law recipe in docs/benchmarks.md).",
    )
    optimize_memory_usage: bool = Field(
        False,
        description="Seed switch: turns on `gradient_checkpointing` and empties the CUDA cache at each epoch end.",
    )
    max_gpu_memory_usage: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cap this process's CUDA memory at this share of the GPU "
        "(`torch.cuda.set_per_process_memory_fraction`); going past it raises out-of-memory instead of taking more. "
        "Unset: no cap. Ignored on CPU.",
    )
    empty_cache_freq: int | None = Field(
        None,
        ge=1,
        description="Empty the CUDA cache every N optimizer steps (gives cached blocks back to the driver; "
        "only useful when other processes share the GPU). Unset: never. Ignored on CPU.",
    )
    report_steps: int = Field(
        50,
        ge=1,
        description="Log a memory line (GPU allocated/reserved/peak, process RSS) every N optimizer steps "
        "and at each epoch end.",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bool_precision(cls, v: Any) -> Any:
        if v is True:
            return "auto"
        if v is False:
            return "no"
        return v


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level for the console and the run's log file."
    )
    format: str = Field(
        "%(asctime)s - %(levelname)s - %(message)s", description="Python logging format of the log file."
    )
    tensorboard: bool = Field(
        False, description="Also write TensorBoard events to `<output_dir>/tensorboard` (extra `kotune[tensorboard]`)."
    )
    progress_bar: bool = Field(True, description="Show a progress bar with loss, tokens/s and ETA.")


class GenerationSection(_Section):
    max_new_tokens: int = Field(256, ge=1, description="Longest answer in tokens; generation stops earlier at EOS.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature (ignored when `greedy`).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(50, ge=0, description="Sample among the k most likely tokens (0: no limit).")
    repetition_penalty: float = Field(1.1, ge=1.0, description="Penalty on repeating tokens (1.0: none).")
    greedy: bool = Field(False, description="Always pick the most likely token (deterministic).")
    repeat_guard: int = Field(
        6,
        ge=0,
        description="Loop guard: a run of this many generated tokens may occur at most twice in an answer (the prompt "
        "and citation lists do not count), which stops the loops small models fall into before EOS. 0: off.",
    )
    context_contrast: float = Field(
        0.0,
        ge=0,
        le=5,
        description="Context-aware decoding weight w (grounded runs): each token is scored (1+w)·log p(token | "
        "articles, question) − w·log p(token | question), favouring what the retrieved articles make "
        "likely over what the model would say without them. Runs a second prompt without the articles "
        "beside each answer (torch engine only; more compute per token). 0: off.",
    )
    max_question_chars: int = Field(
        2000,
        ge=1,
        description="Longest question answered, in characters (chat, ask, eval, serve); a longer one gets a clear "
        "error instead of a prompt far longer than any the model was trained on.",
    )
    notice: str | None = Field(
        None,
        description="A line shown by `kotune chat` before answers (e.g. that answers are general information, not "
        "legal advice).",
    )
    quick_test_questions: list[str] = Field(
        default_factory=list, description="Questions asked by `kotune chat --quick_test` (the recipe's own set)."
    )
    history_tokens: int = Field(
        256,
        ge=0,
        description="Tokens of the conversation's earlier turns (question and answer, newest first) put before the "
        "question in `chat` and `serve`; turns that do not fit are left out. 0: every message is answered alone.",
    )
    chat_banner: str | None = Field(
        None,
        description="The line `kotune chat` opens its interactive session with (what the chatbot is for). Unset: the "
        "run folder's name.",
    )
    backend: Literal["torch", "llamacpp"] = Field(
        "torch",
        description="Inference engine for chat/ask/eval. `torch`: the adapter merged into the base, a lean KV-cache "
        "decode loop. "
        "`llamacpp`: the merged model exported to GGUF (`kotune export`, done on first use) and run by llama.cpp "
        "(extra `kotune[llamacpp]`).",
    )
    precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto",
        description="Weights of the `torch` engine. `auto`: bf16 on a CPU with native bf16 (AVX-512 BF16 / AMX) or a "
        "bf16 GPU, else fp32 "
        "(with bf16 on CPU the LM head is a fast dynamic-int8 product, then each row's 1024 most likely logits "
        "recomputed exactly from the bf16 weights, so a request decodes the same alone or batched). "
        "`int8`: dynamic int8 on CPU (fastest, but it changes many greedy tokens; see docs/benchmarks.md).",
    )
    gguf_file: str | None = Field(
        None,
        description="GGUF model for the `llamacpp` engine. Unset: `<run>/model-q8_0.gguf`, exported from the run when "
        "missing.",
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for generation. Unset: one per available core."
    )


class RetrievalSection(_Section):
    enabled: bool = Field(
        False,
        description="Ground answers in statute articles: the top-k retrieved articles fill `{context}` in "
        "`data.template`, in training and at inference (extra `kotune[retrieval]`).",
    )
    kb_dir: str | None = Field(
        None,
        description="Statute knowledge-base folder (`*.jsonl`). Unset: the KB shipped with kotune "
        "(`src/kotune/legal/kb`, installed as package data). Training copies it into the run folder.",
    )
    method: Literal["bm25", "dense", "examples", "hybrid"] = Field(
        "hybrid",
        description="Retriever: BM25 over Kiwi morphemes, multilingual-e5-small vectors, the example questions most "
        "like the user's voting for the articles they cite plus two article classifiers (e5 vectors, "
        "morphemes) trained on them (`examples`), or all of them fused by reciprocal rank (`hybrid`).",
    )
    example_questions: bool = Field(
        True,
        description="Use the training questions as retrieval hints: the articles cited by the most similar training "
        "questions rank higher. The run folder keeps them (`retrieval_examples.jsonl`).",
    )
    extra_examples: list[str] = Field(
        default_factory=list,
        description="More example questions for retrieval, beside the training questions: files of "
        '`{"question", "citations": ["민법 제281조"]}` lines (or Q&A files kotune reads), e.g. '
        "`data/civil_law_questions.jsonl`. They only guide retrieval (the model is not trained on them) "
        "and are kept in the run's `retrieval_examples.jsonl`; every article they cite must be in the KB.",
    )
    follow_up: Literal["off", "joined", "fused"] = Field(
        "fused",
        description="How a conversation's earlier questions take part in retrieval and the scope check of a new one. "
        "`off`: the new question alone. `joined`: the previous question and the new one searched as one text. "
        "`fused`: the rankings of the new question alone and of the joined text, fused by reciprocal rank "
        "(docs/evaluation.md#follow-up-questions).",
    )
    k: int = Field(
        3,
        ge=1,
        description="Articles put into the prompt, in retrieval order. In training, a row's cited (gold) article "
        "replaces the last distractor when retrieval misses it, and the row's own question is left out of "
        "the example votes.",
    )
    answer_k: int | None = Field(
        None,
        ge=1,
        description="Articles in the prompt when answering (chat, ask, eval, serve); unset: `k`. Fewer than `k` "
        "answers from the best-ranked ones: a small model picks among several articles worse than "
        "retrieval ranks them (docs/evaluation.md).",
    )
    snippet_chars: int = Field(
        160,
        ge=20,
        description="Characters of each article's summary shown in the prompt (keeps prompts short). A longer summary "
        "shows the whole paragraphs most relevant to the question that fit, in their own order (the first "
        "one cut if it alone is longer).",
    )
    rule_chars: int = Field(
        600,
        ge=20,
        description="Characters of the article a grounded answer starts with (its rule, in the KB's words): the whole "
        "summary when it fits, else its paragraphs most relevant to the question. The prompt's own context "
        "uses `snippet_chars`.",
    )
    constrain_citations: bool = Field(
        True,
        description="While the model writes `(근거: …)`, let it cite only the retrieved articles (and paragraphs they "
        "have): a rule on the decoder, so no citation can be invented or come from outside the context.",
    )
    citation_policy: Literal["mark", "drop", "off"] | None = Field(
        None,
        description="Citations of articles that do not exist or were not retrieved: `mark` them in the answer, `drop` "
        "them, or leave them (`off`). Unset: `mark` in a grounded run (`enabled`), `off` otherwise; an "
        "ungrounded run that cites statutes (the ungrounded civil-law recipes) sets `mark` to have its "
        "citations checked against the shipped KB.",
    )
    out_of_scope_examples: list[str] = Field(
        default_factory=list,
        description='Files of questions that no article of the KB answers (`{"question"}` lines: other laws, other '
        "topics, chat), e.g. `data/out_of_scope_examples.jsonl`. With them a classifier learns in scope "
        "(the example questions) against out of scope, and the chatbot abstains, citing nothing, on a "
        "question it scores out of scope. The run folder keeps them (`retrieval_out_of_scope.jsonl`). "
        "Empty: never abstain.",
    )
    abstain_in_scope: float = Field(
        0.02,
        ge=0,
        lt=0.5,
        description="Sets the abstention threshold: the highest one at which at most this share of the in-scope "
        "example questions, each scored while held out of a 5-fold cross-validation, would be abstained "
        "(the curve: `bench/abstain_curve.py`).",
    )
    abstain_message: str | None = Field(
        None,
        description="What the chatbot says instead of an answer to an out-of-scope question. Unset: a Korean message "
        "that the question is outside the statutes it answers from, with where to ask instead (대한법률구조공단 "
        "132, a lawyer).",
    )


class KotuneConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    retrieval: RetrievalSection = Field(default_factory=RetrievalSection)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), allow_unicode=True, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")


TASK_ALIASES = {
    "text2text-generation": "text2text",
    "seq2seq": "text2text",
    "seq2seq-lm": "text2text",
    "translation": "text2text",
    "summarization": "text2text",
    "sequence-classification": "text-classification",
    "classification": "text-classification",
    "text-generation": "causal-lm",
    "causal-lm": "causal-lm",
    "clm": "causal-lm",
}

SECTIONS = {name: field.annotation for name, field in KotuneConfig.model_fields.items()}
