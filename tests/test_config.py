"""Config: validation reports every problem at once, overrides, seed flags, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kotune.config import ConfigError, KotuneConfig, config_reference, load_config, parse_override

ROOT = Path(__file__).parent.parent


def test_defaults_roundtrip_through_yaml(tmp_path):
    cfg = KotuneConfig()
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert load_config(path) == cfg


def test_unknown_keys_and_bad_values_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "training": {"learning_rat": 1e-4, "epochs": -1},
                "lora": {"r": "eight"},
                "modle": {},
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "training.learning_rat" in msg and "learning_rate" in msg  # did-you-mean
    assert "training.epochs" in msg
    assert "lora.r" in msg
    assert "modle" in msg and "model" in msg
    assert len(e.value.problems) == 4


def test_overrides_and_seed_flags(tmp_path):
    cfg = load_config(
        None,
        ["training.learning_rate=1e-4", "data.group_by_length=false", "lora.target_modules=[c_attn]"],
        {"csv_path": "x.csv", "max_steps": 7, "output_dir": "o", "batch_size": 2, "epochs": 1.5},
    )
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.data.group_by_length is False
    assert cfg.lora.target_modules == ["c_attn"]
    assert (
        cfg.data.train_file,
        cfg.training.max_steps,
        cfg.model.output_dir,
        cfg.data.batch_size,
        cfg.training.epochs,
    ) == ("x.csv", 7, "o", 2, 1.5)


def test_bad_override_names_the_fix():
    with pytest.raises(ConfigError, match="unknown section `trainig`.*training"):
        load_config(None, ["trainig.epochs=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["epochs"])
    assert parse_override("training.learning_rate=5e-5") == ("training.learning_rate", 5e-5)


def test_template_rules():
    with pytest.raises(ConfigError, match="EOS string"):
        load_config(None, ["data.template='Q: {question} A: {answer}</s>'"])
    with pytest.raises(ConfigError, match="last"):
        load_config(None, ["data.template='{answer} {question}'"])


def test_literal_backslash_n_in_template_refused():
    with pytest.raises(ConfigError, match="double quotes"):
        load_config(None, ["data.template='질문: {question}\\n답변: {answer}'"])
    assert "\n답변" in load_config(None, ['data.template="질문: {question}\\n답변: {answer}"']).data.template


def test_mixed_precision_accepts_seed_booleans():
    assert load_config(None, ["memory.mixed_precision=true"]).memory.mixed_precision == "auto"
    assert load_config(None, ["memory.mixed_precision=false"]).memory.mixed_precision == "no"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_docs_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8").strip() == config_reference().strip(), (
        "docs/config.md is stale: run `make docs`"
    )


SEED_README_CONFIG = """
model:
  name: "bert-base-uncased"
  task: "text-classification"
  output_dir: "./models/fine_tuned_model"
  cache_dir: "./models/pretrained"

data:
  dataset_name: "imdb"
  dataset_cache_dir: "./datasets"
  text_column: "text"
  label_column: "label"
  max_length: 1024
  batch_size: 16

training:
  epochs: 3
  learning_rate: 2e-5
  weight_decay: 0.01
  warmup_steps: 0
  max_grad_norm: 1.0
  cuda_cleanup_freq: 100

memory:
  gradient_accumulation_steps: 4
  max_gpu_memory_usage: 0.95
  empty_cache_freq: 50
  mixed_precision: true
  optimize_memory_usage: true

logging:
  level: "INFO"
  format: "%(asctime)s - %(levelname)s - %(message)s"
"""


def test_seed_readme_config_is_accepted_as_is(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SEED_README_CONFIG, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.model.task == "text-classification" and cfg.model.cache_dir == "./models/pretrained"
    assert (cfg.data.dataset_name, cfg.data.text_column, cfg.data.label_column) == ("imdb", "text", "label")
    assert cfg.training.learning_rate == pytest.approx(2e-5)  # YAML reads `2e-5` as a string
    assert (cfg.training.cuda_cleanup_freq, cfg.memory.empty_cache_freq, cfg.memory.max_gpu_memory_usage) == (
        100,
        50,
        0.95,
    )
    assert cfg.memory.mixed_precision == "auto" and cfg.memory.optimize_memory_usage is True
    assert cfg.memory.gradient_accumulation_steps == 4


@pytest.mark.parametrize(
    "given,task",
    [
        ("Text2Text Generation", "text2text"),
        ("text2text-generation", "text2text"),
        ("sequence-classification", "text-classification"),
        ("text-generation", "causal-lm"),
    ],
)
def test_seed_task_spellings(given, task):
    assert load_config(None, [f"model.task={given}"]).model.task == task


def test_seed_flags_dataset_and_task():
    cfg = load_config(
        None,
        [],
        {
            "model_name": "m",
            "dataset": "imdb",
            "max_length": 64,
            "batch_size": 2,
            "epochs": 1,
            "task": "text-classification",
        },
    )
    assert (
        cfg.model.name,
        cfg.data.dataset_name,
        cfg.data.max_length,
        cfg.data.batch_size,
        cfg.training.epochs,
        cfg.model.task,
    ) == ("m", "imdb", 64, 2, 1, "text-classification")


def test_task_specific_problems_reported():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["training.early_stopping_metric=accuracy", "model.quantization=4bit", "lora.enabled=false"])
    msg = str(e.value)
    assert "text-classification" in msg and "QLoRA" in msg and len(e.value.problems) == 2


def test_context_contrast_needs_retrieval_and_the_torch_engine():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["generation.context_contrast=0.5", "generation.backend=llamacpp"])
    assert "retrieval.enabled" in str(e.value) and "backend: torch" in str(e.value) and len(e.value.problems) == 2
    grounded = load_config(ROOT / "configs" / "civil_law.yaml", ["generation.context_contrast=0.5"])
    assert grounded.generation.context_contrast == 0.5


def test_columns_mapping():
    from kotune.config import input_column, target_column

    d = load_config(None, ["data.text_column=q", "data.label_column=cat"]).data
    assert (input_column(d, "text-classification"), target_column(d, "text-classification")) == ("q", "cat")
    assert (input_column(d, "causal-lm"), target_column(d, "text2text")) == ("q", "cat")
    d = KotuneConfig().data
    assert (input_column(d, "text-classification"), target_column(d, "text-classification")) == ("text", "label")
    assert (input_column(d, "causal-lm"), target_column(d, "causal-lm")) == ("question", "answer")
