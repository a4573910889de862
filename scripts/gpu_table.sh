#!/usr/bin/env bash
# One device-tool call on one GPU: the table of docs/PERFORMANCE.md. For each shape (SHAPES), sft with
# its defaults (fast path: remove-padding, token budget, Liger when installed) against TRL's SFTTrainer
# (best of sdpa/flex_attention) and against our own padded mode, same model files, data, global batch.
# Results: $OUT/<shape>_<baseline>.json and .log. Carry .whl (trl, datasets: ../shared/gpu/fetch_wheels.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for shape in ${SHAPES:-qwen2.5-1.5b qwen2.5-0.5b}; do
  for base in ${BASELINES:-trl padded}; do
    timeout 400 python3 -m sft.bench --shape $shape --steps ${STEPS:-3} --warmup 2 --workdir /tmp/table --baseline $base \
      data.max_length=4096 data.train_batch_size=128 use_remove_padding=true data.max_token_len_per_gpu=${BUDGET:-32768} \
      --out "$OUT/${shape}_$base.json" >"$OUT/${shape}_$base.log" 2>&1
    echo "== $shape vs $base (exit $?)"; grep -A4 "^run " "$OUT/${shape}_$base.log" | grep -v "^{"
  done
done
