#!/usr/bin/env bash
# kotune GPU check (issue 24): every CUDA path in one short run; writes report.md and report.json to $OUT
# (or --out). On the device machine, after `bash bench/gpu_prepare.sh` here (docs/benchmarks.md, GPU section):
#     bash bench/gpu_check.sh
# Here, without a GPU, the same steps on CPU (quantization and the cap probe say "needs CUDA"):
#     bash bench/gpu_check.sh --cpu [--write-expected]      # the prepared bundle, 30 steps
#     bash bench/gpu_check.sh --cpu --tiny --steps 4        # a tiny model, seconds (tests/test_gpu_check.py)
# Other options: python bench/gpu_check.py run --help
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=${KOTUNE_GPU_DIR:-.gpu}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
cpu=0
for a in "$@"; do [ "$a" = --cpu ] && cpu=1; done
budget=()
if [ "$cpu" = 0 ]; then
    # The device has no network: the wheels that its image lacks travel in $GPU_DIR/wheels (gpu_prepare.sh).
    if compgen -G "$GPU_DIR/wheels/*.whl" >/dev/null; then
        site=/tmp/kotune_gpu_site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$GPU_DIR"/wheels/*.whl || { echo "gpu_check: installing $GPU_DIR/wheels failed" >&2; exit 3; }
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    budget=(--budget-s "${KOTUNE_GPU_BUDGET_S:-360}")  # steps not started by then are reported as skipped
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" bench/gpu_check.py run --bundle "$GPU_DIR/bundle" "${budget[@]}" "$@"
