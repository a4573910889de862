#!/usr/bin/env bash
# The value demo: trains the tiny demo model on its synthetic conversations on CPU (a few
# minutes), exports it, loads the export with transformers and prints the task accuracy of
# greedy answers before and after training, plus the loss curves (curves.png).
# Arguments go to `python -m sft.demo train` (--work DIR, --steps N, --nproc N, ...).
# SFT_SKIP_SETUP=1 skips the install step (e.g. on a machine prepared by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SFT_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh trackers
exec python3 -m sft.demo train "$@"
