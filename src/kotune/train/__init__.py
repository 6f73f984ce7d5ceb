"""Training: one loop for every task (`loop.py`) and its output (`logs.py`)."""

from ..memory import choose_precision, cpu_has_bf16
from ..prepare import epoch_batches
from ..tasks import answer_loss_sum
from .logs import Interrupted, TrainError, setup_logging
from .loop import accumulate_gradients, lr_factor, train, trainable_state

__all__ = [
    "Interrupted",
    "TrainError",
    "accumulate_gradients",
    "answer_loss_sum",
    "choose_precision",
    "cpu_has_bf16",
    "epoch_batches",
    "lr_factor",
    "setup_logging",
    "train",
    "trainable_state",
]
