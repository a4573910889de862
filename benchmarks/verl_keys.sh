#!/usr/bin/env bash
# verl's production keys on one GPU, timed as a user types them (benchmarks/README.md).
#   bash benchmarks/verl_keys.sh                                  # sft, REPS runs
#   BASE=/path/to/other/checkout bash benchmarks/verl_keys.sh     # that checkout and this one, taking turns
#   TRL=1 bash benchmarks/verl_keys.sh                            # + TRL SFTTrainer with Liger, same model and data
#   FP8=1 bash benchmarks/verl_keys.sh                            # + the same keys and FP8_KEYS (needs torchao)
# Env: SHAPE (qwen2.5-1.5b | qwen2.5-0.5b | qwen2.5-7b | qwen3-8b-short | qwen3.5-2b-hybrid | qwen3-2b), STEPS (12: 2 warm-up, the last profiled, the rest timed),
# REPS (2), TESTS=1 (tests/test_gpu.py first), TRL_ATTN (flash_attention_4 where FA4 imports, else flex_attention),
# TIMEOUT (seconds per run, 900), EXTRA (keys added to every sft run), FP8_KEYS (what FP8=1 adds: model.fp8=true
# model.compile=true), OUT_DIR (bench_out), WORK_DIR (OUT_DIR/work).
# Each run is its own process. One JSON line per run in OUT_DIR/results.jsonl, logs in OUT_DIR/logs, a table last.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
SHAPE=${SHAPE:-qwen2.5-1.5b}; STEPS=${STEPS:-12}; REPS=${REPS:-2}; BASE=${BASE:+$(cd "$BASE" && pwd)}
mkdir -p "${OUT_DIR:-bench_out}"; OUT=$(cd "${OUT_DIR:-bench_out}" && pwd); W=${WORK_DIR:-$OUT/work}; L=$OUT/logs
mkdir -p "$W" "$L"; RES=$OUT/results.jsonl; : >"$RES"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${TESTS:-0}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$L/pytest.log" 2>&1; echo "GPU tests: exit $?"
  tail -3 "$L/pytest.log"
fi
# The model and data of `sft.bench --shape $SHAPE --steps $((STEPS-2)) --warmup 2`: 128 x STEPS rows, built once.
read -r MODEL DATA < <(PYTHONPATH=$ROOT python3 -c "
from pathlib import Path; from sft.bench.assets import ensure_assets
print(*ensure_assets(Path('$W'), '$SHAPE', 128 * $STEPS, 4096, 0))") || { echo "could not build the assets"; exit 1; }
KEYS="data.train_files=$DATA data.multiturn.enable=true model.partial_pretrain=$MODEL data.max_length=4096 \
data.train_batch_size=128 trainer.total_training_steps=$STEPS trainer.logger=[console] \
trainer.checkpoint.save_contents=[] trainer.resume_mode=disable"
VERL="use_remove_padding=true data.micro_batch_size_per_gpu=2 model.fsdp_config.model_dtype=bf16 ${EXTRA:-}"
record() {  # name: the run's JSON result as one line of results.jsonl
  python3 -c "import json; r = json.load(open('$L/$1.json')); r.update(run='$1', shape='$SHAPE'); print(json.dumps(r))" \
    >>"$RES" 2>/dev/null || echo "{\"run\": \"$1\", \"error\": \"no result, see $L/$1.log\"}" >>"$RES"
}
sft_run() {  # name, checkout[, keys]: the plain torchrun line (+ keys), timed from outside by that checkout's sft.bench
  local c="torchrun --standalone --nnodes=1 --nproc_per_node=1 -m sft.fsdp_sft_trainer $KEYS $VERL ${3:-}"
  rm -f "$L/$1.json"
  (cd "$2" && PYTHONPATH="$2${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "${TIMEOUT:-900}" python3 -m sft.bench \
    --command "$c trainer.default_local_dir=$W/ck-$1" --warmup 2 --out "$L/$1.json" --log "$L/$1.log" >/dev/null 2>&1)
  record "$1"
}
trl_run() {  # name: TRL 1.16+ SFTTrainer with Liger (pinned to its Triton kernels, as sft does), sft's tokens per step
  local tps attn=${TRL_ATTN:-$(python3 -c "import flash_attn.cute" 2>/dev/null && echo flash_attention_4 || echo flex_attention)}
  tps=$(python3 -c "import json; print(json.load(open('$L/$2.json'))['tokens_per_step'])" 2>/dev/null || echo 131072)
  rm -f "$L/$1.json"
  LIGER_KERNEL_IMPL_ROPE=nvidia-triton LIGER_KERNEL_IMPL_RMS_NORM=nvidia-triton LIGER_KERNEL_IMPL_SWIGLU=nvidia-triton \
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "${TIMEOUT:-900}" python3 -m sft.bench --shape "$SHAPE" \
    --steps $((STEPS - 2)) --warmup 2 --workdir "$W" --baseline trl --trl-only "$tps" --trl-liger --trl-attn "$attn" \
    data.max_length=4096 data.train_batch_size=128 --out "$L/$1.json" >"$L/$1.log" 2>&1
  record "$1"
}
for r in $(seq "$REPS"); do
  sft_run "sft_$r" "$ROOT"
  [ "${FP8:-0}" = 1 ] && sft_run "fp8_$r" "$ROOT" "${FP8_KEYS:-model.fp8=true model.compile=true}"
  [ -n "$BASE" ] && sft_run "base_$r" "$BASE"
  [ "${TRL:-0}" = 1 ] && trl_run "trl_$r" "sft_$r"
done
python3 - "$RES" <<'PY'
import json, sys
print(f"{'run':<10}{'tokens/s/GPU':>13}{'step s':>8}{'GPU busy':>9}{'syncs':>6}{'peak GB':>8}  last loss")
for r in map(json.loads, open(sys.argv[1])):
    if not r.get("tokens_per_s_per_gpu"):
        print(f"{r['run']:<10}error: {r.get('error')}"); continue
    busy, loss = r.get("gpu_busy_frac"), (r.get("losses") or [r.get("final_loss")])[-1]
    print(f"{r['run']:<10}{r['tokens_per_s_per_gpu']:>13,.0f}{r['step_time_s_median']:>8.2f}"
          f"{'-' if busy is None else f'{busy:.1%}':>9}{r.get('host_syncs_per_step', '-')!s:>6}"
          f"{r.get('peak_mem_gb') or 0:>8.1f}  {loss if loss is not None else '-'}")
rates = {r["run"]: r["tokens_per_s_per_gpu"] for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_s_per_gpu")}
for name, rate in rates.items():  # FP8=1: each round's FP8 run against that round's bf16 run
    if name.startswith("fp8_") and "sft_" + name[4:] in rates:
        print(f"{name} / sft_{name[4:]}: {rate / rates['sft_' + name[4:]]:.3f}x tokens/s")
PY
