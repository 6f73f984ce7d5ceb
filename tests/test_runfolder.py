"""runfolder.require_run: the one check that a folder holds a run, with a message that says what it lacks."""

from __future__ import annotations

import pytest

from kotune.config import KotuneConfig
from kotune.errors import KotuneError, ModelError
from kotune.runfolder import require_run


def _run(run, *, adapter=False, full=False, checkpoint=False):
    run.mkdir(parents=True)
    KotuneConfig().save(run / "config.yaml")
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
    if full:
        (run / "model").mkdir()
        (run / "model" / "config.json").write_text("{}")
    if checkpoint:
        from kotune.runfolder import CKPT_STATE as STATE
        from kotune.runfolder import CKPT_WEIGHTS as WEIGHTS
        from kotune.runfolder import checkpoint_dir

        step = checkpoint_dir(run / "checkpoints", 2)
        step.mkdir(parents=True)
        (step / STATE).write_bytes(b"x")
        (step / WEIGHTS).write_bytes(b"x")
    return run


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(ModelError, match="not a finished kotune run.*no config.yaml"):
        require_run(tmp_path)


def test_each_need_accepts_what_it_can_use(tmp_path):
    lora, full, bare = _run(tmp_path / "a", adapter=True), _run(tmp_path / "b", full=True), _run(tmp_path / "c")
    assert require_run(lora).model.name == require_run(full).model.name == require_run(bare, "config").model.name
    assert require_run(lora, "adapter").lora.r == KotuneConfig().lora.r


def test_gguf_export_of_a_full_fine_tune_says_what_the_folder_holds(tmp_path):
    with pytest.raises(ModelError, match="full fine-tune.*convert_hf_to_gguf"):
        require_run(_run(tmp_path / "run", full=True), "adapter")


def test_an_unfinished_run_points_to_resume_when_it_has_a_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="--resume") as e:
        require_run(_run(tmp_path / "run", checkpoint=True))
    assert isinstance(e.value, KotuneError)
