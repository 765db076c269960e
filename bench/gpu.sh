#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py), offline, in one go, then 1-GPU smoke runs of FSDP and ZeRO-3: <= 13 minutes on one H200.
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
# 1-GPU smoke runs of the sharded launches: FSDP2 (fsdp.yaml) and DeepSpeed ZeRO-3 (deepspeed_zero3.yaml, where it
# is packaged and deepspeed imports): 3 steps of `imtune train` on a tiny model, shard-first loading included.
SMOKE=$(mktemp -d)
"$PY" - "$SMOKE" <<'PYEOF'
import json, sys
sys.path.insert(0, ".")
from tests.tiny import make_tiny_model
make_tiny_model(f"{sys.argv[1]}/model", hidden_size=256, num_layers=4)
row = {"messages": [{"role": "user", "content": "Write a poem about the sea."}, {"role": "assistant", "content": "Waves."}]}
open(f"{sys.argv[1]}/d.jsonl", "w").write((json.dumps(row) + "\n") * 8)
PYEOF
for cfg in fsdp deepspeed_zero3; do
    yaml=src/imtune/accelerate_configs/$cfg.yaml
    if [[ ! -f $yaml ]]; then echo "gpu.sh: $cfg.yaml is not packaged: smoke run skipped" | tee -a "$SMOKE/smoke.txt"; continue; fi
    if [[ $cfg == deepspeed* ]] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
        echo "gpu.sh: deepspeed is not installed: $cfg smoke run skipped" | tee -a "$SMOKE/smoke.txt"; continue
    fi
    if timeout 150 "$PY" -m accelerate.commands.launch --config_file "$yaml" --num_processes 1 -m imtune.cli.main \
        train --model "$SMOKE/model" --data "$SMOKE/d.jsonl" --template chatml --max-length 64 --max-steps 3 \
        --no-progress --no-checkpoints --out "$SMOKE/$cfg" > "$SMOKE/$cfg.log" 2>&1; then
        echo "gpu.sh: $cfg smoke run ok: $(tail -n 1 "$SMOKE/$cfg.log")" | tee -a "$SMOKE/smoke.txt"
    else
        echo "gpu.sh: $cfg smoke run FAILED: $(tail -n 3 "$SMOKE/$cfg.log")" | tee -a "$SMOKE/smoke.txt"; status=1
    fi
done
if [[ -n "${OUT:-}" ]]; then
    cp bench/RESULTS.md "$OUT"/ 2>/dev/null || true
    cp bench/gpu_results.json "$OUT"/ 2>/dev/null || true
    cp "$SMOKE"/smoke.txt "$SMOKE"/*.log "$OUT"/ 2>/dev/null || true
fi
exit $status
