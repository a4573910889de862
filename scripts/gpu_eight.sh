#!/usr/bin/env bash
# Issue 9, the production configuration on nvidia-h200-x8, in one device call:
#   1. scripts/run_sft.sh with its defaults (7B shape, sp=2, remove-padding, max_length 4096, global
#      batch 128, micro-batch 2 + token budget, AC, bf16) for $STEPS steps, a checkpoint at STEPS/2;
#   2. the same launch SIGTERMed after a third of the steps, then relaunched: it resumes by itself;
#      its losses are compared with run 1;
#   3. run 1's middle checkpoint resumed on $RESUME_NPROC GPUs for the remaining steps, compared too;
#   4. scaling: sft.bench with the same settings on 2 GPUs and on $NPROC GPUs (tokens/s per GPU).
# Scaled down (what a smaller machine allows): NPROC=2 RESUME_NPROC=1 SHAPE=qwen2.5-0.5b STEPS=10.
# CPU check of the logic: NPROC=2 RESUME_NPROC=1 SHAPE=tiny STEPS=6 MAX_LENGTH=1024 (no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
NPROC=${NPROC:-8}; RESUME_NPROC=${RESUME_NPROC:-2}; SHAPE=${SHAPE:-qwen2.5-7b}; STEPS=${STEPS:-30}
MAX_LENGTH=${MAX_LENGTH:-4096}; W=${W:-/tmp/eight}; H=$((STEPS / 2)); mkdir -p $W
S="$OUT/summary.txt"
read -r model data < <(python3 -c "
from pathlib import Path; from sft.bench.assets import ensure_assets
print(*ensure_assets(Path('$W'), '$SHAPE', $((128 * STEPS)), $MAX_LENGTH, 0))")
launch() {  # dir nproc [overrides...]: run_sft.sh defaults, console + file logs, no restarts
  local dir=$1 n=$2; shift 2
  MODEL_PATH=$model TRAIN_FILES=$data SAVE_DIR=$dir NPROC_PER_NODE=$n MAX_LENGTH=$MAX_LENGTH MAX_RESTARTS=0 \
    LOGGER='["console","file"]' bash scripts/run_sft.sh trainer.total_training_steps=$STEPS trainer.save_freq=$H \
    trainer.test_freq=-1 "$@"
}
compare() {  # reference_dir other_dir first_step label (scripts/run_metrics.py)
  python3 scripts/run_metrics.py compare "$1/metrics.jsonl" "$2/metrics.jsonl" --from "$3" --label "$4" | tee -a "$S"
}
rate() { python3 scripts/run_metrics.py rate "$1"; }  # median tokens/s per GPU and step time after step 2


# 1. the production run
rm -rf $W/full; t0=$(date +%s)
launch $W/full $NPROC >"$OUT/full.log" 2>&1; echo "full run on $NPROC: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$S"
echo "  $(rate $W/full/metrics.jsonl)" | tee -a "$S"
grep -E "saved checkpoint" "$OUT/full.log" | tee -a "$S"
grep -E "mem [0-9.]+ GB" "$OUT/full.log" | tail -1 | tee -a "$S"

# 2. SIGTERM after a third of the steps, then the same command again
rm -rf $W/pre
launch $W/pre $NPROC >"$OUT/pre1.log" 2>&1 & pid=$!
until [ -f $W/pre/metrics.jsonl ] && [ "$(grep -c train/loss $W/pre/metrics.jsonl)" -ge $((STEPS / 3)) ]; do
  sleep 1; kill -0 $pid 2>/dev/null || break
done
# What a scheduler does at preemption: SIGTERM to the launcher and to every worker of the job.
pkill -TERM -f "default_local_dir=$W/pre " ; wait $pid; echo "preempted launch: exit $?, tracker $(cat $W/pre/latest_checkpointed_iteration.txt 2>/dev/null)" | tee -a "$S"
launch $W/pre $NPROC >"$OUT/pre2.log" 2>&1; echo "relaunch: exit $?" | tee -a "$S"
grep -m1 "resumed from" "$OUT/pre2.log" | tee -a "$S"
compare $W/full $W/pre 1 "preempted + relaunched vs uninterrupted ($NPROC GPUs)"

# 3. run 1's middle checkpoint on RESUME_NPROC GPUs
rm -rf $W/small; mkdir -p $W/small && cp -r $W/full/global_step_$H $W/small/ && echo $H >$W/small/latest_checkpointed_iteration.txt
SP_SIZE=$(( RESUME_NPROC >= 2 ? 2 : 1 )) launch $W/small $RESUME_NPROC >"$OUT/small.log" 2>&1
echo "resume on $RESUME_NPROC: exit $?" | tee -a "$S"; grep -m1 "resumed from" "$OUT/small.log" | tee -a "$S"
compare $W/full $W/small $((H + 1)) "resumed on $RESUME_NPROC vs $NPROC GPUs"

# 4. scaling: tokens/s per GPU with the run's settings on 2 and on NPROC GPUs (same global batch)
for n in $(printf "2\n%s\n" $NPROC | sort -nu); do
  torchrun --standalone --nproc_per_node=$n -m sft.bench --shape $SHAPE --steps 3 --warmup 2 --workdir $W \
    data.max_length=$MAX_LENGTH data.train_batch_size=128 use_remove_padding=true data.max_token_len_per_gpu=16384 \
    ulysses_sequence_parallel_size=$(( n >= 2 ? 2 : 1 )) model.fsdp_config.model_dtype=bf16 \
    --out "$OUT/scale_$n.json" >"$OUT/scale_$n.log" 2>&1
  python3 -c "import json; r=json.load(open('$OUT/scale_$n.json')); print('$n GPUs: tokens/s/GPU %.0f useful MFU %s' % (r['tokens_per_s_per_gpu'], r['useful_mfu']))" | tee -a "$S"
done
echo "=== summary"; cat "$S"
