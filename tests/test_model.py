"""Model loading, padding rules, LoRA targets, merge."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kotune.model import PRESETS, ModelError, add_lora, default_targets, fix_padding, load_run, merge_run, resolve_model


def test_kogpt2_preset_matches_the_seed_setup():
    p = PRESETS["skt/kogpt2-base-v2"]
    assert p.target_modules == ("c_attn", "c_proj") and p.fan_in_fan_out
    assert p.special_tokens == {
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }


def test_pad_equal_to_eos_is_replaced(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.pad_token = tok.eos_token
    fix_padding(tok)
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<unk>"


def test_default_targets_per_architecture(tiny_gpt2, tiny_gemma):
    g = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert default_targets(g, None) == (["c_attn", "c_proj"], True)
    m = AutoModelForCausalLM.from_pretrained(tiny_gemma)
    targets, fifo = default_targets(m, None)
    assert "q_proj" in targets and "down_proj" in targets and not fifo


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_last_layers_adapts_only_the_top_of_the_stack_and_backward_stops_there(tiny_gemma):
    m = AutoModelForCausalLM.from_pretrained(tiny_gemma)  # two layers
    m = add_lora(
        m, r=2, alpha=4, dropout=0, target_modules=["q_proj", "down_proj"], fan_in_fan_out=False, last_layers=1
    )
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trained and all(".layers.1." in n for n in trained)
    seen = []  # layer 0 runs forward but gets no gradient: nothing below layer 1 is trained
    m.base_model.model.model.layers[0].register_full_backward_hook(lambda *a: seen.append(0))
    m.base_model.model.model.layers[1].register_full_backward_hook(lambda *a: seen.append(1))
    ids = torch.tensor([[5, 6, 7, 8]])
    m(input_ids=ids, labels=ids).loss.backward()
    assert seen == [1]


def test_wrong_lora_targets_list_module_names(tiny_gpt2):
    m = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with pytest.raises(ModelError, match="c_attn"):
        add_lora(m, r=2, alpha=4, dropout=0, target_modules=["q_proj"], fan_in_fan_out=False)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from kotune.model import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="hub must be reachable or the model cached"):
        load_tokenizer(resolve_model("kotune-tests/does-not-exist"))


def test_unreachable_hub_switches_to_offline_mode_at_once(monkeypatch, tmp_path):
    """No route to the hub: one quick probe, then offline mode (no 45 s of retries)."""
    import socket

    import huggingface_hub.constants

    from kotune.model import load_tokenizer

    def refuse(*a, **k):
        raise OSError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    resolved = resolve_model("kotune-tests/does-not-exist")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises(ModelError, match="hub must be reachable or the model cached"):
        load_tokenizer(resolved)


def test_merged_logits_equal_base_plus_adapter(any_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    tiny_run = any_run
    out = merge_run(tiny_run, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    cfg_name = load_run(tiny_run, merge=False)[2].model.name
    base = AutoModelForCausalLM.from_pretrained(cfg_name)
    # The adapter must have moved away from identity for this test to mean anything.
    adapter = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0
    with_adapter = PeftModel.from_pretrained(base, str(tiny_run / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(cfg_name).eval()(ids).logits
    assert not torch.allclose(plain, merged(ids).logits, atol=1e-4)


def test_a_thread_can_give_back_its_parallel_workers_and_run_again():
    import torch

    from kotune.memory import release_parallel_threads

    a = torch.randn(256, 256)
    want = a @ a
    assert isinstance(release_parallel_threads(), bool)  # True where torch runs on an OpenMP runtime (Linux wheels)
    assert torch.equal(a @ a, want)  # the team comes back on the next parallel op
