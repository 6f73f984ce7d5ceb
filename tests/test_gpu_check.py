"""bench/gpu_check.sh: the GPU check's dry run (--cpu --tiny) end to end, and its parts that only the GPU run
would otherwise exercise (the travel rows of a grounded recipe, the slimmed wheel, the CUDA report logic)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, qa_rows, write_csv

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

GROUNDED = "참고 조문:\n{context}\n질문: {question}\n답변: {answer}"


def tiny_recipe(tmp_path: Path, template: str = "질문: {question}\n답변: {answer}", retrieval: bool = False) -> Path:
    data = write_csv(tmp_path / "qa.csv", qa_rows(24))
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(
        f"""model:
  name: gemma3-270m
  output_dir: {tmp_path / "unused"}
data:
  train_file: {data}
  template: {json.dumps(template, ensure_ascii=False)}
  max_length: 128
  eval_ratio: 0.2
  batch_size: 4
lora:
  r: 4
  alpha: 8
  dropout: 0.0
training:
  learning_rate: 3.0e-2
  warmup_ratio: 0
generation:
  max_new_tokens: 12
retrieval:
  enabled: {str(retrieval).lower()}
""",
        encoding="utf-8",
    )
    return cfg


def _t4(including_emulation=True):
    """torch.cuda.is_bf16_supported on a T4 or V100: bf16 tensors can be made (emulation), no native bf16."""
    return including_emulation


def test_auto_precision_on_a_gpu_with_emulated_bf16_only_is_fp16(monkeypatch):
    """Found reading the CUDA paths: `torch.cuda.is_bf16_supported()` is True on a T4 (emulation), so `auto`
    chose bf16 autocast there, and bf16 compute for 4-bit QLoRA. Only native bf16 (Ampere on) counts now."""
    import torch

    from kotune.infer.fastgen import resolve_precision
    from kotune.memory import choose_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _t4)
    assert choose_precision("auto", "cuda:0") == "float16"
    assert choose_precision("bf16", "cuda:0") == "bfloat16"  # asked for by name: still honoured
    assert resolve_precision("auto", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert choose_precision("auto", "cuda:0") == "bfloat16" and resolve_precision("auto", "cuda") == "bfloat16"


def test_qlora_compute_dtype_on_a_gpu_with_emulated_bf16_only(monkeypatch):
    import torch

    from kotune.model import _bnb_config

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _t4)
    assert _bnb_config("4bit").bnb_4bit_compute_dtype == torch.float16


def test_travel_template_puts_the_rendered_prompt_back_unchanged():
    template, sep = gpu_check.travel_template(GROUNDED)
    assert (template, sep) == ("{question}\n답변: {answer}", "\n답변: ")
    q = gpu_check.travel_question(GROUNDED, sep, "전세권이란?", "민법 제303조(전세권의 내용) 전세금을 지급하고…")
    assert q == "참고 조문:\n민법 제303조(전세권의 내용) 전세금을 지급하고…\n질문: 전세권이란?"
    assert (
        template.replace("{question}", q).split("{answer}")[0]
        == GROUNDED.replace("{context}", "민법 제303조(전세권의 내용) 전세금을 지급하고…")
        .replace("{question}", "전세권이란?")
        .split("{answer}")[0]
    )


def test_prepare_carries_the_retrieved_context_and_the_same_token_ids(tmp_path, monkeypatch):
    """A grounded recipe: the bundle's rows hold each prompt's article, its recipe needs no retrieval, and
    prepare itself checks that the travel rows encode to the recipe's token ids (it raises otherwise)."""
    import kotune.prepare as kp

    class Contexts:  # a grounding stand-in: the bundle must carry whatever contexts the grounding gave
        def __init__(self, retrieval, train_ex, eval_ex, seed):
            self.train_contexts = [f"민법 제{300 + i}조 조문 {i}" for i in range(len(train_ex))]
            self.eval_contexts = [f"주택임대차보호법 제{i}조 조문" for i in range(len(eval_ex))]

    monkeypatch.setattr(kp, "for_training", Contexts)
    bundle = tmp_path / "bundle"
    gpu_check.cmd_prepare(
        argparse.Namespace(config=tiny_recipe(tmp_path, GROUNDED, retrieval=True), bundle=bundle, tiny=True)
    )
    meta = json.loads((bundle / "meta.json").read_text(encoding="utf-8"))
    rows = [json.loads(x) for x in (bundle / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert meta["rows"]["train"] == len(rows) == 19 and meta["rows"]["eval"] == 5
    assert rows[0]["question"].startswith("참고 조문:\n민법 제300조 조문 0\n질문: ")
    recipe = (bundle / "recipe.yaml").read_text(encoding="utf-8")
    assert "enabled: false" in recipe and "{context}" not in recipe


def test_slim_wheel_drops_libraries_and_their_record_lines(tmp_path):
    whl = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda118.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_rocm64.so",
    ]
    with zipfile.ZipFile(whl, "w") as z:
        for n in names:
            z.writestr(n, b"x" * 100)
        z.writestr(
            "bitsandbytes-0.50.2.dist-info/RECORD",
            "".join(f"{n},sha256=abc,100\n" for n in names) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n",
        )
    gpu_check.cmd_slim_wheel(argparse.Namespace(wheel=str(whl), keep=["cpu", "cuda130"]))
    with zipfile.ZipFile(whl) as z:
        kept = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert (
        "bitsandbytes/libbitsandbytes_cuda118.so" not in kept and "bitsandbytes/libbitsandbytes_rocm64.so" not in kept
    )
    assert {
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
    } <= kept
    assert "cuda118" not in record and "cuda130" in record


def _canned_train(device="cuda", eval_loss=2.0, cap_mib=40000, reserved=3000, **kw):
    return {
        "ok": True,
        "device": device,
        "quantization": "none",
        "mixed_precision": "bf16",
        "run": "/nonexistent",
        "steps": 30,
        "last_step": 30,
        "losses": [3.0] * 30,
        "eval_loss": eval_loss,
        "tokens_per_s": 9000.0,
        "tokens_per_s_median_step": 9500.0,
        "step_s_median": 0.2,
        "first_step_s": 2.0,
        "wall_s": 20.0,
        "peak_allocated_mib": 2500,
        "peak_reserved_mib": reserved,
        "total_mib": 80000,
        "cap_mib": cap_mib,
        "cap_honoured": reserved <= cap_mib,
        "cap_logged": True,
        "cap_fraction": 0.5,
        **kw,
    }


def test_cuda_report_logic_with_canned_worker_results(tmp_path):
    """What the orchestrator does with GPU results (cap, OOM probe, reference, engine rows, report), without a GPU."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    meta = {
        "fingerprint": "f00d",
        "source_config": "configs/x.yaml",
        "tokens_sha256": {"train": "t", "eval": "e"},
        "rows": {"train_encoded": 765, "eval_encoded": 85},
        "token_lengths": {"p50": 200, "max": 256},
        "init_seed": 1,
    }
    (bundle / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    expected = tmp_path / "expected.json"
    expected.write_text(
        json.dumps(
            {
                "references": {
                    "f00d": {
                        "30": {
                            "eval_loss": 2.02,
                            "losses": [3.01] * 30,
                            "weights_sha256": "w",
                            "tokens_sha256": {"train": "t", "eval": "e"},
                            "host": "cpu",
                            "measured": "d",
                            "mixed_precision": "bf16",
                            "wall_s": 100.0,
                        }
                    }
                }
            }
        ),
        encoding="utf-8",
    )
    args = argparse.Namespace(
        out=str(tmp_path / "out"),
        work=str(tmp_path / "work"),
        bundle=str(bundle),
        cpu=False,
        tiny=False,
        steps=30,
        cap=0.5,
        probe_cap_mib=512,
        gen_tokens=8,
        gen_prompts=2,
        budget_s=None,
        skip=["pytest"],
        expected=str(expected),
        write_expected=False,
        config="",
    )
    check = gpu_check.Check(args)
    check.r["versions"] = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_mib": 81559}
    check.r["model"] = {"weights_sha256": "w"}
    canned = {
        "train_bf16": _canned_train(tokens_sha256={"train": "t", "eval": "e"}),
        "train_fp16": _canned_train(eval_loss=2.1, reserved_mib_after_release=900, reserved_mib_other_steps=3000),
        "train_4bit": _canned_train(reserved=50000),  # over the cap: must fail
        "train_8bit": {"ok": False, "error": "RuntimeError: CUDA error: no kernel image"},
        "train_cap_probe": {
            "ok": False,
            "oom": True,
            "error": "OutOfMemoryError: CUDA out of memory",
            "free_mib_at_oom": 79000,
        },
        "generate": {
            "ok": True,
            "max_new_tokens": 8,
            "rows": [
                {
                    "precision": "bfloat16",
                    "requested": "auto",
                    "batch": 1,
                    "prompts": 2,
                    "load_s": 1.0,
                    "fast_tok_s": 90.0,
                    "hf_tok_s": 40.0,
                    "same_rows": 1,
                    "first_divergence": [None, 5],
                    "sample": "x",
                },
                {
                    "precision": "float32",
                    "requested": "float32",
                    "batch": 8,
                    "prompts": 8,
                    "load_s": 1.0,
                    "fast_tok_s": 500.0,
                    "hf_tok_s": 300.0,
                    "same_rows": 8,
                    "first_divergence": [None] * 8,
                    "sample": "x",
                },
            ],
        },
    }
    seen = []

    def worker(kind, spec, name, timeout, cpu=False):
        seen.append((name, spec))
        return dict(canned[name])

    check.worker = worker
    check.training()
    check.generation()
    results = {c["check"]: c["ok"] for c in check.r["checks"]}
    assert results["train bf16"] and results["cap honoured (bf16)"] and results["eval loss vs CPU"]
    assert results["cap honoured (4bit)"] is False and results["train 8bit"] is False
    assert results["cap enforced (512 MiB)"] is True
    assert results["fast engine = HF generate (bfloat16, batch 1)"] is None  # a bf16 near-tie is reported, not failed
    assert results["fast engine = HF generate (float32, batch 8)"] is True
    probe = dict(seen)["train_cap_probe"]["sets"]
    assert f"memory.max_gpu_memory_usage={round(512 / 81559, 5)}" in probe
    assert "model.quantization=4bit" in dict(seen)["train_4bit"]["sets"]
    check.save()
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "NVIDIA H100" in md and "**FAIL**" in md and "reserved 900 MiB right after" in md and "-0.99 %" in md


@pytest.mark.slow  # the whole check on CPU in subprocesses: about half a minute
def test_cpu_dry_run_end_to_end(tmp_path):
    """`bench/gpu_check.sh --cpu --tiny`: every step runs on CPU (CUDA-only ones say so), report and reference
    written."""
    out, expected = tmp_path / "out", tmp_path / "expected.json"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "gpu_check.sh"),
            "--cpu",
            "--tiny",
            "--config",
            str(tiny_recipe(tmp_path)),
            "--steps",
            "4",
            "--gen-tokens",
            "6",
            "--gen-prompts",
            "2",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--write-expected",
            "--expected",
            str(expected),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    checks = {c["check"]: c for c in report["checks"]}
    assert report["mode"] == "cpu" and report["train"]["bf16"]["device"] == "cpu"
    assert checks["train bf16"]["ok"] and checks["resume on CPU"]["ok"]
    for name in ("train fp16", "train 4bit", "train 8bit", "cap enforced"):
        assert checks[name]["ok"] is None and "needs CUDA" in checks[name]["detail"], checks[name]
    assert "CUDA GPU" in checks["train 4bit"]["detail"]  # kotune's own message
    assert checks["pytest -m cuda"]["ok"] is None and "skipped" in checks["pytest -m cuda"]["detail"]
    engine = [c for name, c in checks.items() if name.startswith("fast engine")]
    assert len(engine) == 4 and all(c["ok"] for c in engine)
    assert all(a["new_tokens"] > 0 for a in report["resume"]["answers"])
    ref = json.loads(expected.read_text(encoding="utf-8"))["references"][report["bundle"]["fingerprint"]]["4"]
    assert ref["eval_loss"] == report["train"]["bf16"]["eval_loss"]
    assert "## Training" in (out / "report.md").read_text(encoding="utf-8")


def test_steps_past_the_budget_are_reported_as_skipped(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "meta.json").write_text(
        json.dumps({"fingerprint": "f", "source_config": "c", "tokens_sha256": {}}), encoding="utf-8"
    )
    args = argparse.Namespace(
        out=str(tmp_path / "out"),
        work=str(tmp_path / "work"),
        bundle=str(bundle),
        cpu=False,
        tiny=False,
        steps=30,
        cap=0.25,
        probe_cap_mib=512,
        gen_tokens=8,
        gen_prompts=2,
        budget_s=-1.0,
        skip=[],
        expected=str(tmp_path / "none.json"),
        write_expected=False,
        config="",
    )
    check = gpu_check.Check(args)
    check.r["versions"], check.r["model"] = {"gpu_memory_mib": 81559}, {"weights_sha256": "w"}
    check.training()
    check.generation()
    check.save()
    assert check.r["checks"] and all(
        c["ok"] is None for c in check.r["checks"] if c["check"].startswith(("train", "cap enforced"))
    )
    assert (tmp_path / "out" / "report.md").is_file() and "time budget" in (tmp_path / "out" / "report.md").read_text(
        encoding="utf-8"
    )
