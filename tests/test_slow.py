"""The real default model (Gemma 3 270M from the embedded GGUF): convert, train two steps, answer.

About two minutes on 2 CPU cores (the GGUF → safetensors conversion, once per cache, is most of it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import qa_rows, write_csv

pytestmark = pytest.mark.slow


def test_default_model_converts_trains_and_answers(tmp_path):
    from kotune.config import load_config
    from kotune.infer.generate import Chatbot
    from kotune.model import resolve_model
    from kotune.train import train
    from kotune.train.report import read_metrics

    resolved = resolve_model("gemma3-270m")
    resolved_path = Path(resolved.path) / "config.json"
    cfg_json = json.loads(resolved_path.read_text())
    assert "quantization_config" not in cfg_json and cfg_json["model_type"] == "gemma3_text"
    assert "Gemma Terms of Use" in (resolved_path.parent / "NOTICE").read_text()

    data = write_csv(tmp_path / "qa.csv", qa_rows(12))
    cfg = load_config(
        "configs/civil_law.yaml",
        [
            f"data.train_file={data}",
            f"model.output_dir={tmp_path / 'run'}",
            "training.max_steps=2",
            "data.batch_size=2",
            "data.eval_ratio=0.2",
            "training.logging_steps=1",
            "logging.progress_bar=false",
            "generation.max_new_tokens=16",
        ],
    )
    out = train(cfg)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert (out / "NOTICE").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    bot = Chatbot.from_run(out, greedy=True)
    a = bot.answer("전세권이란 무엇인가요?")
    assert a.new_tokens >= 1 and isinstance(a.text, str)
