"""Training output: log handlers, the per-epoch and evaluation lines, early-stopping
bookkeeping, the progress bar, TensorBoard and the Ctrl+C flag; the training errors."""

from __future__ import annotations

import logging
import signal
from datetime import datetime
from pathlib import Path

from ..errors import TrainError
from ..memory import memory_line, memory_stats

log = logging.getLogger("kotune")


class Interrupted(Exception):
    """Raised after Ctrl+C once the checkpoint is safely written."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")


# ---------------------------------------------------------------- logging


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record))


def setup_logging(out_dir: Path | None, level: str, fmt: str) -> Path | None:
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"training_{datetime.now():%Y%m%d_%H%M%S}.log"
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter(fmt))
    log.addHandler(fh)
    return path


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_eval(ev: dict) -> str:
    parts = [f"eval loss {ev['eval_loss']:.4f}"]
    if "accuracy" in ev:
        parts += [f"accuracy {ev['accuracy']:.4f}", f"macro-F1 {ev['macro_f1']:.4f}"]
    return ", ".join(parts)


def epoch_report(step, epoch, n_epochs, acc, lr, ev, device, elapsed, write) -> None:
    """The per-epoch line the seed promises: loss, eval metrics, learning rate, memory, elapsed time."""
    mem = memory_stats(device)
    rec = {
        "step": step,
        "epoch": round(epoch, 3),
        "epoch_train_loss": acc[0] / max(acc[1], 1),
        "lr": lr,
        "elapsed_s": round(elapsed, 1),
        **mem,
    }
    if ev:
        rec.update(ev)
    write(rec)
    log.info(
        "epoch %.2f/%.2f (step %d): train loss %.4f%s, lr %.2e, %s, elapsed %s",
        epoch,
        n_epochs,
        step,
        rec["epoch_train_loss"],
        f", {format_eval(ev)}" if ev else "",
        lr,
        memory_line(mem),
        _clock(elapsed),
    )


class StopFlag:
    """First Ctrl+C (or SIGTERM): finish the step, checkpoint, exit. Second: stop now."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (press Ctrl+C again to abort)")

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="train")


def tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("TensorBoard logging needs the extra: pip install 'kotune[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"))
