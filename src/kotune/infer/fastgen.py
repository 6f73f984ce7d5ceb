"""Fast inference: a run folder loaded for answering, not for training.

The LoRA adapter is merged into the base weights once at load, the weights are
cast to bf16 (or int8) where the CPU handles it natively, and a short decode
loop with a KV cache replaces `model.generate`: per token it runs one forward
pass on the newest token, computes logits at that position only, and applies
the same logits processing as `generate` (repetition penalty, temperature,
top-k, top-p; greedy picks the argmax of the penalised logits).

`FastGenerator.generate` takes the keyword arguments of `model.generate` that
`Chatbot` uses, so either engine (this one or `llamacpp.LlamaCppGenerator`)
drops in where an HF model was.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..errors import ModelError
from ..memory import cpu_has_bf16, cpu_threads, cuda_has_bf16
from ..model import load_run
from ..runfolder import require_run
from .batch import appending, use_row_attention
from .llamacpp import load_llamacpp
from .sampling import next_tokens, stop_ids

log = logging.getLogger("kotune")

PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 on a GPU with bf16 or a CPU with native bf16 matmul, else fp32.
    int8 is never chosen automatically: it changes some greedy tokens (docs/benchmarks.md)."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bfloat16" if cuda_has_bf16() else "float32"

    return "bfloat16" if cpu_has_bf16() else "float32"


def _cast_out(module, dtype):
    """Wrap a module so its output is cast to `dtype` (an embedding stored in another dtype)."""
    import torch

    class CastOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        @property
        def weight(self):
            return self.inner.weight

        def forward(self, x):
            return self.inner(x).to(dtype)

    return CastOut()


SHORTLIST = 1024  # the citation constraint looks at most at the 64 x 16 most likely tokens (legal/constrain.py)


def _shortlist_head(weight, k: int = SHORTLIST):
    """LM head for bf16 inference on a CPU: a fast approximate product over the whole vocabulary, then the `k`
    highest logits of each row recomputed exactly.

    The approximate product is dynamic int8 (fbgemm's int8 GEMM, half the bytes of a 16-bit head: one row or eight
    cost about the same, a fifth of bf16's eight rows); where the CPU has no int8 kernels, fp16 for one row and bf16
    for several. Its rows depend on the batch (int8 scales the activations per call; fp16 and bf16 round
    differently). The exact pass removes that: the shortlisted logits are the fp64 dot products of the bf16 weights
    with the hidden state, rounded to fp32, the same whatever the batch, the shortlist's order or the thread count.
    Greedy decoding picks among them (the approximation error, ~0.1, is far below the gap between the top token and
    the 1024th), so a request decodes the same tokens alone or in a batch. `weight` (bf16) may be the embedding's."""
    import torch

    approx = int8_linear(weight) if "fbgemm" in torch.backends.quantized.supported_engines else None
    half = weight.detach().to(torch.float16) if approx is None else None

    class ShortlistHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight
            self.approx, self.half, self.k = approx, half, k

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1])
            if self.approx is not None:
                logits = self.approx(rows.float())
            elif rows.shape[0] == 1:
                logits = torch.nn.functional.linear(rows.to(torch.float16), self.half).float()
            else:
                logits = torch.nn.functional.linear(rows.to(torch.bfloat16), self.weight).float()
            top = logits.topk(min(self.k, logits.shape[-1]), sorted=False).indices
            # fp64 sums of exact products, rounded to fp32 once: the same value whichever kernel or order sums them.
            # Row by row: the fp64 copy of eight rows' shortlists (42 MB) would be fresh pages every step.
            exact = torch.empty(top.shape, dtype=torch.float32, device=x.device)
            for i, (ids, row) in enumerate(zip(top, rows.double())):
                exact[i] = torch.mv(self.weight[ids].double(), row).float()
            return logits.scatter_(1, top, exact).view(*x.shape[:-1], -1)

    return ShortlistHead()


