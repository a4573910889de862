#!/usr/bin/env bash
# Issue 15 on one H200, one device-tool call (~8 min): model families and MoE speed.
#  1. bf16 CUDA equivalence, padded (model's own attention) vs remove-padding (sft varlen: windows,
#     sinks), 1 GPU, 5 steps, for Gemma 3, gpt-oss and Qwen3-MoE shapes (sp=2 needs 2 GPUs: not here);
#  2. Qwen3-30B-A3B shape with MOE_LAYERS (default 6) layers, BATCH x 4096-token samples per step:
#     model.experts_implementation=grouped_mm vs eager (per-expert loop), and the dense Qwen2.5-1.5B shape
#     on the same samples, each in its own process: tokens/s, useful MFU on active parameters, peak memory.
# Results in $OUT (families.json, families.txt, *.log); the table is printed last.
# DRY=1: tiny shapes on CPU (gloo), 2-3 steps: checks the script's logic without a GPU.
# EQ=0: skip part 1 (only the MoE throughput runs).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
W=${W:-/tmp/families}; mkdir -p "$W"
DRY=${DRY:-0}; export DRY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$DRY" = 1 ]; then EQ_LEN=256; SEQ=128; EQ_STEPS=2; SP_STEPS=3; EAGER_STEPS=3; else EQ_LEN=2048; SEQ=4096; EQ_STEPS=5; SP_STEPS=8; EAGER_STEPS=4; fi
export SEQ MOE_LAYERS=${MOE_LAYERS:-$([ "$DRY" = 1 ] && echo 2 || echo 6)}
t0=$(date +%s)
read -r data fixed dense < <(python3 "$(dirname "$0")/gpu_families.py" assets "$W" | tail -1)
echo "assets $(( $(date +%s) - t0 )) s" | tee "$OUT/summary.txt"
train() {  # name overrides...
  local name=$1; shift
  rm -rf "$W/$name"
  timeout ${RUN_TIMEOUT:-300} torchrun --standalone --nproc_per_node=1 -m sft.fsdp_sft_trainer data.multiturn.enable=true \
    trainer.logger='["console","file"]' trainer.checkpoint.save_contents='[]' trainer.resume_mode=disable \
    trainer.default_local_dir="$W/$name" optim.lr=1e-4 "$@" >"$OUT/$name.log" 2>&1
  echo "$name exit $? ($(( $(date +%s) - t0 )) s)" | tee -a "$OUT/summary.txt"
}
for t in $([ "${EQ:-1}" = 0 ] || echo gemma3_text gpt_oss qwen3_moe); do
  EQ=(data.train_files=$data model.partial_pretrain=$W/eq-$t data.max_length=$EQ_LEN data.truncation=right
      data.train_batch_size=8 data.micro_batch_size_per_gpu=4 trainer.total_training_steps=$EQ_STEPS)
  train eq-$t-padded "${EQ[@]}"
  train eq-$t-rmpad "${EQ[@]}" use_remove_padding=true
done
# A3B and the dense 1.5B on the same 4096-token samples, BATCH per step (32: ~131k tokens, like issue 14's
# workload), the token budget chosen by the trainer.
BATCH=${BATCH:-$([ "$DRY" = 1 ] && echo 4 || echo 32)}
for impl in grouped_mm eager dense; do
  steps=$([ $impl = eager ] && echo $EAGER_STEPS || echo $SP_STEPS)
  model=$([ $impl = dense ] && echo "$dense" || echo "$W/a3b")
  name=$([ $impl = dense ] && echo dense-1.5b || echo a3b-$impl)
  train $name data.train_files=$fixed model.partial_pretrain=$model data.max_length=$SEQ data.truncation=right \
    data.train_batch_size=$BATCH use_remove_padding=true trainer.total_training_steps=$steps \
    $([ $impl = dense ] || echo model.experts_implementation=$impl)
done
python3 "$(dirname "$0")/gpu_families.py" report "$W" "$OUT"
