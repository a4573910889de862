#!/usr/bin/env bash
# Issue 8 on nvidia-h200-x2 (two GPUs, NCCL), one device-tool call per PART (each < 10 min):
#   PART=equiv  0.5B shape, 20 steps: dp=2 ≡ 1 GPU and sp=2 ≡ sp=1 (same global batch), then a
#               checkpoint saved on 2 GPUs resumed on 1 and one saved on 1 resumed on 2;
#   PART=7b     Qwen2.5-7B shape: sft.bench over 2 GPUs (max_length 4096, global batch 128);
#   PART=ckpt   scripts/run_sft.sh with its defaults on the 7B shape for 3 steps + a checkpoint with
#               HF export (time and size);
#   PART=long   7B shape, one conversation per GPU group: the longest of LONG_SP2 that trains with
#               sp=2, and of LONG_SP1 with sp=1 (dp=2), tokens/s at each length.
# Results in $OUT (*.json, *.log, summary.txt). Carry .whl (../shared/gpu/fetch_wheels.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
W=${W:-/tmp/two}; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
assets() {  # shape rows max_length [sample_length] -> "model parquet"
  python3 -c "
from pathlib import Path; from sft.bench.assets import ensure_assets
print(*ensure_assets(Path('$W'), '$1', $2, $3, 0, ${4:-None}))"
}
train() {  # name nproc overrides... (trainer run, metrics.jsonl under $W/$name)
  local name=$1 n=$2; shift 2
  torchrun --standalone --nproc_per_node=$n -m sft.fsdp_sft_trainer "${BASE[@]}" trainer.default_local_dir=$W/$name \
    "$@" >"$OUT/$name.log" 2>&1; echo "$name exit $?" | tee -a "$OUT/summary.txt"
}
compare() {  # a b [first_step]: |Δ train/loss| over the steps both logged (scripts/run_metrics.py)
  python3 "$(dirname "$0")/run_metrics.py" compare "$W/$1/metrics.jsonl" "$W/$2/metrics.jsonl" --from "${3:-1}" --label "$1 vs $2" \
    | tee -a "$OUT/summary.txt"
}

has() { [[ " ${PART:-equiv} " == *" $1 "* ]]; }  # PART may list several parts: PART="ckpt long"
if has equiv; then
  N=${EQ_STEPS:-20}; H=$((N / 2))
  read -r model data < <(assets ${EQ_SHAPE:-qwen2.5-0.5b} $((32 * N)) ${EQ_LEN:-4096})
  BASE=(data.train_files=$data data.multiturn.enable=true model.partial_pretrain=$model data.max_length=${EQ_LEN:-4096}
        data.train_batch_size=32 use_remove_padding=true data.max_token_len_per_gpu=16384 optim.lr=1e-4
        trainer.total_training_steps=$N trainer.logger='["console","file"]' trainer.save_freq=$H
        trainer.checkpoint.save_contents='["model","optimizer","extra"]' trainer.resume_mode=disable)
  train one_gpu 1
  train dp2 2
  train sp2 2 ulysses_sequence_parallel_size=2
  compare one_gpu dp2; compare one_gpu sp2
  # Resume across GPU counts: keep only the middle checkpoint of each run, relaunch with the other count.
  for pair in "dp2 resume_on1 1" "one_gpu resume_on2 2"; do
    set -- $pair
    mkdir -p $W/$2 && cp -r $W/$1/global_step_$H $W/$2/ && echo $H > $W/$2/latest_checkpointed_iteration.txt
    BASE=("${BASE[@]/trainer.resume_mode=disable/trainer.resume_mode=auto}")
    train $2 $3
    grep -m1 -i "resum" "$OUT/$2.log" | tee -a "$OUT/summary.txt"
    compare $1 $2 $((H + 1))
  done
fi

if has 7b || has ckpt; then
  rm -rf $W/one_gpu $W/dp2 $W/sp2 $W/resume_on1 $W/resume_on2 $W/ckpt-sft $W/run_sft  # disk: a 7B checkpoint is ~60 GB
  t0=$(date +%s); read -r model data < <(assets qwen2.5-7b 1024 4096); echo "7B assets $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
fi
if has 7b; then
  torchrun --standalone --nproc_per_node=2 -m sft.bench --shape qwen2.5-7b --steps ${STEPS:-3} --warmup 2 --workdir $W \
    data.max_length=4096 data.train_batch_size=128 use_remove_padding=true data.max_token_len_per_gpu=${BUDGET:-32768} \
    --out "$OUT/bench_7b.json" >"$OUT/bench_7b.log" 2>&1; echo "bench_7b exit $?" | tee -a "$OUT/summary.txt"
  tail -4 "$OUT/bench_7b.log" | head -3 | tee -a "$OUT/summary.txt"
fi
if has ckpt; then
  # What a user who copies the README sees: run_sft.sh defaults, 3 steps, a checkpoint with HF export.
  t0=$(date +%s)
  MODEL_PATH=$model TRAIN_FILES=$data SAVE_DIR=$W/run_sft LOGGER='["console","file"]' MAX_RESTARTS=0 \
    timeout 420 bash scripts/run_sft.sh trainer.total_training_steps=3 trainer.save_freq=3 >"$OUT/run_sft.log" 2>&1
  echo "run_sft exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  grep -E "step [0-9]/3|saved|error" "$OUT/run_sft.log" | tail -5 | tee -a "$OUT/summary.txt"
  du -sh $W/run_sft/global_step_3 $W/run_sft/global_step_3/* 2>/dev/null | tee -a "$OUT/summary.txt"
  rm -rf $W/run_sft
fi

if has long; then
  long() {  # sp length
    local sp=$1 len=$2 name=long_sp$1_$2
    torchrun --standalone --nproc_per_node=2 -m sft.bench --shape qwen2.5-7b --steps 2 --warmup 1 --workdir $W \
      --sample-length $len data.max_length=$len data.train_batch_size=$((2 / sp)) data.micro_batch_size_per_gpu=1 \
      use_remove_padding=true data.max_token_len_per_gpu=$len ulysses_sequence_parallel_size=$sp \
      data.truncation=right --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
    local rc=$?; echo "$name exit $rc $(grep -o 'OutOfMemoryError' "$OUT/$name.log" | head -1)" | tee -a "$OUT/summary.txt"
    return $rc
  }
  for len in ${LONG_SP2:-65536 131072}; do long 2 $len || break; done
  for len in ${LONG_SP1:-32768 65536}; do long 1 $len || break; done
  for f in "$OUT"/long_*.json; do python3 -c "import json; r=json.load(open('$f'));
print('$f'.split('/')[-1], 'tok/s/gpu %.0f useful %.1f%% mem %.1f GB step %.1f s' % (r['tokens_per_s_per_gpu'], 100*r['useful_mfu'], r['peak_mem_gb'], r['step_time_s_median']))" | tee -a "$OUT/summary.txt"; done
fi
echo "=== summary"; cat "$OUT/summary.txt"
