"""Training on 2 CPU processes (gloo) — DDP under torchrun, FSDP2 under `accelerate launch` — gives the
adapter one process gives on the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, qa_rows, tiny_config, topic_rows, write_csv
from kotune import distributed as dd
from kotune.train import train

# Reducing gradients over processes changes only the order of float additions (and the
# padding width of each slice); after a few AdamW steps the weights agree to ~1e-7.
TOLERANCE = 1e-5


def test_shard_and_single_process_helpers():
    d = dd.Dist(rank=1, world=2)
    assert dd.shard([10, 11, 12], d) == [11] and dd.shard([10], d) == []
    assert dd.shard([1, 2, 3], dd.Dist()) == [1, 2, 3]
    assert dd.all_sum([1.5, 2.0], dd.Dist()) == [1.5, 2.0] and dd.any_true(True, dd.Dist())


def test_env_detection(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dd.from_env() == dd.Dist(rank=3, world=4, local_rank=1, engine="ddp")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert dd.engine_requested() == "FSDP" and dd.from_env().sharded
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dd.from_env().enabled and not dd.from_env().sharded


def _sets(cfg) -> list[str]:
    out = []
    for section, model in cfg:
        for key, value in model.model_dump(mode="json").items():
            if value is not None and key not in ("quick_test_questions", "template", "format"):
                out += ["--set", f"{section}.{key}={value}"]
    return out


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def gpt2_no_dropout(tiny_gpt2, tmp_path_factory):
    """The tiny GPT-2 without dropout: dropout masks depend on how rows are split, so they would differ."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("gpt2_no_dropout") / "m"
    shutil.copytree(tiny_gpt2, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _launch(cmd_head: list[str], cfg, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", *cmd_head, "-m", "kotune", "train", *_sets(cfg), *extra],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _log(run) -> str:
    logs = list(run.glob("training_*.log"))
    assert len(logs) == 1  # rank 0 alone writes
    return logs[0].read_text(encoding="utf-8")


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# 5 rows per global batch: one process gets 3 rows, the other 2; one batch of the epoch (19 rows) is short.
# With 6 rows per batch, the epoch's first batch has 1 row: at step 1 the second process has no row and
# runs a zero-weighted filler, alone (1 micro-batch per step: in the backward that all-reduces) or
# before a real micro-batch (2 per step: under `no_sync`).
@pytest.mark.parametrize("task,batch_size,accum,steps", [("causal-lm", 5, 1, 5), ("text-classification", 5, 1, 5),
                                                        ("causal-lm", 6, 1, 3), ("text-classification", 6, 2, 3)])
def test_two_process_ddp_matches_single_process(gpt2_no_dropout, tmp_path, task, batch_size, accum, steps):
    tiny_gpt2 = gpt2_no_dropout
    rows = topic_rows(24) if task == "text-classification" else qa_rows(24)
    data = write_csv(tmp_path / "d.csv", rows)
    sections = dict(model={"task": task}, lora={"dropout": 0.0}, data={"batch_size": batch_size},
                    memory={"gradient_accumulation_steps": accum},
                    training={"max_steps": steps, "save_steps": 100, "learning_rate": 1e-2})
    single = train(tiny_config(tiny_gpt2, data, tmp_path / "single", **sections))
    _launch(TORCHRUN, tiny_config(tiny_gpt2, data, tmp_path / "ddp", **sections))
    ddp = tmp_path / "ddp"
    a, b = _adapter(single), _adapter(ddp)
    worst = _max_diff(a, b)
    print(f"{task} (batch {batch_size} x {accum}): max abs diff single vs 2-process adapter {worst:.2e}")
    assert worst < TOLERANCE, worst
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the comparison is not between two untrained adapters
    # The gradients went through torch's DistributedDataParallel, whose reducer registered exactly the
    # trainable tensors (the adapter's, all float32) and none of the frozen base weights.
    m = re.search(r"DistributedDataParallel \(gloo, 2 processes\): all-reduces (\d+) trainable tensors \((\d+) bytes\); "
                  r"(\d+) frozen tensors not registered", _log(ddp))
    assert m, "the 2-process run did not train through DistributedDataParallel"
    assert int(m[1]) == len(a) and int(m[2]) == 4 * sum(v.numel() for v in a.values()) and int(m[3]) > 0
    from kotune.report import read_metrics

    # Metrics come from the global batch (same losses as one process).
    la = [r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-4)
    if task == "text-classification":
        ea = [r["accuracy"] for r in read_metrics(single / "metrics.jsonl") if "accuracy" in r]
        eb = [r["accuracy"] for r in read_metrics(ddp / "metrics.jsonl") if "accuracy" in r]
        assert ea == eb


def test_two_process_fsdp_matches_single_process_and_resumes(gpt2_no_dropout, tmp_path):
    """`accelerate launch` with the shipped FSDP config: torch FSDP2 on CPU (gloo), 2 processes."""
    import torch
    from safetensors.torch import load_file

    data = write_csv(tmp_path / "d.csv", qa_rows(24))
    # 4 rows x 2 micro-batches per step; the 5 eval rows make a 1-row eval batch, so one process runs an
    # eval filler (under FSDP every forward gathers parameters, so both processes must run it).
    sections = dict(lora={"dropout": 0.0}, data={"batch_size": 4}, memory={"gradient_accumulation_steps": 2},
                    training={"max_steps": 3, "save_steps": 2, "learning_rate": 1e-2})
    single = train(tiny_config(gpt2_no_dropout, data, tmp_path / "single", **sections))
    cfg = tiny_config(gpt2_no_dropout, data, tmp_path / "fsdp", **sections)
    accelerate = ["accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
                  "--num_processes", "2"]
    _launch(accelerate, cfg)
    fsdp = tmp_path / "fsdp"
    assert "FSDP2 fully_shard (gloo, 2 processes): 2 blocks (GPT2Block) + root" in _log(fsdp)
    worst = _max_diff(_adapter(single), _adapter(fsdp))
    print(f"FSDP: max abs diff single vs 2-process adapter {worst:.2e}")
    assert worst < TOLERANCE, worst
    # The checkpoint is gathered into the single-process format: full weights and optimizer state.
    step2 = "checkpoints/step-0000002"
    assert _max_diff(load_file(str(single / step2 / "trainable.safetensors")),
                     load_file(str(fsdp / step2 / "trainable.safetensors"))) < TOLERANCE
    oa, ob = (torch.load(r / step2 / "state.pt", weights_only=True)["optimizer"]["state"] for r in (single, fsdp))
    assert max(float((oa[i][k] - ob[i][k]).abs().max()) for i in oa for k in ("exp_avg", "exp_avg_sq")) < TOLERANCE
    # Resume under FSDP from step 2 (weights and optimizer state sharded again) ends where one process ends.
    import shutil

    shutil.rmtree(fsdp / "checkpoints/step-0000003")
    shutil.rmtree(fsdp / "adapter")
    _launch(accelerate, cfg, "--resume")
    assert _max_diff(_adapter(single), _adapter(fsdp)) < TOLERANCE


def test_deepspeed_and_unsupported_fsdp_settings_are_refused(tmp_path, tiny_gpt2, monkeypatch):
    from kotune.train import TrainError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = tiny_config(tiny_gpt2, write_csv(tmp_path / "d.csv", qa_rows(8)), tmp_path / "run")
    with pytest.raises(TrainError, match="DeepSpeed"):
        train(cfg)
    for var, value, words in [("FSDP_VERSION", "1", "fsdp_version must be 2"),
                              ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
                              ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "SIZE_BASED_WRAP")]:
        with pytest.raises(ValueError, match=words):
            dd.fsdp_settings({var: value})
    settings, notes = dd.fsdp_settings({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert settings["reshard_after_forward"] is False and "every process loads the whole model" in notes[0]
