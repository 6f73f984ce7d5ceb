"""Training on 2 CPU processes (gloo) — DDP under torchrun, FSDP2 and DeepSpeed ZeRO-2/3 under
`accelerate launch` — gives the adapter one process gives on the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, qa_rows, tiny_config, topic_rows, write_csv

from kotune.train import distributed as dd
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
    # One process with an FSDP config would train without FSDP: refused, naming the fix.
    assert "--num_processes 2" in dd.engine_problem(dd.from_env(), "none")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert dd.engine_problem(dd.from_env(), "none") is None


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
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(
        [sys.executable, "-m", *cmd_head, "-m", "kotune", "train", *_sets(cfg), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
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
@pytest.mark.slow  # two processes (torchrun-like, gloo): seconds each, and several
@pytest.mark.parametrize(
    "task,batch_size,accum,steps",
    [
        ("causal-lm", 5, 1, 5),
        ("text-classification", 5, 1, 5),
        ("causal-lm", 6, 1, 3),
        ("text-classification", 6, 2, 3),
    ],
)
def test_two_process_ddp_matches_single_process(gpt2_no_dropout, tmp_path, task, batch_size, accum, steps):
    tiny_gpt2 = gpt2_no_dropout
    rows = topic_rows(24) if task == "text-classification" else qa_rows(24)
    data = write_csv(tmp_path / "d.csv", rows)
    sections = dict(
        model={"task": task},
        lora={"dropout": 0.0},
        data={"batch_size": batch_size},
        memory={"gradient_accumulation_steps": accum},
        training={"max_steps": steps, "save_steps": 100, "learning_rate": 1e-2},
    )
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
    m = re.search(
        r"DistributedDataParallel \(gloo, 2 processes\): all-reduces (\d+) trainable tensors \((\d+) bytes\); "
        r"(\d+) frozen tensors not registered",
        _log(ddp),
    )
    assert m, "the 2-process run did not train through DistributedDataParallel"
    assert int(m[1]) == len(a) and int(m[2]) == 4 * sum(v.numel() for v in a.values()) and int(m[3]) > 0
    from kotune.train.report import read_metrics

    # Metrics come from the global batch (same losses as one process).
    la = [r["loss"] for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-4)
    if task == "text-classification":
        ea = [r["accuracy"] for r in read_metrics(single / "metrics.jsonl") if "accuracy" in r]
        eb = [r["accuracy"] for r in read_metrics(ddp / "metrics.jsonl") if "accuracy" in r]
        assert ea == eb


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process_and_resumes(gpt2_no_dropout, tmp_path):
    """`accelerate launch` with the shipped FSDP config: torch FSDP2 on CPU (gloo), 2 processes."""
    import torch
    from safetensors.torch import load_file

    data = write_csv(tmp_path / "d.csv", qa_rows(24))
    # 4 rows x 2 micro-batches per step; the 5 eval rows make a 1-row eval batch, so one process runs an
    # eval filler (under FSDP every forward gathers parameters, so both processes must run it).
    sections = dict(
        lora={"dropout": 0.0},
        data={"batch_size": 4},
        memory={"gradient_accumulation_steps": 2},
        training={"max_steps": 3, "save_steps": 2, "learning_rate": 1e-2},
    )
    single = train(tiny_config(gpt2_no_dropout, data, tmp_path / "single", **sections))
    cfg = tiny_config(gpt2_no_dropout, data, tmp_path / "fsdp", **sections)
    accelerate = [
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate/fsdp.yaml"),
        "--num_processes",
        "2",
    ]
    _launch(accelerate, cfg)
    fsdp = tmp_path / "fsdp"
    assert "FSDP2 fully_shard (gloo, 2 processes): 2 blocks (GPT2Block) + root" in _log(fsdp)
    worst = _max_diff(_adapter(single), _adapter(fsdp))
    print(f"FSDP: max abs diff single vs 2-process adapter {worst:.2e}")
    assert worst < TOLERANCE, worst
    # The checkpoint is gathered into the single-process format: full weights and optimizer state.
    step2 = "checkpoints/step-0000002"
    assert (
        _max_diff(
            load_file(str(single / step2 / "trainable.safetensors")),
            load_file(str(fsdp / step2 / "trainable.safetensors")),
        )
        < TOLERANCE
    )
    oa, ob = (torch.load(r / step2 / "state.pt", weights_only=True)["optimizer"]["state"] for r in (single, fsdp))
    assert max(float((oa[i][k] - ob[i][k]).abs().max()) for i in oa for k in ("exp_avg", "exp_avg_sq")) < TOLERANCE
    # Resume under FSDP from step 2 (weights and optimizer state sharded again) ends where one process ends.
    import shutil

    shutil.rmtree(fsdp / "checkpoints/step-0000003")
    shutil.rmtree(fsdp / "adapter")
    _launch(accelerate, cfg, "--resume")
    assert _max_diff(_adapter(single), _adapter(fsdp)) < TOLERANCE


def test_unsupported_fsdp_settings_are_refused():
    for var, value, words in [
        ("FSDP_VERSION", "1", "fsdp_version must be 2"),
        ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params"),
        ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "SIZE_BASED_WRAP"),
    ]:
        with pytest.raises(ValueError, match=words):
            dd.fsdp_settings({var: value})
    settings, notes = dd.fsdp_settings(
        {"FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    )
    assert settings["reshard_after_forward"] is False and "every process loads the whole model" in notes[0]


def test_deepspeed_launch_checks(tmp_path, monkeypatch):
    """What kotune accepts from an accelerate DeepSpeed config (no deepspeed needed)."""
    from kotune.train import deepspeed_zero as dz

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = dd.from_env()
    assert d.engine == "deepspeed" and not d.sharded
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    assert "pip install 'kotune[deepspeed]'" in dd.engine_problem(d, "none")
    assert "quantization" in dd.engine_problem(d, "4bit")
    for env, words in [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "zero_stage 1 is not supported"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer to cpu"),
    ]:
        with pytest.raises(ValueError, match=words):
            dz.settings(env)
    zero, extra, notes = dz.settings(
        {
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
            "ACCELERATE_MIXED_PRECISION": "bf16",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
            "ACCELERATE_GRADIENT_CLIPPING": "1.0",
            "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
        },
        accumulation=2,
        max_grad_norm=1.0,
    )
    assert zero == {"stage": 3} and extra == {} and len(notes) == 3  # mixed precision, accumulation, zero3 init
    f = tmp_path / "ds.json"
    f.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "gradient_clipping": 0.5,
                "optimizer": {"type": "AdamW"},
                "bf16": {"enabled": "auto"},
                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
            }
        )
    )
    with pytest.raises(
        ValueError,
        match=r"gradient_clipping is set from training.max_grad_norm.*optimizer is not supported"
        r".*reduce_bucket_size: \"auto\"",
    ):
        dz.settings({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(f)})
    f.write_text(
        json.dumps(
            {
                "gradient_clipping": "auto",
                "steps_per_print": 10,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            }
        )
    )
    zero, extra, _ = dz.settings({"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(f)})
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": 0} and extra == {"steps_per_print": 10}


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (extra: deepspeed)"
)
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_matches_single_process_and_resumes(gpt2_no_dropout, tmp_path, stage):
    """`accelerate launch` with DeepSpeed ZeRO-2 (the shipped config) and ZeRO-3 (a DeepSpeed JSON that
    partitions every parameter, however small), 2 CPU processes (gloo)."""
    import torch
    from safetensors.torch import load_file

    data = write_csv(tmp_path / "d.csv", qa_rows(24))
    # As for FSDP: 2 micro-batches per step and a one-row eval batch (a filler under ZeRO-3). The low
    # max_grad_norm makes clipping (DeepSpeed's, from gradient_clipping) change every step.
    sections = dict(
        lora={"dropout": 0.0},
        data={"batch_size": 4},
        memory={"gradient_accumulation_steps": 2},
        training={"max_steps": 3, "save_steps": 2, "learning_rate": 1e-2, "max_grad_norm": 0.9},
    )
    single = train(tiny_config(gpt2_no_dropout, data, tmp_path / "single", **sections))
    unclipped = train(
        tiny_config(
            gpt2_no_dropout,
            data,
            tmp_path / "unclipped",
            **{**sections, "training": {**sections["training"], "max_grad_norm": 1000.0}},
        )
    )
    clip_effect = _max_diff(_adapter(single), _adapter(unclipped))
    assert clip_effect > 10 * TOLERANCE  # clipping changes the result well beyond the tolerance
    if stage == 2:
        accel_cfg = ROOT / "configs/accelerate/deepspeed_zero2.yaml"
    else:
        (tmp_path / "zero3.json").write_text(
            json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
        )
        accel_cfg = tmp_path / "zero3.yaml"
        accel_cfg.write_text(
            "distributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n"
            f"deepspeed_config:\n  deepspeed_config_file: {tmp_path / 'zero3.json'}\n"
        )
    cfg = tiny_config(gpt2_no_dropout, data, tmp_path / "ds", **sections)
    accelerate = ["accelerate.commands.launch", "--config_file", str(accel_cfg), "--num_processes", "2"]
    _launch(accelerate, cfg)
    ds = tmp_path / "ds"
    # The optimizer is DeepSpeed's ZeRO optimizer around torch's AdamW; under ZeRO-3 (persistence
    # threshold 0) every trainable tensor, the adapter's, is partitioned as a parameter too.
    zopt = "DeepSpeedZeroOptimizer" if stage == 2 else "DeepSpeedZeroOptimizer_Stage3"
    m = re.search(
        rf"DeepSpeed ZeRO-{stage} \(gloo, 2 processes\): {zopt} over torch AdamW; (\d+) trainable tensors, "
        r"(\d+) of them partitioned between forward passes",
        _log(ds),
    )
    assert m, "the 2-process run did not train through DeepSpeed"
    n_adapter = len(_adapter(single))
    assert int(m[1]) == n_adapter and int(m[2]) == (0 if stage == 2 else n_adapter)
    worst = _max_diff(_adapter(single), _adapter(ds))
    print(
        f"ZeRO-{stage}: max abs diff single vs 2-process adapter {worst:.2e} (clipping moves it by {clip_effect:.2e})"
    )
    assert worst < TOLERANCE, worst
    # The checkpoint is gathered into the single-process format: full weights and AdamW state.
    step2 = "checkpoints/step-0000002"
    assert (
        _max_diff(
            load_file(str(single / step2 / "trainable.safetensors")),
            load_file(str(ds / step2 / "trainable.safetensors")),
        )
        < TOLERANCE
    )
    sa, sb = (torch.load(r / step2 / "state.pt", weights_only=True)["optimizer"] for r in (single, ds))
    oa, ob = sa["state"], sb["state"]
    assert oa.keys() == ob.keys() and all(oa[i].keys() == ob[i].keys() and float(ob[i]["step"]) == 2 for i in oa)
    assert max(float((oa[i][k] - ob[i][k]).abs().max()) for i in oa for k in ("exp_avg", "exp_avg_sq")) < TOLERANCE
    ga, gb = sa["param_groups"][0], sb["param_groups"][0]
    assert ga.keys() == gb.keys() and ga["params"] == gb["params"] and gb["lr"] == pytest.approx(ga["lr"])
    # Resume under DeepSpeed from step 2 (weights and AdamW state scattered into ZeRO's partitions)
    # ends where one process ends.
    import shutil

    shutil.rmtree(ds / "checkpoints/step-0000003")
    shutil.rmtree(ds / "adapter")
    _launch(accelerate, cfg, "--resume")
    worst = _max_diff(_adapter(single), _adapter(ds))
    print(f"ZeRO-{stage} resumed from step 2: max abs diff {worst:.2e}")
    assert worst < TOLERANCE, worst
