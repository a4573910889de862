#!/usr/bin/env bash
# One device-tool call on one GPU: the numbers docs/PERFORMANCE.md reports.
#  1. sft.bench on the Qwen2.5-1.5B shape: remove-padding + token budget vs padded (same run);
#  2. a bf16 save / resume / HF export of the 1.5B shape (checkpoint time and size);
#  3. (optional, BENCH_TRL=1) TRL's SFTTrainer on the same model files and data.
# Results and logs land in $OUT. Carry .whl (scripts: ../shared/gpu/fetch_wheels.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
SHAPE=${SHAPE:-qwen2.5-1.5b}
W=/tmp/bench
COMMON=(data.max_length=4096 data.train_batch_size=128 model.enable_gradient_checkpointing=true)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

PART=${PART:-all}  # bench | ckpt | all (each part fits one 10-minute call)
if [ "$PART" != ckpt ]; then
python3 -m sft.bench --shape "$SHAPE" --steps "${STEPS:-4}" --warmup 2 --workdir $W --baseline padded \
  --out "$OUT/bench.json" "${COMMON[@]}" use_remove_padding=true data.max_token_len_per_gpu=${BUDGET:-32768} \
  data.micro_batch_size_per_gpu=4 2>&1 | tee "$OUT/bench.log"
fi
if [ "$PART" != bench ]; then
read -r model data < <(python3 -c "
from pathlib import Path; from sft.bench.assets import ensure_assets
m, d = ensure_assets(Path('$W'), '$SHAPE', 512, 4096, 0); print(m, d)")
ck=(data.train_files="$data" data.multiturn.enable=true model.partial_pretrain="$model" "${COMMON[@]}"
    use_remove_padding=true data.max_token_len_per_gpu=32768 model.fsdp_config.model_dtype=bf16
    trainer.default_local_dir=$W/ckpt trainer.logger='["console","file"]' trainer.save_freq=2 trainer.total_epochs=1
    trainer.checkpoint.save_contents='["model","optimizer","extra","hf_model"]')
torchrun --standalone --nproc_per_node=1 -m sft.fsdp_sft_trainer "${ck[@]}" trainer.total_training_steps=2 \
  trainer.resume_mode=disable 2>&1 | tee "$OUT/ckpt_save.log" | grep -E "step |saved|error"
torchrun --standalone --nproc_per_node=1 -m sft.fsdp_sft_trainer "${ck[@]}" trainer.total_training_steps=3 \
  trainer.resume_mode=auto 2>&1 | tee "$OUT/ckpt_resume.log" | grep -E "step |saved|resumed|error"
du -sh $W/ckpt/global_step_2 $W/ckpt/global_step_2/dcp $W/ckpt/global_step_2/huggingface | tee "$OUT/ckpt_size.txt"
python3 -c "
from transformers import AutoModelForCausalLM; import torch
m = AutoModelForCausalLM.from_pretrained('$W/ckpt/global_step_3/huggingface', dtype=torch.bfloat16)
print('export loads:', type(m).__name__, sum(p.numel() for p in m.parameters()), 'params')" 2>&1 | tail -1 | tee -a "$OUT/ckpt_size.txt"
fi

if [ "${BENCH_TRL:-0}" = 1 ]; then
  python3 -m sft.bench --shape "$SHAPE" --steps "${STEPS:-4}" --warmup 2 --workdir $W --baseline trl \
    --out "$OUT/bench_trl.json" "${COMMON[@]}" use_remove_padding=true data.max_token_len_per_gpu=${BUDGET:-32768} \
    data.micro_batch_size_per_gpu=4 2>&1 | tee "$OUT/bench_trl.log" | tail -15
fi
[ -f "$OUT/bench.log" ] && { echo "--- bench ---"; tail -8 "$OUT/bench.log"; }
