#!/usr/bin/env bash
# One call on a GPU machine of the device tool: install the carried wheels, run the GPU tests
# and the smoke test, and leave logs under $OUT. Usage (from the device tool, carry .whl):
#   bash scripts/gpu_check.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"; t=${PIPESTATUS[0]}
SFT_SKIP_SETUP=1 SFT_SMOKE_DIR=/tmp/smoke bash scripts/smoke_test.sh trainer.device=cuda 2>&1 | tee "$OUT/smoke.log"; s=${PIPESTATUS[0]}
cp /tmp/smoke/checkpoints/metrics.jsonl "$OUT/smoke_metrics.jsonl" 2>/dev/null
echo "gpu tests exit $t, smoke test exit $s"
