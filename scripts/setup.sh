#!/usr/bin/env bash
# Installs sft and what it needs into the current Python, from the project's own files.
# torch comes first and only when missing (`pip install torch==2.13.0`, SFT_TORCH_VERSION for another); on a GPU
# host install the CUDA build of torch first. An unpinned torch could pull gigabytes of CUDA packages.
# Usage: bash scripts/setup.sh [extra ...]   (extras: dev, trackers, gpu, fp8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${SFT_TORCH_VERSION:-2.13.0}"
fi
extras=$(IFS=,; echo "${*:-trackers}")
"$PY" -m pip install -q -e ".[${extras}]"
