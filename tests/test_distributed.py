"""Data-parallel training: 2 CPU processes (gloo) under torchrun give the adapter one process gives on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, qa_rows, tiny_config, topic_rows, write_csv
from kotune import distributed as dd
from kotune.train import train

# Summing gradients over processes changes only the order of float additions (and the
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
    assert dd.from_env() == dd.Dist(rank=3, world=4, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dd.from_env().enabled
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert dd.sharding_engine_requested() == "FSDP"


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


@pytest.mark.parametrize("task", ["causal-lm", "text-classification"])
def test_two_process_ddp_matches_single_process(gpt2_no_dropout, tmp_path, task):
    tiny_gpt2 = gpt2_no_dropout
    rows = topic_rows(24) if task == "text-classification" else qa_rows(24)
    data = write_csv(tmp_path / "d.csv", rows)
    # 5 rows per global batch: one process gets 3 rows, the other 2; the epoch's last batch is short.
    sections = dict(model={"task": task}, lora={"dropout": 0.0}, data={"batch_size": 5},
                    training={"max_steps": 5, "save_steps": 100, "learning_rate": 1e-2})
    single = train(tiny_config(tiny_gpt2, data, tmp_path / "single", **sections))
    cfg = tiny_config(tiny_gpt2, data, tmp_path / "ddp", **sections)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kotune", "train",
           *_sets(cfg)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ddp = tmp_path / "ddp"
    a, b = _adapter(single), _adapter(ddp)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{task}: max abs diff single vs 2-process adapter {worst:.2e}")
    assert worst < TOLERANCE, worst
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the comparison is not between two untrained adapters
    # Rank 0 alone writes: one log file, and metrics from the global batch (same losses as one process).
    assert len(list(ddp.glob("training_*.log"))) == 1
    from kotune.report import read_metrics

    la = [r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-4)
    if task == "text-classification":
        ea = [r["accuracy"] for r in read_metrics(single / "metrics.jsonl") if "accuracy" in r]
        eb = [r["accuracy"] for r in read_metrics(ddp / "metrics.jsonl") if "accuracy" in r]
        assert ea == eb
