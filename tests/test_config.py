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
    path.write_text(yaml.safe_dump({
        "training": {"learning_rat": 1e-4, "epochs": -1},
        "lora": {"r": "eight"},
        "modle": {},
    }), encoding="utf-8")
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
    cfg = load_config(None, ["training.learning_rate=1e-4", "data.group_by_length=false", "lora.target_modules=[c_attn]"],
                      {"csv_path": "x.csv", "max_steps": 7, "output_dir": "o", "batch_size": 2, "epochs": 1.5})
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.data.group_by_length is False
    assert cfg.lora.target_modules == ["c_attn"]
    assert (cfg.data.train_file, cfg.training.max_steps, cfg.model.output_dir, cfg.data.batch_size, cfg.training.epochs) == \
        ("x.csv", 7, "o", 2, 1.5)


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
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8").strip() == config_reference().strip(), \
        "docs/config.md is stale: run `make docs`"
