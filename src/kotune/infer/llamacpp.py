"""The llama.cpp engine: a run's merged GGUF export run by `llama-cpp-python`.

Optional (extra `kotune[llamacpp]`). It takes the same `generate` keyword
arguments as the torch engine and the HF model, feeding llama.cpp the token
ids kotune's tokenizer made (the GGUF carries the same vocabulary), so prompts,
EOS handling and Hangul-safe streaming are shared with the torch path.
llama.cpp computes the logits; kotune's `sampling.next_tokens` picks each token, so
greedy/sampling and the repetition penalty (over the whole sequence, prompt
included) behave as in `generate` and the torch engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from ..memory import cpu_threads
from ..runfolder import require_run
from .gguf_export import export_gguf
from .sampling import next_tokens, stop_ids

log = logging.getLogger("kotune")

INSTALL_HINT = "the llama.cpp backend needs the extra: pip install 'kotune[llamacpp]' (builds llama-cpp-python)"


def import_llama():
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return Llama


class LlamaCppGenerator:
    """`generate(input_ids, …)` over a llama.cpp model; batches run row by row."""

    def __init__(self, gguf_path: str | Path, n_ctx: int = 2048, threads: int | None = None):

        Llama = import_llama()
        self.path = Path(gguf_path)
        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_threads=threads or cpu_threads(),
            n_threads_batch=threads or cpu_threads(),
            n_batch=512,
            verbose=False,
        )
        # Chatbot reads the position limit from here.
        self.config = SimpleNamespace(max_position_embeddings=n_ctx)
        import torch

        self.device = torch.device("cpu")

    def last_logits(self):
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()

    def _pick(self, seen: list[int], repetition_penalty: float, do_sample: bool, constrain=None, **warp) -> int:
        # Greedy in numpy on one thread: torch's intra-op threads would fight llama.cpp's
        # still-spinning worker threads for the same cores.
        import numpy as np

        scores = self.last_logits()
        if not do_sample and constrain is None:
            if repetition_penalty and repetition_penalty != 1.0:
                idx = np.unique(np.asarray(seen))
                v = scores[idx]
                scores[idx] = np.where(v < 0, v * repetition_penalty, v / repetition_penalty)
            return int(scores.argmax())
        import torch

        procs = [lambda _seen, sc: constrain(sc)] if constrain is not None else None
        return int(
            next_tokens(
                torch.from_numpy(scores)[None],
                torch.tensor([seen]),
                do_sample=do_sample,
                repetition_penalty=repetition_penalty,
                logits_processor=procs,
                **warp,
            )[0]
        )

    def _one(self, prompt: list[int], streamer, max_new_tokens: int, eos, procs=None, padded=None, **warp) -> list[int]:
        # kotune's own logits processing over llama.cpp's logits: llama.cpp's sampler would
        # penalise repeats of generated tokens only, `generate` (and the torch engine) of the prompt too.
        self.llm.reset()
        self.llm.eval(prompt)
        seen = list(prompt)
        new: list[int] = []
        while True:
            constrain = None
            if procs:
                import torch

                # `generate`'s processors see the padded prompt row plus the new tokens.
                ids = torch.tensor([padded + new])

                def constrain(scores, ids=ids):
                    for proc in procs:
                        scores = proc(ids, scores)
                    return scores

            tok = self._pick(seen, constrain=constrain, **warp)
            new.append(tok)
            if streamer is not None:
                import torch

                streamer.put(torch.tensor([tok]))
            if tok in stop_ids(eos) or len(new) >= max_new_tokens:
                return new
            seen.append(tok)
            self.llm.eval([tok])

    def close(self) -> None:
        self.llm.close()

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
        **_ignored,
    ):
        import torch

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        pad = pad_token_id if pad_token_id is not None else (min(stop_ids(eos_token_id), default=0))
        rows = []
        for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            prompt = [t for t, m in zip(ids, mask) if m]
            budget = max(1, min(max_new_tokens, self.n_ctx - len(prompt)))
            procs = [p.for_row(b) if hasattr(p, "for_row") else p for p in logits_processor or ()]
            rows.append(
                self._one(
                    prompt,
                    streamer,
                    budget,
                    eos_token_id,
                    procs=procs,
                    padded=ids,
                    repetition_penalty=repetition_penalty,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                )
            )
        if streamer is not None:
            streamer.end()
        width = max(len(r) for r in rows)
        out = [ids + r + [pad] * (width - len(r)) for ids, r in zip(input_ids.tolist(), rows)]
        return torch.tensor(out, dtype=input_ids.dtype)


def load_llamacpp(
    run_dir: str | Path, gguf_file: str | None = None, threads: int | None = None, n_ctx: int = 2048, cfg=None
):
    """(LlamaCppGenerator, tokenizer, config): exports the run to GGUF on first use. `cfg`: as in `model.load_run`."""
    from transformers import AutoTokenizer

    import_llama()  # fail before a minute of export when the extra is missing
    run = Path(run_dir)
    cfg = cfg or require_run(run)
    path = Path(gguf_file) if gguf_file else run / "model-q8_0.gguf"
    if not path.is_file():
        if gguf_file:
            raise FileNotFoundError(
                f"{path}: GGUF file not found (generation.gguf_file). Export one with `kotune export {run}`."
            )

        log.info("exporting %s to %s for llama.cpp (once)", run, path)
        export_gguf(run, path, "q8_0")
    tok = AutoTokenizer.from_pretrained(str(run))
    return LlamaCppGenerator(path, n_ctx=n_ctx, threads=threads), tok, cfg
