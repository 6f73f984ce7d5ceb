#!/usr/bin/env bash
# Run HERE, before any device time: builds everything the GPU check needs besides the working tree, in .gpu/
# (ignored by git; named in the device call's `carry`):
#   .gpu/wheels/  what the device image lacks, for its Python 3.12 / manylinux x86_64: bitsandbytes (slimmed to
#                 its CPU and CUDA 12.8/13.0/13.2 libraries), pydantic and its needs (same versions as .venv here)
#   .gpu/bundle/  the recipe's training and eval rows with the retrieved article already in each prompt, the travel
#                 recipe, the tokenizer (xz) and meta.json (fingerprint, token-id digests)
# Then prints what a device call would send (must stay under 64 MiB).
#     bash bench/gpu_prepare.sh [CONFIG]            # CONFIG defaults to configs/civil_law.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/civil_law.yaml}
PY=${PYTHON:-.venv/bin/python}
GPU_DIR=${KOTUNE_GPU_DIR:-.gpu}
BNB=${BNB_VERSION:-0.50.2}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$GPU_DIR/wheels"
mkdir -p "$GPU_DIR/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$GPU_DIR/wheels" "bitsandbytes==$BNB" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" \
    "typing-extensions==$(ver typing-extensions)"
"$PY" bench/gpu_check.py slim-wheel "$GPU_DIR"/wheels/bitsandbytes-*.whl
PYTHONPATH=src "$PY" bench/gpu_check.py prepare --config "$CONFIG" --bundle "$GPU_DIR/bundle"
"$PY" bench/gpu_check.py size --carry "$GPU_DIR"
