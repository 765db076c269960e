#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py), offline, in one go: <= 8 minutes on one H200.
#   here, once, where PyPI is reachable:   .venv/bin/python bench/gpu.py --fetch-wheels   (or: bash bench/gpu.sh --fetch-wheels)
#   on the GPU machine, bench/wheels carried along:   bash bench/gpu.sh [bench/gpu.py options, e.g. --sizes 135m,1.7b]
# Installs the carried wheels into a private directory with --no-index (nothing is downloaded), runs the benchmark,
# rewrites its section of bench/RESULTS.md and, where $OUT is set (the device tool), copies the results there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    exec "${PYTHON:-.venv/bin/python}" bench/gpu.py --fetch-wheels
fi
PY=${PYTHON:-python3}
SITE=${IMTUNE_GPU_SITE:-/tmp/imtune-gpu-site}
"$PY" bench/gpu.py --check-wheels
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" bench/wheels/*.whl
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import trl, datasets, liger_kernel, imtune" || { echo "bench/gpu.sh: the carried wheels do not import" >&2; exit 2; }
status=0
timeout 470 "$PY" bench/gpu.py "$@" || status=$?
if [[ -n "${OUT:-}" ]]; then
    cp bench/RESULTS.md "$OUT"/ 2>/dev/null || true
    cp bench/gpu_results.json "$OUT"/ 2>/dev/null || true
fi
exit $status
