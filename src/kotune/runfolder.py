"""A run folder's own files, and the guards that keep kotune from losing them.

`kotune train` over an existing run moves that run's files into `.kotune-previous/`
inside the folder and deletes them only when the new run has finished; if the new run
fails before its first checkpoint they are moved back. Commands that write an output
(merge, export, ask, eval, predict) refuse a path inside a run's own files, and check that
they can write before they work. No torch import here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .config import load_config
from .errors import ModelError, OutputError

# A run's config and its weights (a LoRA adapter or a full fine-tune).
CONFIG, ADAPTER, FULL_MODEL = "config.yaml", "adapter", "model"
# What a grounded run keeps for answering (the grounding writes and reads them): the KB it was trained with, the
# example questions its retrieval learns from, and the questions its scope classifier learns to refuse.
KB_FOLDER, EXAMPLES_FILE, OUT_OF_SCOPE_FILE = "statutes", "retrieval_examples.jsonl", "retrieval_out_of_scope.jsonl"
# Checkpoints: `checkpoints/step-NNNNNNN/` holding the trainable tensors and the optimizer/RNG state
# (train/checkpoint.py writes them); a folder lacking either file is not a checkpoint.
CKPT_PREFIX, CKPT_WEIGHTS, CKPT_STATE = "step-", "trainable.safetensors", "state.pt"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{CKPT_PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.name.startswith(CKPT_PREFIX) and (p / CKPT_STATE).is_file() and (p / CKPT_WEIGHTS).is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


# What `kotune train` writes (loop._finish, the tokenizer's save_pretrained, checkpoints, logs) and the
# GGUF that `kotune export` puts beside it by default. Anything else in the folder is the user's and stays.
ARTIFACTS = (
    "checkpoints",
    "adapter",
    "model",
    "config.yaml",
    "metrics.jsonl",
    "loss.png",
    "labels.json",
    "NOTICE",
    KB_FOLDER,
    EXAMPLES_FILE,
    OUT_OF_SCOPE_FILE,
    "tensorboard",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PATTERNS = ("training_*.log", "model-*.gguf")
PREVIOUS = ".kotune-previous"
# What `kotune merge` writes (save_pretrained of a model and its tokenizer, NOTICE): a folder holding only these
# is an earlier merge, which a new merge may replace.
MERGE_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "NOTICE",
)


def require_run(run: str | Path, needs: str = "weights"):
    """The config of the run in `run`, or a clear error saying what the folder lacks. `needs`: "config" (the folder
    only has to be a run: predict reads the task first), "weights" (a LoRA adapter or a full fine-tune: chat, merge)
    or "adapter" (a LoRA adapter: GGUF export merges it into the base GGUF)."""

    run = Path(run)
    if not (run / CONFIG).is_file():
        raise ModelError(
            f"{run}: not a finished kotune run (no {CONFIG}). Give the folder `kotune train` wrote, or "
            "train one with `kotune train`."
        )
    adapter = (run / ADAPTER / "adapter_config.json").is_file()
    full = (run / FULL_MODEL / "config.json").is_file()
    if needs == "adapter" and full and not adapter:
        raise ModelError(
            f"{run} holds a full fine-tune ({FULL_MODEL}/), not a LoRA adapter, and GGUF export merges an "
            f"adapter into the base GGUF. Convert {run / FULL_MODEL} with llama.cpp's convert_hf_to_gguf.py."
        )
    if needs != "config" and not (adapter or full):
        resume = (
            f" Continue it with `kotune train --config {run / CONFIG} --resume`."
            if list_checkpoints(run / "checkpoints")
            else " Train it again with `kotune train`."
        )
        raise ModelError(
            f"{run}: not a finished kotune run: training did not write {ADAPTER}/ (or {FULL_MODEL}/)." + resume
        )
    return load_config(run / CONFIG)


def run_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [folder / n for n in ARTIFACTS if (folder / n).exists()]
    return found + sorted(p for pat in PATTERNS for p in folder.glob(pat))


def is_finished(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (
        (folder / ADAPTER / "adapter_config.json").is_file() or (folder / FULL_MODEL / "config.json").is_file()
    )


def holds_run(folder: Path) -> str | None:
    """What a new run would replace in `folder`: a finished run, checkpoints, or a run set aside earlier."""
    if is_finished(folder):
        return "a finished run"
    if list_checkpoints(folder / "checkpoints"):
        return "checkpoints"
    if (folder / PREVIOUS).is_dir():
        return f"a run set aside by an `--overwrite` that did not finish ({folder / PREVIOUS})"
    return None


def set_aside(folder: Path) -> Path | None:
    """Move the run in `folder` into `folder/.kotune-previous` (returned); None when there is nothing to move.
    A run already set aside by an unfinished replacement is kept: the files beside it are that replacement's."""
    prev = folder / PREVIOUS
    files = run_files(folder)
    if prev.is_dir():
        if is_finished(folder):  # newer than what was set aside: it becomes the previous run
            shutil.rmtree(prev)
        else:
            for f in files:
                _remove(f)
            return prev
    if not files:
        return None
    prev.mkdir()
    for f in files:
        os.replace(f, prev / f.name)
    return prev


