#!/usr/bin/env bash
# Production launch of sft (the command our users ran with verl's fsdp_sft_trainer).
# Paths, GPU count and the main hyper-parameters come from environment variables; any
# further Hydra override is passed through:  bash scripts/run_sft.sh optim.lr=1e-5 ...
# Multi-node: set NNODES, NODE_RANK and RDZV_ENDPOINT=host:port on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
# Fewer out-of-memory failures from fragmentation when packed micro-batches change shape every step.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
NNODES=${NNODES:-1}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to a local Hugging Face model folder}
TRAIN_FILES=${TRAIN_FILES:?set TRAIN_FILES to a parquet file (or a list: [a.parquet,b.parquet])}
VAL_FILES=${VAL_FILES:-null}
SAVE_DIR=${SAVE_DIR:-checkpoints/${PROJECT_NAME:-sft}/${EXPERIMENT_NAME:-run}}
MAX_LENGTH=${MAX_LENGTH:-4096}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}
# A cap on the token budget per GPU of one packed micro-batch (remove-padding). Empty: the trainer
# chooses the budget from the model shape and free memory (at least MICRO_BATCH_SIZE x MAX_LENGTH).
MAX_TOKEN_LEN=${MAX_TOKEN_LEN:-}
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-2}
SP_SIZE=${SP_SIZE:-2}
REMOVE_PADDING=${REMOVE_PADDING:-true}
# fp32 master weights: bf16 ones lose AdamW's small updates (README, model.fsdp_config.model_dtype).
MODEL_DTYPE=${MODEL_DTYPE:-fp32}
# Code shipped inside the model folder runs only when asked for (README, Security).
TRUST_REMOTE_CODE=${TRUST_REMOTE_CODE:-false}
LOGGER=${LOGGER:-'["console","wandb"]'}

if [ "$NNODES" -gt 1 ]; then
  launch=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}")
else
  launch=(--standalone --nnodes=1)
fi

# --max-restarts: when a worker dies, torchrun restarts all of them and trainer.resume_mode=auto
# continues from the newest complete checkpoint. After a preemption (exit code 143, the
# checkpoint saved), requeue the job with this same command: it resumes by itself.
exec torchrun "${launch[@]}" --max-restarts="${MAX_RESTARTS:-3}" --nproc_per_node="$NPROC_PER_NODE" -m sft.fsdp_sft_trainer \
  data.train_files="$TRAIN_FILES" \
  data.val_files="$VAL_FILES" \
  data.multiturn.enable=true \
  data.multiturn.messages_key=messages \
  data.max_length="$MAX_LENGTH" \
  data.truncation=right \
  data.train_batch_size="$TRAIN_BATCH_SIZE" \
  data.micro_batch_size_per_gpu="$MICRO_BATCH_SIZE" \
  data.max_token_len_per_gpu="${MAX_TOKEN_LEN:-null}" \
  data.balance_dp_token=true \
  model.partial_pretrain="$MODEL_PATH" \
  model.trust_remote_code="$TRUST_REMOTE_CODE" \
  model.enable_gradient_checkpointing=true \
  model.strategy=fsdp2 \
  model.fsdp_config.model_dtype="$MODEL_DTYPE" \
  optim.lr="$LR" \
  optim.lr_warmup_steps_ratio=0.05 \
  optim.clip_grad=1.0 \
  optim.lr_scheduler=cosine \
  ulysses_sequence_parallel_size="$SP_SIZE" \
  use_remove_padding="$REMOVE_PADDING" \
  trainer.total_epochs="$EPOCHS" \
  trainer.save_freq=500 \
  trainer.test_freq=500 \
  trainer.max_ckpt_to_keep=5 \
  trainer.default_local_dir="$SAVE_DIR" \
  trainer.project_name="${PROJECT_NAME:-sft}" \
  trainer.experiment_name="${EXPERIMENT_NAME:-run}" \
  trainer.logger="$LOGGER" \
  trainer.seed=42 \
  trainer.resume_mode=auto \
  trainer.checkpoint.save_contents='["model","optimizer","extra","hf_model"]' \
  "$@"