def int8_linear(weight, bias=None, chunk: int = 16384):
    """A dynamic-int8 Linear (symmetric per-output-channel weights) built chunk by chunk,
    so a huge bf16 weight (Gemma's 262k x 640 head) never exists in fp32 at once."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear

        out_f, in_f = weight.shape
        q = torch.empty(out_f, in_f, dtype=torch.int8)
        scales = torch.empty(out_f, dtype=torch.double)
        for s in range(0, out_f, chunk):
            w = weight[s : s + chunk].detach().float()
            sc = (w.abs().amax(1) / 127.5).clamp(min=1e-8)
            q[s : s + chunk] = (w / sc[:, None]).round().clamp(-128, 127).to(torch.int8)
            scales[s : s + chunk] = sc
        qw = torch._make_per_channel_quantized_tensor(q, scales, torch.zeros(out_f, dtype=torch.long), 0)
        lin = DynLinear(in_f, out_f, dtype=torch.qint8)
        lin.set_weight_bias(qw, None if bias is None else bias.detach().float())
    return lin


def convert_model(model, precision: str, shortlist_head: bool = False, shortlist: int = SHORTLIST):
    """Cast a merged HF causal LM in place for inference and return it. `shortlist_head`: with bf16, the CPU's LM
    head (`_shortlist_head`, `shortlist` exact logits a row)."""
    import torch

    if precision == "float32":
        return model.float()
    if precision == "bfloat16":
        model.to(torch.bfloat16)
        head = model.get_output_embeddings()
        if shortlist_head and head is not None and getattr(head, "bias", None) is None:
            model.set_output_embeddings(_shortlist_head(head.weight, shortlist))
        return model
    if precision != "int8":
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    # Dynamic int8 (per-output-channel weights, activations quantised per call) for every
    # Linear, the LM head included: with Gemma's 262k vocabulary the head is the largest read.
    # Converted module by module so the fp32 copy is never whole (peak RSS).
    body = getattr(model, model.base_model_prefix)
    emb = body.get_input_embeddings()
    emb.to(torch.bfloat16)  # only looked up: bf16 halves it, the lookup is exact enough
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, lin in linears:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], int8_linear(lin.weight, lin.bias))
    for p in model.parameters():  # norms, biases left as Parameters: fp32 to meet fp32 activations
        if p.dtype != torch.float32 and p is not emb.weight:
            p.data = p.data.float()
    for buf in model.buffers():
        if buf.is_floating_point() and buf.dtype != torch.float32:
            buf.data = buf.data.float()
    body.set_input_embeddings(_cast_out(emb, torch.float32))
    return model


class FastGenerator:
    """A merged, cast HF causal LM with a lean decode loop (batch 1 or left-padded batches)."""

    supports_contrast = True  # context-aware decoding (`contrast_ids`); llama.cpp's engine has none

    def __init__(self, model, precision: str = "float32", threads: int | None = None):
        import torch

        self.model = model
        self.config = model.config
        use_row_attention(model)  # a request decodes the same alone or in a batch (batch.py)
        self._cache_arg: str | None = None
        self.precision = precision
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)

    @property
    def device(self):
        for p in self.model.parameters():
            return p.device
        import torch

        return torch.device("cpu")

    def _forward(self, ids, mask, positions, cache):
        # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated, then removed);
        # pass and read whichever this version's model has.
        if self._cache_arg is None:
            import inspect

            self._cache_arg = (
                "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            )
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1, :], out["cache"] if "cache" in out else out["past_key_values"]

    def generate(
        self,
        input_ids,
        attention_mask=None,
        streamer=None,
        max_new_tokens: int = 256,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        logits_processor=None,
        contrast_ids=None,
        contrast_mask=None,
        contrast_weight: float = 0.0,
        **_ignored,
    ):
        """Same contract as `model.generate` for the arguments above: returns prompt + new ids,
        finished rows padded with `pad_token_id`; `streamer.put` gets the prompt, then each token.

        `contrast_ids` (left-padded, `contrast_mask`) with `contrast_weight` w > 0: context-aware decoding. Each row's
        contrast prompt is decoded beside it with the same new tokens, and the next token is scored
        (1+w)·log p(·|prompt) − w·log p(·|contrast) before any other processing: `generate`'s classifier-free
        guidance with `guidance_scale` 1+w and the contrast as the negative prompt."""
        import torch

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError("streaming needs batch size 1")
        stops = sorted(stop_ids(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
        seq, mask = input_ids, attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        if streamer is not None:
            streamer.put(seq.cpu())
        cache = None
        step_ids, step_pos = seq, positions
        contrast = contrast_ids is not None and contrast_weight > 0
        if contrast:
            c_mask = torch.ones_like(contrast_ids) if contrast_mask is None else contrast_mask
            c_ids, c_pos, c_cache = contrast_ids, (c_mask.long().cumsum(-1) - 1).clamp(min=0), None
        with torch.inference_mode():
            for step in range(max_new_tokens):
                logits, cache = self._forward(step_ids, mask, step_pos, cache)
                if step == 0:  # after the prefill: later steps append to the cache in place (batch.py)
                    appending(cache)
                if contrast:
                    c_logits, c_cache = self._forward(c_ids, c_mask, c_pos, c_cache)
                    if step == 0:
                        appending(c_cache)
                    logits = (1 + contrast_weight) * logits.float().log_softmax(
                        -1
                    ) - contrast_weight * c_logits.float().log_softmax(-1)
                nxt = next_tokens(
                    logits,
                    seq,
                    repetition_penalty=repetition_penalty,
                    do_sample=do_sample,
                    logits_processor=logits_processor,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                )
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(nxt.cpu())
                if stops:
                    done |= torch.isin(nxt, torch.tensor(stops, device=nxt.device))
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
                if contrast:
                    c_mask = torch.cat([c_mask, torch.ones_like(c_mask[:, :1])], dim=1)
                    c_ids, c_pos = nxt[:, None], c_pos[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        return seq


def load_fast(run_dir: str | Path, precision: str = "auto", threads: int | None = None, cfg=None):
    """(FastGenerator, tokenizer, config) for a run folder: adapter merged, weights cast. `cfg`: as in `load_run`."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = resolve_precision(precision, device)
    # Loading the base straight in bf16 halves peak RSS; the adapter delta is added in fp32
    # and rounded once (PEFT's merge), then int8 quantises from those bf16 weights.
    dtype = "bfloat16" if chosen in ("bfloat16", "int8") else None
    model, tok, cfg = load_run(run_dir, merge=True, dtype=dtype, cfg=cfg)
    if device == "cuda" and chosen == "int8":
        raise ValueError("`generation.precision: int8` is CPU-only; use bfloat16 on a GPU.")
    model = convert_model(model, chosen, shortlist_head=device == "cpu").to(device)
    model.eval()
    log.info("inference engine: torch, %s weights, %d threads", chosen, threads or torch.get_num_threads())
    return FastGenerator(model, chosen, threads or (cpu_threads() if device == "cpu" else None)), tok, cfg


def load_engine(run_dir: str | Path, backend: str | None = None, precision: str | None = None, **_ignored):
    """(engine, tokenizer, config): the backend named in the run's `generation.backend`
    (or the override) — `torch` (this module) or `llamacpp` (a GGUF export run by llama.cpp)."""

    run = Path(run_dir)
    cfg = require_run(run)
    if cfg.model.task != "causal-lm":  # checked before any weights are loaded
        raise ModelError(f"{run} is a {cfg.model.task} run; use `kotune predict {run} --input FILE`.")
    g = cfg.generation
    backend = backend or g.backend
    precision = precision or g.precision
    if backend == "llamacpp":
        return load_llamacpp(run, gguf_file=g.gguf_file, threads=g.num_threads, cfg=cfg)
    if backend != "torch":
        raise ValueError(f"unknown generation backend {backend!r}; use `torch` or `llamacpp`.")
    return load_fast(run, precision, g.num_threads, cfg=cfg)
