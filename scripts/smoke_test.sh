#!/usr/bin/env bash
# Sets up sft, writes the built-in demo (tiny model + synthetic chats) and runs the 10-step
# smoke test: 2 CPU processes, or every GPU present. Prints PASS/FAIL per check; exit 0 iff all pass.
# SFT_SKIP_SETUP=1 skips the install step (e.g. on a machine prepared by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SFT_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh trackers
WORK=${SFT_SMOKE_DIR:-$(mktemp -d /tmp/sft_smoke.XXXXXX)}
OUTDIR="$WORK/checkpoints"
python3 -m sft.demo "$WORK/demo"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
NPROC=$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)
rm -rf "$OUTDIR"
set +e
torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m sft.fsdp_sft_trainer \
  data.train_files="$WORK/demo/train.parquet" \
  data.val_files="$WORK/demo/val.parquet" \
  data.multiturn.enable=true \
  data.multiturn.messages_key=messages \
  data.max_length=512 \
  data.truncation=right \
  data.train_batch_size=16 \
  data.micro_batch_size_per_gpu=4 \
  model.partial_pretrain="$WORK/demo/model" \
  model.enable_gradient_checkpointing=true \
  model.strategy=fsdp2 \
  optim.lr=3e-3 \
  optim.lr_warmup_steps_ratio=0.1 \
  optim.clip_grad=1.0 \
  optim.lr_scheduler=cosine \
  trainer.total_training_steps=10 \
  trainer.total_epochs=999 \
  trainer.save_freq=5 \
  trainer.test_freq=5 \
  trainer.resume_mode=disable \
  trainer.logger='["console","file"]' \
  trainer.seed=42 \
  trainer.default_local_dir="$OUTDIR" \
  trainer.checkpoint.save_contents='["model","optimizer","extra","hf_model"]' \
  "$@" 2>&1 | tee "$WORK/train.log"
rc=${PIPESTATUS[0]}
set -e
python3 -m sft.demo.smoke_check "$OUTDIR" "$WORK/train.log" "$rc"
