"""Training: one loop for every task (`loop.py`) over the pieces of a step (`steps.py`), its logs (`logs.py`), early
stopping (`early.py`), checkpoints
(`checkpoint.py`), metrics and the loss plot (`report.py`), and the distributed engines it runs under
(`distributed.py`: DDP, FSDP2; `deepspeed_zero.py`: DeepSpeed ZeRO-2/3). `from kotune.train import train` is the
entry point."""

from ..errors import TrainError
from ..prepare import epoch_batches
from ..tasks import answer_loss_sum
from .logs import Interrupted, setup_logging
from .loop import train
from .steps import accumulate_gradients, lr_factor, trainable_state

__all__ = [
    "Interrupted",
    "TrainError",
    "accumulate_gradients",
    "answer_loss_sum",
    "epoch_batches",
    "lr_factor",
    "setup_logging",
    "train",
    "trainable_state",
]