def restore(folder: Path, keep: Path | None = None) -> None:
    """Put the run set aside in `folder` back, deleting what the failed replacement wrote (except `keep`, its log)."""
    prev = folder / PREVIOUS
    if not prev.is_dir():
        return
    for f in run_files(folder):
        if f != keep:
            _remove(f)
    for f in prev.iterdir():
        os.replace(f, folder / f.name)
    prev.rmdir()


def settle(folder: Path, log_path: Path | None, resumable: bool) -> str:
    """After a replacement run stopped early: restore the run it replaced unless the new one can be resumed."""
    if resumable:
        return (
            f"the run this one replaces is kept in {folder / PREVIOUS} until this one finishes (continue with "
            "`--resume`)"
        )
    restore(folder, keep=log_path)
    return f"the run this one was replacing is back in {folder}, unchanged"


def discard_previous(folder: Path) -> None:
    shutil.rmtree(folder / PREVIOUS, ignore_errors=True)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def check_writable(folder: Path) -> None:
    """Fail before any work when `folder` cannot be created or written (read-only mount, permissions, full disk).
    Folders made for the test are removed again: a run that fails its checks leaves nothing behind."""
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kotune-write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"{folder}: cannot write here ({os_reason(e)}). {os_fix(e)}") from None
    finally:
        for p in made:  # innermost first
            try:
                p.rmdir()
            except OSError:
                pass


def os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def os_fix(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "Free some disk space, or write to another disk."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Choose a folder you can write to (check its permissions, or whether the disk is mounted read-only)."
    return "Check the path."


def refuse_inside_run(output: Path, run: Path, own: str | None = None) -> None:
    """Refuse an `output` that is the run folder itself or one of its files, or lies inside them: writing there
    replaces the adapter, config or tokenizer that make the run. `own`: a file-name pattern the command may
    write in the run folder (export's `model-*.gguf`)."""
    out, root = output.resolve(), run.resolve()
    if own and out.parent == root and out.match(own):
        return
    if out == root:
        raise OutputError(
            f"{output} is the run folder {run}; writing the output there would replace the run's own "
            "files. Give a new path outside it (or a new subfolder)."
        )
    for name in ARTIFACTS + (PREVIOUS,):
        part = root / name
        if out == part or part in out.parents:
            where = f"is the run's own {name}" if out == part else f"is inside the run's own {name}"
            raise OutputError(
                f"{output} {where}; writing there would break the run. Give a path outside the run "
                "folder, or a new file or subfolder in it."
            )
    for pat in PATTERNS:
        if out.parent == root and out.match(pat):
            raise OutputError(f"{output} is one of the run's own files; give another name.")


def check_merge_output(out: Path, run: Path, base: Path) -> None:
    """`kotune merge`'s folder: not the run or its files, not another run, not the base model, and new, empty or
    an earlier merge — it is replaced whole."""
    refuse_inside_run(out, run)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; `--output` is the folder for the merged model.")
    if holds_run(out):
        raise OutputError(
            f"{out} is a kotune run folder; merging into it would replace its tokenizer and config. Give a new folder."
        )
    if out.resolve() == base.resolve():
        raise OutputError(f"{out} is the run's base model; merging into it would replace the base. Give a new folder.")
    others = [p.name for p in out.iterdir() if not any(p.match(pat) for pat in MERGE_FILES)] if out.is_dir() else []
    if others:
        raise OutputError(
            f"{out} already holds other files ({', '.join(sorted(others)[:5])}); the merged model "
            "replaces its folder whole. Give a new or empty folder."
        )
    check_writable(out.parent)


def check_output_file(output: Path, run: Path | None, inputs: tuple[Path, ...] = ()) -> None:
    """A file a command writes after its work (ask's answers, eval's report): not one of its `inputs`, not a
    folder, not one of the run's own files, and writable — checked before the work, not after."""
    if any(output.exists() and output.resolve() == Path(i).resolve() for i in inputs):
        raise OutputError(f"{output} is an input of this command; give another output file so the input is kept.")
    if output.is_dir():
        raise OutputError(f"{output} is a folder; give a file name in it, such as {output / 'out.jsonl'}.")
    if run is not None:
        refuse_inside_run(output, run)
    check_writable(output.parent)
