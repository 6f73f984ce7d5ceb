"""Training on tiny models: falling loss, run folder, exact resume, sparse LM-head loss."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import qa_rows, tiny_config, write_csv

from kotune.train import answer_loss_sum, epoch_batches, lr_factor, train
from kotune.train import checkpoint as ckpt
from kotune.train.report import read_metrics


@pytest.fixture(params=["tiny_gpt2", "tiny_gemma"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


def test_trains_with_falling_loss_and_writes_run_folder(tiny_model, qa_csv, tmp_path):
    cfg = tiny_config(tiny_model, qa_csv, tmp_path / "run", training={"max_steps": 24})
    out = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 * 0.85, losses
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) >= 3 and evals[-1] < evals[0], evals
    for name in (
        "config.yaml",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    assert list(out.glob("training_*.log"))
    assert (
        not list(out.rglob("*.bin"))
        and not list(out.rglob("*.pt"))
        or all(p.name == "state.pt" for p in out.rglob("*.pt"))
    )


def test_adapter_loads_with_plain_peft(tiny_gpt2, qa_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train(tiny_config(tiny_gpt2, qa_csv, tmp_path / "run", training={"max_steps": 2}))
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_resume_matches_uninterrupted_run(tiny_model, qa_csv, tmp_path):
    full = train(tiny_config(tiny_model, qa_csv, tmp_path / "full", training={"save_total_limit": 5}))
    # Resume a fresh run folder from the step-3 checkpoint of the full run.
    part = tiny_config(tiny_model, qa_csv, tmp_path / "part")
    resumed = train(part, resume=str(ckpt.checkpoint_dir(full / "checkpoints", 3)))
    a, b = _adapter(full), _adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_refuses_to_mix_runs_without_resume_or_overwrite(tiny_gpt2, qa_csv, tmp_path):
    from kotune.train import TrainError

    cfg = tiny_config(tiny_gpt2, qa_csv, tmp_path / "run", training={"max_steps": 1})
    train(cfg)
    with pytest.raises(TrainError, match="--resume"):
        train(cfg)
    train(cfg, overwrite=True)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_gemma"])
def test_sparse_lm_head_loss_equals_full_forward(fixture, request, qa_csv, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.prompt import collate, encode_example

    folder = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    encs = [
        encode_example(tok, "질문: {question}\n답변: {answer}", r["question"], r["answer"], tok.eos_token_id)
        for r in qa_rows(3)
    ]
    batch = collate(encs, tok.pad_token_id)
    with torch.no_grad():
        s, n = answer_loss_sum(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-4)


def test_gradient_accumulation_equals_large_batch(tiny_gpt2):
    # One batch of 8 must give the same gradient as 4 uneven micro-batches of 2:
    # the loss is averaged over all trained tokens of the step, not per micro-batch.
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kotune.model import add_lora
    from kotune.prompt import collate, encode_example
    from kotune.train import accumulate_gradients
    from kotune.train.distributed import task_loss

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    rows = qa_rows(8)
    encs = [
        encode_example(
            tok, "질문: {question}\n답변: {answer}", r["question"], r["answer"] + " 추가" * (3 * i), tok.eos_token_id
        )
        for i, r in enumerate(rows)
    ]
    torch.manual_seed(0)
    model = add_lora(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2),
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # non-zero B so every LoRA weight gets a gradient

    runner = task_loss("causal-lm", model)

    def grads(batches):
        model.zero_grad()
        loss, n_tok, _ = accumulate_gradients(runner, batches, "cpu", nullcontext)
        return loss / n_tok, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    big_loss, big = grads([collate(encs, tok.pad_token_id)])
    small_loss, small = grads([collate(encs[k : k + 2], tok.pad_token_id) for k in range(0, 8, 2)])
    assert big_loss == pytest.approx(small_loss, rel=1e-5)
    for n in big:
        torch.testing.assert_close(big[n], small[n], rtol=1e-4, atol=1e-7)
    # A per-micro-batch mean (the common mistake) would differ here.
    naive = (
        sum(
            accumulate_gradients(runner, [collate(encs[k : k + 2], tok.pad_token_id)], "cpu", nullcontext)[0]
            / accumulate_gradients(runner, [collate(encs[k : k + 2], tok.pad_token_id)], "cpu", nullcontext)[1]
            for k in range(0, 8, 2)
        )
        / 4
    )
    assert abs(naive - big_loss) > 1e-3


def test_epoch_batches_deterministic_and_complete():
    lengths = [5, 9, 3, 7, 2, 8, 6, 1, 4]
    b1 = epoch_batches(lengths, 2, seed=1, epoch=0, group_by_length=True)
    assert b1 == epoch_batches(lengths, 2, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in b1 for i in b) == list(range(9))
    assert b1 != epoch_batches(lengths, 2, seed=1, epoch=1, group_by_length=True)


def test_split_by_tokens_keeps_rows_in_order_within_the_budget():
    from kotune.prepare import split_by_tokens

    lengths = [30, 30, 20, 20, 10, 10, 90]
    assert split_by_tokens([0, 1, 2, 3, 4, 5], lengths, None) == [[0, 1, 2, 3, 4, 5]]
    assert split_by_tokens([0, 1, 2, 3, 4, 5], lengths, 60) == [[0, 1], [2, 3, 4], [5]]
    assert split_by_tokens([6, 4], lengths, 60) == [[6], [4]]  # a row over the budget stands alone
    assert split_by_tokens([4, 5, 2], lengths, 1000) == [[4, 5, 2]]


def test_max_batch_tokens_splits_a_step_without_changing_its_loss(tiny_gemma, qa_csv, tmp_path, monkeypatch):
    """Splitting the long batches lowers peak memory only: every row still counts, and the step's loss (and so its
    gradient, test_gradient_accumulation_equals_large_batch) is normalised by the step's trained tokens. (Gemma: no
    dropout in the base model, whose random masks would differ with the batch shapes.)"""
    from kotune.train import steps

    parts = []
    real = steps.split_by_tokens
    monkeypatch.setattr(steps, "split_by_tokens", lambda *a: parts.append(real(*a)) or parts[-1])
    common = dict(training={"max_steps": 1, "logging_steps": 1}, lora={"dropout": 0})  # no random masks to differ
    whole = train(tiny_config(tiny_gemma, qa_csv, tmp_path / "whole", data={"batch_size": 8}, **common))
    split = train(
        tiny_config(tiny_gemma, qa_csv, tmp_path / "split", data={"batch_size": 8, "max_batch_tokens": 120}, **common)
    )
    assert [len(p) for p in parts[0]] == [8] and len(parts[1]) > 1 and sum(map(len, parts[1])) == 8
    loss = [next(r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r) for out in (whole, split)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)


def test_checkpoint_ignores_half_written_folder(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 2, {"w": torch.ones(2)}, {"step": 2}, keep=3)
    (root / ".tmp-step-0000004-123").mkdir()  # a save killed before its rename
    (root / "step-0000005").mkdir()  # a folder without state: never taken for a checkpoint
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000002"]
    for s in (3, 4, 6):
        ckpt.save_checkpoint(root, s, {"w": torch.ones(2) * s}, {"step": s}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000004", "step-0000006"]
    assert not list(root.glob(".tmp-*"))


def test_ctrl_c_writes_checkpoint_and_resume_finishes(tiny_gpt2, tmp_path):
    data = write_csv(tmp_path / "qa.csv", qa_rows(64))
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "kotune",
        "train",
        "--set",
        f"model.name={tiny_gpt2}",
        "--output_dir",
        str(out),
        "--csv_path",
        str(data),
        "--max_steps",
        "400",
        "--set",
        "training.save_steps=1000",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "data.batch_size=2",
        "--set",
        "memory.mixed_precision=no",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    # Until the first logged step (logging_steps 5): the loop is running, with hundreds of steps to go.
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text(encoding="utf-8").strip()):
        time.sleep(0.1)
    proc.send_signal(2)  # SIGINT, as Ctrl+C
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "checkpoint saved" in output
    found = ckpt.list_checkpoints(out / "checkpoints")
    assert found
    step = int(found[-1].name.split("-")[1])
    assert 0 < step < 400
    # The resume reads only what the interrupted process left on disk, so it runs here: a second process would spend
    # most of its time importing torch.
    from typer.testing import CliRunner

    from kotune.cli import _normalise_argv, app

    done = CliRunner().invoke(app, _normalise_argv(args[3:] + ["--resume", "--max_steps", str(step + 2)]))
    assert done.exit_code == 0, done.output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 2


def test_tensorboard_option(tiny_gpt2, qa_csv, tmp_path):
    from kotune.train import TrainError

    cfg = tiny_config(tiny_gpt2, qa_csv, tmp_path / "run", training={"max_steps": 2}, logging={"tensorboard": "true"})
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(TrainError, match=r"kotune\[tensorboard\]"):
            train(cfg)
        return
    out = train(cfg)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_too_long_rows_dropped_with_count_or_refused(tiny_gpt2, tmp_path):
    from kotune.data import DataError

    rows = qa_rows(12)
    rows[3]["answer"] = "아주 긴 답변입니다. " * 40
    data = write_csv(tmp_path / "qa.csv", rows)
    out = train(tiny_config(tiny_gpt2, data, tmp_path / "run", training={"max_steps": 1}))
    log_text = next(out.glob("training_*.log")).read_text(encoding="utf-8")
    assert "too long (drop)" in log_text and "qa.csv:5" in log_text
    with pytest.raises(DataError, match="qa.csv:5.*max_length"):
        train(tiny_config(tiny_gpt2, data, tmp_path / "run2", training={"max_steps": 1}, data={"too_long": "error"}))


def test_early_stop_keeps_the_best_weights_and_survives_a_checkpoint_round_trip():
    import torch

    from kotune.train.early import EarlyStop

    e = EarlyStop("eval_loss", patience=2)
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.7), (4, 1.6)):
        e.update({"eval_loss": loss}, step, {"w": torch.tensor([float(step)])})
    assert e.stopped and (e.best, e.best_step, e.bad) == (1.5, 2, 2) and e.weights["w"].item() == 2.0
    again = EarlyStop("eval_loss", patience=2)
    again.restore(e.state())  # what a checkpoint holds, a plain dict
    assert again == e
    old = EarlyStop("eval_accuracy", patience=3)
    old.restore({"best": 0.5, "best_step": 4, "bad": 1, "stopped": False, "weights": None})  # a pre-class checkpoint
    old.update({"eval_accuracy": 0.6}, 6, {"w": torch.zeros(1)})
    assert (old.best, old.best_step, old.bad) == (0.6, 6, 0)  # higher is better for accuracy
    EarlyStop(None, patience=1).update({"eval_loss": 9.0}, 1, {})  # no metric: nothing to do
