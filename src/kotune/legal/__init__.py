"""The civil-law recipe: a Korean real-estate / 전세 counselling chatbot grounded in statute articles.

It owns the statute knowledge base (`statutes.py`, `kb/`, `kb_import.py`), retrieval (`retrieval/`), the answer's
rules (`answer.py`: rule first, the model's application through a sentence gate, refusals), citation checks and the
decoding rule for citations (`citations.py`, `constrain.py`), its evaluation (`evaluate.py`) and its commands
(`cli.py`). kotune's generic stages reach it only through the grounding interface (`kotune/grounding.py`), whose
`PLUGIN` names this package: `for_run` and `for_training` below.
"""

from __future__ import annotations

from pathlib import Path


def for_run(run_dir: Path, settings):
    from .grounding import StatuteGrounding

    return StatuteGrounding.from_run(run_dir, settings)


def for_training(settings, train_rows: list, eval_rows: list, seed: int):
    from .grounding import StatuteTraining

    return StatuteTraining(settings, train_rows, eval_rows, seed)
