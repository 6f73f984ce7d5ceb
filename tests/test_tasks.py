"""Classification and text2text through the same training loop; predict; metrics; early stopping."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import qa_rows, tiny_config, topic_rows, write_csv

from kotune.tasks import classification_metrics, confusion
from kotune.train import checkpoint as ckpt
from kotune.train import train
from kotune.train.report import read_metrics

CLS = {"task": "text-classification"}


def cls_config(model_dir, data_file, out, **sections):
    # lr 1e-2: the tiny head oscillates at the causal tests' 3e-2.
    sections = {
        **sections,
        "model": {**CLS, **sections.get("model", {})},
        "training": {"learning_rate": 1e-2, **sections.get("training", {})},
    }
    return tiny_config(model_dir, data_file, out, **sections)


def test_metrics_from_confusion_match_hand_count():
    gold = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    cm = confusion(pred, gold, 4)  # label 3 never occurs: it must not drag macro-F1 down
    assert cm.sum() == 6 and cm[0, 1] == 1 and cm[2, 0] == 1
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [2 * 1 / (2 + 2), 2 * 2 / (2 + 3), 2 * 1 / (2 + 1)]  # 2tp / (gold + predicted) per label
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_linear_cross_entropy_matches_full_logits(monkeypatch, softcap, autocast):
    """The fused, chunked LM-head loss gives the loss and gradients of the plain one."""
    import torch.nn.functional as F

    from kotune import tasks

    monkeypatch.setattr(tasks, "CE_CHUNK_ELEMENTS", 7 * 300)  # 7 rows a chunk: several chunks and a short last one
    torch.manual_seed(0)
    h = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    y = torch.randint(0, 300, (30,))
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = tasks.linear_cross_entropy_sum(h, w, y, softcap=softcap)
            else:
                z = (h @ w.T).float()
                loss = F.cross_entropy(torch.tanh(z / softcap) * softcap if softcap else z, y, reduction="sum")
        (0.5 * loss).backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    tol = 2e-2 if autocast else 1e-4
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert torch.allclose(gh1, gh2, atol=tol * gh2.abs().max())
    assert torch.allclose(gw1, gw2, atol=tol * gw2.abs().max())
    with torch.no_grad():  # evaluation takes the loss-only path
        assert torch.allclose(
            tasks.linear_cross_entropy_sum(h, w, y, softcap=softcap), l2 if not autocast else l1, rtol=2e-2
        )


def test_classification_trains_reports_and_predicts(tiny_gpt2, topic_csv, tmp_path):
    out = train(
        cls_config(
            tiny_gpt2,
            topic_csv,
            tmp_path / "run",
            training={"max_steps": 16, "eval_steps": 4},
            memory={"report_steps": 4},
        )
    )
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels == sorted({r["label"] for r in topic_rows()}) and len(labels) == 4
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "accuracy" in r]
    assert len(evals) >= 4 and all(0 <= r["macro_f1"] <= 1 for r in evals)
    assert evals[-1]["accuracy"] >= 0.9, evals  # the label is a word of the text: easy to learn
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    epoch_rows = [r for r in rows if "epoch_train_loss" in r]
    assert epoch_rows and all("rss_mb" in r and "lr" in r and "elapsed_s" in r for r in epoch_rows)
    log_text = next(out.glob("training_*.log")).read_text(encoding="utf-8")
    assert "accuracy" in log_text and "macro-F1" in log_text and "process RSS" in log_text
    assert "epoch " in log_text and "elapsed" in log_text
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    from kotune.predict import predict_file

    inp = write_csv(tmp_path / "inp.csv", topic_rows(8))
    summary = predict_file(out, inp, tmp_path / "pred.jsonl")
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 8 and all(p["prediction"] in labels and 0 < p["score"] <= 1 for p in preds)
    assert summary["scored"] == 8 and summary["accuracy"] >= 0.75


def test_classification_full_fine_tune_and_resume(tiny_gpt2, topic_csv, tmp_path):
    sec = {"lora": {"enabled": "false"}, "training": {"save_total_limit": 5}}
    full = train(cls_config(tiny_gpt2, topic_csv, tmp_path / "full", **sec))
    assert (full / "model" / "model.safetensors").is_file() and not (full / "adapter").exists()
    resumed = train(
        cls_config(tiny_gpt2, topic_csv, tmp_path / "part", **sec),
        resume=str(ckpt.checkpoint_dir(full / "checkpoints", 3)),
    )
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    from kotune.model import load_run

    model, _, cfg = load_run(full)
    assert cfg.model.task == "text-classification" and model.config.num_labels == 4


def test_unknown_eval_label_is_named(tiny_gpt2, tmp_path):
    from kotune.data import DataError

    train_csv = write_csv(tmp_path / "t.csv", topic_rows(16))
    ev = topic_rows(4)
    ev[2]["label"] = "없는분류"
    eval_csv = write_csv(tmp_path / "e.csv", ev)
    with pytest.raises(DataError, match="e.csv:4.*없는분류"):
        train(cls_config(tiny_gpt2, train_csv, tmp_path / "run", data={"eval_file": eval_csv}))


def test_early_stopping_keeps_best_weights(tiny_gpt2, topic_csv, tmp_path):
    out = train(
        cls_config(
            tiny_gpt2,
            topic_csv,
            tmp_path / "run",
            training={
                "max_steps": 40,
                "eval_steps": 1,
                "early_stopping_metric": "accuracy",
                "early_stopping_patience": 2,
            },
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "accuracy" in r and "epoch_train_loss" not in r]
    last = evals[-1]["step"]
    assert last < 40, "accuracy cannot rise forever: it must have stopped early"
    best = max(r["accuracy"] for r in evals)
    first_best = next(r["step"] for r in evals if r["accuracy"] == best)
    assert last == first_best + 2
    assert "kept the best weights: step %d" % first_best in next(out.glob("training_*.log")).read_text(encoding="utf-8")


def test_text2text_trains_and_predicts(tiny_t5, qa_csv, tmp_path):
    # Full fine-tune: LoRA on a random tiny T5 (frozen embeddings and head) barely moves in a few steps.
    out = train(
        tiny_config(
            tiny_t5,
            qa_csv,
            tmp_path / "run",
            model={"task": "text2text"},
            lora={"enabled": "false"},
            training={"max_steps": 24, "learning_rate": 3e-3},
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-4:]) < sum(losses[:4]) * 0.85, losses
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r and "epoch_train_loss" not in r]
    assert evals[-1] < evals[0]
    from kotune.predict import predict_file

    inp = tmp_path / "q.jsonl"
    inp.write_text(
        "".join(json.dumps({"question": r["question"]}, ensure_ascii=False) + "\n" for r in qa_rows(3)),
        encoding="utf-8",
    )
    summary = predict_file(out, inp)
    assert summary["records"] == 3 and all(isinstance(r["prediction"], str) for r in summary["rows"])


def test_text2text_lora_adapter_loads(tiny_t5, qa_csv, tmp_path):
    out = train(tiny_config(tiny_t5, qa_csv, tmp_path / "run", model={"task": "text2text"}, training={"max_steps": 2}))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and set(cfg["target_modules"]) == {"q", "k", "v", "o"}
    from kotune.model import load_run

    model, _, _ = load_run(out)
    assert type(model).__name__ == "T5ForConditionalGeneration"


def test_text2text_refuses_a_decoder_only_model(tiny_gpt2, qa_csv, tmp_path):
    from kotune.model import ModelError

    with pytest.raises(ModelError, match="encoder-decoder"):
        train(tiny_config(tiny_gpt2, qa_csv, tmp_path / "run", model={"task": "text2text"}))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantization_on_cpu_is_a_clear_error(tiny_gpt2, qa_csv, tmp_path, bits):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU message")
    from kotune.model import ModelError

    with pytest.raises(ModelError, match=r"CUDA GPU.*model\.quantization: none"):
        train(tiny_config(tiny_gpt2, qa_csv, tmp_path / "run", model={"quantization": bits}))
    args = [
        sys.executable,
        "-m",
        "kotune",
        "train",
        "--set",
        f"model.name={tiny_gpt2}",
        "--csv_path",
        str(qa_csv),
        "--output_dir",
        str(tmp_path / "cli"),
        "--set",
        f"model.quantization={bits}",
    ]
    res = subprocess.run(args, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "quantization: none" in res.stderr, res.stderr


def test_chat_refuses_a_classification_run(tiny_gpt2, topic_csv, tmp_path):
    from kotune.infer.generate import Chatbot
    from kotune.model import ModelError

    out = train(cls_config(tiny_gpt2, topic_csv, tmp_path / "run", training={"max_steps": 1}))
    with pytest.raises(ModelError, match="kotune predict"):
        Chatbot.from_run(out)


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_bf16_training_with_memory_cap(tiny_gpt2, topic_csv, tmp_path):
    out = train(
        cls_config(
            tiny_gpt2,
            topic_csv,
            tmp_path / "run",
            training={"max_steps": 4},
            memory={"mixed_precision": "bf16", "max_gpu_memory_usage": 0.5, "empty_cache_freq": 2},
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert all("gpu_allocated_mb" in r for r in rows if "loss" in r)
    assert "capped at 50%" in next(out.glob("training_*.log")).read_text(encoding="utf-8")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_cuda_qlora(tiny_gemma, qa_csv, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    out = train(
        tiny_config(
            tiny_gemma,
            qa_csv,
            tmp_path / "run",
            model={"quantization": bits},
            training={"max_steps": 6},
            memory={"mixed_precision": "bf16"},
        )
    )
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(x == x for x in losses) and (out / "adapter" / "adapter_model.safetensors").is_file()
