"""Every problem a user can fix, as one family: `KotuneError`. The CLI prints such an error's message and exits with
code 2, without a traceback; anything else is a bug and goes to `cliguard`. Each class keeps the builtin base it had
(ValueError or RuntimeError), so callers catching those still work. No imports: any module may raise these."""

from __future__ import annotations


class KotuneError(Exception):
    """A problem with the user's input, files or environment, stated with its fix."""


class ConfigError(KotuneError, ValueError):
    """All problems found in a config, one per line, each with its fix."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{head}{len(problems)} problem(s) in the config:\n{lines}")


class DataError(KotuneError, ValueError):
    """Problems in a data file, each naming the file and row (at most 50 shown)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  … and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__("data problems:\n" + "\n".join(f"  - {p}" for p in shown) + more)


class TemplateError(KotuneError, ValueError):
    """A prompt template that would train the wrong tokens."""


class OutputError(KotuneError, ValueError):
    """An output path that would destroy a run or cannot be written."""


class ModelError(KotuneError, RuntimeError):
    """A model that cannot be found, loaded or adapted as configured."""


class TrainError(KotuneError, RuntimeError):
    """Training cannot start or go on (memory, precision, distributed setup…)."""


class CheckpointError(KotuneError, RuntimeError):
    """A checkpoint that cannot be written or read."""


class ExportError(KotuneError, RuntimeError):
    """A merge or GGUF export that cannot be done."""
