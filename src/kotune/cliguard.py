"""What every command shares: the rules for errors and loading a run's chatbot.

Expected errors (kotune's own, and the plain builtins library code raises with a message for the user) become one
line and exit code 2 (`fail`, `guarded`). Errors no command expected get one line naming the command, its input and
what to try, plus where to get the traceback (`--debug`): `Guarded`, the top-level command group."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from .config import ConfigError, load_config


class Guarded(TyperGroup):
    """The top-level command group; `kotune` sets it as its class so the rule covers every command."""

    def invoke(self, ctx):
        argv = [*ctx._protected_args, *ctx.args]
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - the point of the rule
            # Exit, Abort and usage errors (typer's own or its click's) are how commands end; they pass.
            if type(e).__module__.startswith(("typer", "click")) or ctx.params.get("debug"):
                raise
            typer.echo(_crash_line(argv, e), err=True)
            raise typer.Exit(2 if isinstance(e, (OSError, MemoryError)) else 1)


def _crash_line(argv: list[str], e: Exception) -> str:
    from .runfolder import os_fix, os_reason

    shown = " ".join(argv)
    shown = shown if len(shown) <= 120 else shown[:117] + "…"
    what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        problem, fix = f"{where}{os_reason(e)}", os_fix(e)
    elif isinstance(e, MemoryError):
        problem, fix = "out of memory", "Lower data.batch_size or data.max_length, or close other programs."
    else:
        problem = f"{type(e).__name__}: {what}" if what else type(e).__name__
        fix = "Check that input (file, run folder, flags); if it looks right, please report this."
    return f"error: `kotune {shown}` failed: {problem}. {fix} Run it again with --debug for the traceback."


# Besides kotune's own errors, the plain builtins that library code raises with a message meant for the user (a missing
# file, a bad argument, a missing optional extra). Their subclasses (JSONDecodeError, ModuleNotFoundError…) are bugs
# of ours when they escape, and go to cliguard.
_PLAIN_ERRORS = (ValueError, FileNotFoundError, ImportError)


def fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def guarded(fn, *args, **kwargs):
    """Known problems become one clear message and exit code 2 — no traceback."""
    from .train import Interrupted

    try:
        return fn(*args, **kwargs)
    except Interrupted as e:
        typer.echo(
            f"\nstopped: checkpoint saved at {e.checkpoint}. Continue with `kotune train --config … --resume`.",
            err=True,
        )
        raise typer.Exit(130)
    except Exception as e:  # noqa: BLE001 - narrowed just below
        from .errors import KotuneError

        if isinstance(e, KotuneError) or type(e) in _PLAIN_ERRORS:
            fail(e)
        raise


def load_bot(run: Optional[str], model_path: Optional[str], **gen):
    path = run or model_path
    if not path:
        fail(ValueError("give the run folder: kotune chat RUN (or --model_path RUN)."))
    if (Path(path) / "config.yaml").is_file():  # flags are checked before the model loads, as the config would be
        from .config import apply_overrides

        try:
            apply_overrides(load_config(Path(path) / "config.yaml").generation, "generation", gen)
        except ConfigError as e:
            fail(e)
    from .infer.generate import Chatbot

    return guarded(Chatbot.from_run, path, **gen)
