#!/usr/bin/env bash
# One device-tool call on one GPU (issue 14): the verl production keys as a user types them.
#  PART=sync : the sync-free GPU test (tests/test_gpu.py -k never_syncs; on failure scripts/sync_report.py),
#              then the verl production keys timed and profiled by `sft.bench --command`.
#  PART=split: only the verl keys capped at an 8k budget (split invariance and per-micro-batch cost on the GPU).
#  PART=table: the same-call table, each run its own process: the verl production keys, the documented fast
#              path (32k budget; FAST=0 skips it), TRL 1.16 flex_attention + Liger (TRL_TIMEOUT, 420 s: its cold
#              compile is minutes).
#  PART=trl2 : within 30 s of PART=table (warm machine, compile cache kept): TRL flex_attention without Liger,
#              and the verl production keys again (ties the two calls together).
#  PART=tests: the GPU tests of the fused loss, the sync-free loop and compile, then the fused loss timed
#              against its eager ops (scripts/ce_bench.py, each its own process): $OUT/ce.jsonl.
#  PART=check: the same GPU tests, then the verl production keys once. PART=verl: only the keys.
#  PART=recompute: the verl production keys (gradient_checkpointing_mode=auto, the default), the same keys with
#              every layer recomputed (=full, the behaviour before auto), the defaults (fp32 master), and
#              the defaults + model.compile=true (Liger off with compile). PART=pair: only the first two.
#  PART=trlalone: only TRL 1.16 flex_attention + Liger (TRL_TIMEOUT), with the FA4 libraries' first half kept in /tmp
#              for the next call (scripts/fa4_env.sh).
#  PART=fa4  : FlashAttention-4 (carried in two halves, scripts/fa4_env.sh): the attention kernels timed
#              (scripts/attn_bench.py), the verl production keys with model.attn_kernel=auto (FA4) and =torch, the 0.5B
#              shape with auto, then the GPU attention tests and the sync-free loop test.
#  PART=trlwarm then PART=final (within 30 s): the same-call table with FA4. The first call keeps FA4's first
#              half, builds both shapes' files and runs TRL + Liger at 0.5B cold (TRL_TIMEOUT 520 s; its block-mask
#              compile took over 500 s on a cold H200) to fill the compile cache; the second installs FA4, runs the
#              verl keys at 1.5B (auto: FA4) and 0.5B, TRL + Liger at 0.5B on the warm cache, the Liger-pin GPU test,
#              and the verl keys at 1.5B on torch's kernel.
#  PART=keep15 then PART=fa4trl (within 30 s; TESTS="expr" adds tests/test_gpu.py -k expr to keep15): the verl keys at 1.5B on torch's kernel (NORMS=1: then PART=norms's
#              benchmarks); then, with FA4, at 1.5B and
#              0.5B, each beside TRL + Liger on transformers' flash_attention_4 (Liger pinned to Triton for both).
#              With .base/sft carried (an earlier commit's package), also its 1.5B run, for a before/after.
#  PART=fa4keep then PART=fa4run (within 30 s): the verl keys on the torch kernel, then on FA4 (and capped at 32k).
#  PART=norms: RMSNorm alone (scripts/norm_bench.py: Liger, torch's fused rms_norm, sft's, compiled, eager; each
#              its own process; NORM_VARIANTS picks) at the 1.5B and 0.5B micro-batch sizes: $OUT/norms.jsonl;
#              then the GPU test of sft's RMSNorm backward.
#  PART=proj : q/k/v and gate/up projections as separate GEMMs or one over the concatenated weights
#              (scripts/proj_bench.py; each its own process): $OUT/proj.jsonl. PROJ=1 runs it in PART=keep15.
#  PART=swiglu: the SwiGLU gate alone (scripts/swiglu_bench.py: Liger, sft's, eager; each its own process) at the
#              1.5B and 0.5B micro-batch sizes: $OUT/swiglu.jsonl; then its GPU test. SWIGLU=1 runs it in PART=keep15.
#  PART=ce   : the fused loss (scripts/ce_bench.py; each its own process): the softmax pass alone, sft's kernel
#              at several blocks against inductor's, then the whole loss at the 1.5B and 0.5B heads: $OUT/ce_pass.jsonl,
#              $OUT/ce.jsonl; then the fused-loss GPU test. CE=1 runs it in PART=keep15.
#  PART=ab   : after keep15 (KEEP_ONLY=1: without its training run), within 30 s: at 1.5B, the verl keys (FA4) and
#              TRL + Liger (FA4) taking turns, REPS (2) times each; STEPS=12 for 9 timed steps a run. With .base/sft
#              carried, also that package's run after the first pair.
#  GEMM=1 in PART=keep15: the layer's GEMMs alone (scripts/gemm_bench.py; default, cuBLASLt, TunableOp; each its
#              own process) at the 1.5B and 0.5B micro-batch sizes: $OUT/gemm.jsonl. keep15 and fa4trl sample the SM
#              clock and power every 0.2 s into $OUT/clocks.csv.
#  PART=gradsum: bias gradients as a reduction or a GEMV, sibling input gradients as mm + add or addmm
#              (scripts/grad_sum_bench.py) at the 1.5B and 0.5B sizes: $OUT/gradsum.jsonl.
#  PART=probe: the verl production keys, then the same + model.compile=true without checkpointing (is compile
#              without recompute faster than Liger's eager kernels?); read device_s_by_kind and top_kernels.
# Qwen2.5-1.5B shape (SHAPE), max_length 4096, global batch 128. Results: $OUT/results.jsonl (one JSON line per
# run), $OUT/runs.log (tails of each run's log), $OUT/pytest.log, $OUT/gpu.txt. Carry .whl (trl, datasets too).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
SHAPE=${SHAPE:-qwen2.5-1.5b}; W=/tmp/table; STEPS=${STEPS:-7}; L=/tmp/runlogs; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"; date -u | tee -a "$OUT/gpu.txt"
# The same files as `sft.bench --shape $SHAPE --steps $((STEPS-2)) --warmup 2` (128 x STEPS rows), so the TRL runs share them.
use_shape() {  # shape: build (or find) its model and data, and the data/model keys of every run
  SHAPE=$1; read -r model data < <(python3 -c "
from pathlib import Path; from sft.bench.assets import ensure_assets
m, d = ensure_assets(Path('$W'), '$SHAPE', 128 * $STEPS, 4096, 0); print(m, d)")
  COMMON="data.train_files=$data data.multiturn.enable=true model.partial_pretrain=$model data.max_length=4096 \
data.train_batch_size=128 trainer.total_training_steps=$STEPS trainer.logger=[console] \
trainer.checkpoint.save_contents=[] trainer.resume_mode=disable"
}
use_shape "$SHAPE"
VERL="use_remove_padding=true data.micro_batch_size_per_gpu=2 model.fsdp_config.model_dtype=bf16"
no_liger_path=$(echo "$PYTHONPATH" | tr ':' '\n' | grep -v "^${LIGER_SITE:-/none}$" | paste -sd:)
cmd() {  # name, user keys: `torchrun ... -m sft.fsdp_sft_trainer` as typed, timed from outside by sft.bench --command
  local c="torchrun --standalone --nnodes=1 --nproc_per_node=1 -m sft.fsdp_sft_trainer $COMMON trainer.default_local_dir=/tmp/ck-$1 $2"
  (cd "${CMD_DIR:-.}" && timeout -k 10 ${3:-200} python3 -m sft.bench --command "$c" --warmup 2 --log $L/$1.log \
    --out $L/$1.json >/dev/null 2>&1)
  python3 -c "import json; r=json.load(open('$L/$1.json')); r['run']='$1'; r['shape']='$SHAPE'; print(json.dumps(r))" >>"$OUT/results.jsonl" \
    || echo "{\"run\": \"$1\", \"error\": \"no result\"}" >>"$OUT/results.jsonl"
  { echo "=== $1: $2"; grep -E "token budget|packed up to|loss:|Error|error" $L/$1.log | head -8; tail -3 $L/$1.log; } >>"$OUT/runs.log"
}
trl() {  # name, pythonpath[, extra bench args]
  local tps; tps=$(python3 -c "import json; print(json.load(open('$L/${TPS_RUN:-verl}.json'))['tokens_per_step'])" 2>/dev/null || echo 130000)
  PYTHONPATH=$2 timeout -k 10 ${TRL_TIMEOUT:-420} python3 -m sft.bench --shape $SHAPE --steps $((STEPS-2)) --warmup 2 --workdir $W \
    --baseline trl --trl-only $tps --trl-attn ${TRL_ATTN:-flex_attention} ${3:-} data.max_length=4096 data.train_batch_size=128 \
    --out $L/$1.json >$L/$1.log 2>&1
  python3 -c "import json; r=json.load(open('$L/$1.json')); r['run']='$1'; r['shape']='$SHAPE'; print(json.dumps(r))" >>"$OUT/results.jsonl" \
    || echo "{\"run\": \"$1\", \"error\": \"no result\"}" >>"$OUT/results.jsonl"
  { echo "=== $1"; tail -5 $L/$1.log; } >>"$OUT/runs.log"
}
bench_variants() {  # name script "variants" "args of a shape"...: each variant its own process, $OUT/name.jsonl
  local name=$1 script=$2 variants=$3 args v; shift 3
  for args in "$@"; do for v in $variants; do
    timeout 120 python3 scripts/$script --variant $v $args >>"$OUT/$name.jsonl" 2>>"$OUT/$name.err"
  done; done
  cat "$OUT/$name.jsonl"
}
gpu_test() {  # log name, -k expression[, timeout]: tests/test_gpu.py on this machine
  timeout ${3:-120} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "$2" >"$OUT/$1.log" 2>&1
  echo "pytest $2: exit $?"; tail -2 "$OUT/$1.log"
}
norms() {  # scripts/norm_bench.py at the 1.5B and 0.5B micro-batch sizes, then the RMSNorm GPU test
  bench_variants norms norm_bench.py "${NORM_VARIANTS:-liger torch sft compiled eager}" \
    "--rows 41000 --hidden 1536" "--rows 61000 --hidden 896"
  gpu_test pytest rms_norm
}
swiglus() {  # scripts/swiglu_bench.py at the 1.5B and 0.5B micro-batch sizes, then the SwiGLU GPU test
  bench_variants swiglu swiglu_bench.py "liger sft eager" "--rows 41000 --width 8960" "--rows 61000 --width 4864"
  gpu_test pytest_swiglu swiglu
}
projs() {  # scripts/proj_bench.py: q/k/v and gate/up at the 1.5B and 0.5B micro-batch sizes
  bench_variants proj proj_bench.py "separate fused fused_contiguous fused_split_copy" \
    "--group qkv --shape qwen2.5-1.5b --rows 41000" "--group gate_up --shape qwen2.5-1.5b --rows 41000" \
    "--group qkv --shape qwen2.5-0.5b --rows 61000" "--group gate_up --shape qwen2.5-0.5b --rows 61000"
}
gemmb() {  # scripts/gemm_bench.py: the layer's GEMMs at the 1.5B and 0.5B micro-batch sizes, three BLAS choices
  bench_variants gemm gemm_bench.py "default lt tunable" "--rows 48128 --hidden 1536 --inter 8960 --q 1536 --kv 256" \
    "--rows 65536 --hidden 896 --inter 4864 --q 896 --kv 128"
}
trl_on_fa4() {  # TRL + Liger on transformers' flash_attention_4 (padding-free, no flex compile), Liger pinned to
  # Triton as ours is: with the CUTLASS DSL importable Liger would pick its CuTe DSL RoPE, which recompiles per
  # packed shape (sft/ops/patch.py::pin_liger_triton)
  export TRL_ATTN=flash_attention_4 LIGER_KERNEL_IMPL_ROPE=nvidia-triton LIGER_KERNEL_IMPL_RMS_NORM=nvidia-triton \
    LIGER_KERNEL_IMPL_SWIGLU=nvidia-triton TRL_TIMEOUT=${TRL_TIMEOUT:-150}
}
clocks() {  # the SM clock and power every 0.2 s into $OUT/clocks.csv until the script ends (throttling under load?)
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu \
    --format=csv,noheader -lms 200 >>"$OUT/clocks.csv" 2>/dev/null &
  CLOCKS_PID=$!; trap 'kill $CLOCKS_PID 2>/dev/null' EXIT
}
ces() {  # scripts/ce_bench.py: the softmax pass alone (sft's kernel at several blocks, inductor's), then the
  # whole fused loss at the 1.5B and 0.5B heads (one micro-batch of targets), then the fused-loss GPU test
  bench_variants ce_pass ce_bench.py "inductor fused" "--pass-only"
  bench_variants ce_pass ce_bench.py fused "--pass-only --block 2048 --warps 8" "--pass-only --block 8192 --warps 16" \
    "--pass-only --block 4096 --warps 4" "--pass-only --block 8192 --warps 8"
  bench_variants ce ce_bench.py "inductor fused" "--rows 32700 --hidden 1536" "--rows 52000 --hidden 896"
  gpu_test pytest_ce fused_ce
}
gpu_tests() {
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "fused_ce or never_syncs or compile" \
    >"$OUT/pytest.log" 2>&1; echo "pytest: exit $?"; tail -4 "$OUT/pytest.log"
}
if [ "${PART:-sync}" = check ] || [ "${PART:-sync}" = verl ]; then  # [the GPU tests,] the verl keys once (SHAPE)
  [ "$PART" = check ] && gpu_tests
  cmd verl "$VERL"
elif [ "${PART:-sync}" = tests ]; then
  gpu_tests
  for v in fused eager; do timeout 120 python3 scripts/ce_bench.py --variant $v >>"$OUT/ce.jsonl" 2>>"$OUT/ce.err"; done
  cat "$OUT/ce.jsonl"; exit 0
elif [ "${PART:-sync}" = proj ]; then  # sibling projections separate or as one GEMM, at 1.5B and 0.5B sizes
  projs; exit 0
elif [ "${PART:-sync}" = norms ]; then  # RMSNorm implementations alone at the 1.5B and 0.5B micro-batch sizes
  norms; exit 0
elif [ "${PART:-sync}" = gradsum ]; then  # bias-gradient and sibling fan-in sums, separate vs fused (one process each size)
  for a in "--rows 41000 --hidden 1536 --widths 1536,256 --inter 8960" "--rows 61000 --hidden 896 --widths 896,128 --inter 4864"; do
    timeout 120 python3 scripts/grad_sum_bench.py $a >>"$OUT/gradsum.jsonl" 2>>"$OUT/gradsum.err"; done
  cat "$OUT/gradsum.jsonl"; exit 0
elif [ "${PART:-sync}" = ce ]; then  # the fused loss's softmax pass and the whole loss, sft's kernel vs inductor's
  ces; exit 0
elif [ "${PART:-sync}" = swiglu ]; then  # SwiGLU gate implementations alone at the 1.5B and 0.5B micro-batch sizes
  swiglus; exit 0
elif [ "${PART:-sync}" = recompute ] || [ "${PART:-sync}" = pair ]; then
  cmd verl "$VERL"
  cmd verl_full "$VERL model.gradient_checkpointing_mode=full"
  if [ "$PART" = recompute ]; then
    cmd defaults "use_remove_padding=true"
    cmd compiled "use_remove_padding=true model.compile=true" 300
  fi
elif [ "${PART:-sync}" = trlalone ]; then
  source "$(dirname "$0")/fa4_env.sh" keep
  trl trl_liger "$PYTHONPATH" --trl-liger
elif [ "${PART:-sync}" = trlwarm ]; then
  source "$(dirname "$0")/fa4_env.sh" keep
  use_shape qwen2.5-1.5b; use_shape qwen2.5-0.5b  # build both shapes' files now, for the next call
  TRL_TIMEOUT=${TRL_TIMEOUT:-520} trl trl_liger_cold "$PYTHONPATH" --trl-liger
elif [ "${PART:-sync}" = final ]; then
  # FA4 at 1.5B first (the open figure); TRL on the warm cache after, so a cache miss cannot eat the call.
  source "$(dirname "$0")/fa4_env.sh" assemble
  use_shape qwen2.5-1.5b
  cmd verl15 "$VERL"
  use_shape qwen2.5-0.5b
  cmd verl05 "$VERL"
  TRL_TIMEOUT=${TRL_TIMEOUT:-150} trl trl_liger "$PYTHONPATH" --trl-liger
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k liger_resolves >"$OUT/pytest.log" 2>&1
  echo "pytest liger pin: exit $?"; tail -2 "$OUT/pytest.log"
  use_shape qwen2.5-1.5b
  cmd verl15_torch "$VERL model.attn_kernel=torch"
elif [ "${PART:-sync}" = keep15 ]; then  # first of two calls: keep FA4's first half, the verl keys on torch's kernel
  source "$(dirname "$0")/fa4_env.sh" keep
  clocks
  [ "${GEMM:-0}" = 1 ] && gemmb
  [ "${KEEP_ONLY:-0}" = 1 ] || cmd verl15_torch "$VERL model.attn_kernel=torch"  # KEEP_ONLY=1: no training run
  [ "${PROJ:-0}" = 1 ] && projs
  [ "${NORMS:-0}" = 1 ] && norms
  [ "${SWIGLU:-0}" = 1 ] && swiglus
  [ "${CE:-0}" = 1 ] && ces
  [ -n "${TESTS:-}" ] && gpu_test pytest_keep15 "$TESTS" 300  # TESTS="-k expression" of tests/test_gpu.py
elif [ "${PART:-sync}" = fa4trl ]; then  # second call, within 30 s: ours (auto: FA4) beside TRL on FA4, 1.5B then 0.5B
  source "$(dirname "$0")/fa4_env.sh" assemble
  clocks
  trl_on_fa4
  for s in ${SHAPES:-qwen2.5-1.5b qwen2.5-0.5b}; do
    use_shape $s; n=${s#qwen2.5-}; n=${n%b}; n=${n/./}
    cmd verl$n "$VERL"
    # The same keys on an earlier sft (carried in .base: git archive REV sft | tar -x -C .base), same call.
    [ -d .base/sft ] && [ $n = 15 ] && CMD_DIR=.base cmd verl${n}_base "$VERL"
    TPS_RUN=verl$n trl trl$n "$PYTHONPATH" --trl-liger
  done
elif [ "${PART:-sync}" = ab ]; then  # after keep15 (within 30 s): sft and TRL + Liger (both FA4) taking turns, REPS
  # times at 1.5B (STEPS=12 gives 9 timed steps a run), so a slow or fast stretch of the machine hits both alike
  source "$(dirname "$0")/fa4_env.sh" assemble
  clocks
  trl_on_fa4
  for r in $(seq ${REPS:-2}); do
    cmd verl15_r$r "$VERL"
    TPS_RUN=verl15_r$r trl trl15_r$r "$PYTHONPATH" --trl-liger
    # With .base/sft carried (an earlier commit's package): its run after the first pair, same call
    [ -d .base/sft ] && [ $r = 1 ] && CMD_DIR=.base cmd verl15_base "$VERL"
  done
elif [ "${PART:-sync}" = fa4keep ]; then  # first of two calls: keep FA4's first half, time the torch kernel
  source "$(dirname "$0")/fa4_env.sh" keep
  cmd verl_torch "$VERL model.attn_kernel=torch"
elif [ "${PART:-sync}" = fa4run ]; then  # second call, within 30 s: the verl keys on FA4 (auto), then capped at 32k
  source "$(dirname "$0")/fa4_env.sh" assemble
  cmd verl_fa4 "$VERL"
  cmd verl_fa4_32k "$VERL data.max_token_len_per_gpu=32768"
elif [ "${PART:-sync}" = fa4 ]; then
  source "$(dirname "$0")/fa4_env.sh" assemble
  for s in "12 2 128" "14 2 64"; do set -- $s
    timeout 150 python3 scripts/attn_bench.py --heads $1 --kv-heads $2 --head-dim $3 >>"$OUT/attn.jsonl" 2>>"$OUT/attn.err"; done
  cat "$OUT/attn.jsonl"
  cmd verl_fa4 "$VERL model.attn_kernel=auto"
  cmd verl_torch "$VERL model.attn_kernel=torch"
  use_shape qwen2.5-0.5b
  cmd verl05_fa4 "$VERL"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k cuda >"$OUT/pytest.log" 2>&1
  echo "pytest attention: exit $?"; tail -3 "$OUT/pytest.log"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k never_syncs >>"$OUT/pytest.log" 2>&1
  echo "pytest never_syncs: exit $?"; tail -3 "$OUT/pytest.log"
elif [ "${PART:-sync}" = probe ]; then
  cmd verl "$VERL"
  cmd compiled_nockpt "$VERL model.compile=true model.enable_gradient_checkpointing=false" 300
elif [ "${PART:-sync}" = split ]; then  # the verl keys capped at 8k: same losses as the 64k budget, more micro-batches
  cmd verl8k "$VERL data.max_token_len_per_gpu=8192" 150
elif [ "${PART:-sync}" = sync ]; then
  timeout 240 python3 -m pytest -x -q -p no:cacheprovider tests/test_gpu.py -k never_syncs >"$OUT/pytest.log" 2>&1
  rc=$?; echo "pytest never_syncs: exit $rc"; tail -3 "$OUT/pytest.log"
  [ $rc -ne 0 ] && timeout 120 python3 scripts/sync_report.py /tmp/sync_report >"$OUT/sync_report.txt" 2>&1
  cmd verl "$VERL"
elif [ "${PART:-sync}" = trl2 ]; then
  trl trl "$no_liger_path"
  cmd verl "$VERL"
else
  cmd verl "$VERL"
  [ "${FAST:-1}" = 0 ] || cmd fast32k "use_remove_padding=true data.max_token_len_per_gpu=32768"
  trl trl_liger "$PYTHONPATH" --trl-liger
fi
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
print(f"{'run':<10}{'tok/s':>8}{'trained/s':>10}{'step s':>8}{'mem GB':>8}{'busy':>7}{'syncs':>6}{'launch':>8}  budget / loss")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r or not r.get("tokens_per_s_per_gpu"):
        print(f"{r['run']:<10}error {r.get('error')}"); continue
    busy = r.get("gpu_busy_frac"); losses = r.get("losses") or [r.get("final_loss")]
    print(f"{r['run']:<10}{r['tokens_per_s_per_gpu']:>8.0f}{r['trained_tokens_per_s_per_gpu']:>10.0f}"
          f"{r['step_time_s_median']:>8.2f}{(r.get('peak_mem_gb') or 0):>8.1f}{(busy or 0):>7.1%}"
          f"{r.get('host_syncs_per_step', '-')!s:>6}{r.get('kernel_launches_per_step', '-')!s:>8}  {losses[-1]}")
PY
