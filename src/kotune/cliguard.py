"""The CLI-wide rule for errors no command expected: one line naming the command, its input and what to try,
plus where to get the traceback (`--debug`). Expected errors never get here: commands turn them into their own
messages (`cli._fail`, `cli._run`)."""

from __future__ import annotations

import typer
from typer.core import TyperGroup


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
