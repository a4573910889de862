#!/usr/bin/env bash
# One device-tool call on one GPU: each fast-path option of issue 5 measured before/after with
# sft.bench on the same model files and data (Qwen2.5-1.5B shape, max_length 4096, global batch
# 128, token budget per micro-batch), plus a profile of one step of the fastest setting.
# Results: $OUT/fastpath.jsonl (one JSON line per variant), $OUT/fastpath.log, $OUT/prof/ops.txt.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
SHAPE=${SHAPE:-qwen2.5-1.5b}; W=/tmp/bench; STEPS=${STEPS:-3}
COMMON=(--shape "$SHAPE" --steps "$STEPS" --warmup 2 --workdir $W data.max_length=4096 data.train_batch_size=128
        use_remove_padding=true data.max_token_len_per_gpu=${BUDGET:-32768})
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
no_liger_path=$(echo "$PYTHONPATH" | tr ':' '\n' | grep -v "^${LIGER_SITE:-/none}$" | paste -sd:)
variant() {  # name, env prefix (or -), bench args...
  local name=$1 envp=$2; shift 2
  echo "=== $name: $*" | tee -a "$OUT/fastpath.log"
  if [ "$envp" = noliger ]; then pp=$no_liger_path; else pp=$PYTHONPATH; fi
  PYTHONPATH=$pp timeout 300 python3 -m sft.bench "${COMMON[@]}" "$@" --out "$OUT/$name.json" >>"$OUT/fastpath.log" 2>&1 \
    && python3 -c "import json,sys; r=json.load(open('$OUT/$name.json')); r['variant']='$name'; print(json.dumps(r))" >>"$OUT/fastpath.jsonl" \
    || echo "{\"variant\": \"$name\", \"error\": \"exit $?\"}" >>"$OUT/fastpath.jsonl"
}
for v in ${VARIANTS:-before fused_ce liger liger_sel liger_sel_rafF noac16k compile_sel}; do
  case $v in
    before)     variant $v noliger ;;                                  # HF kernels, full AC (sft's fused CE on CUDA)
    fused_ce)   variant $v - ;;                                        # + Liger kernels (auto); until 2026-12: Liger's CE
    liger)      variant $v - model.use_liger=true ;;                   # + Liger RMSNorm/SwiGLU/RoPE
    liger_sel)  variant $v - model.use_liger=true model.gradient_checkpointing_mode=selective ;;
    liger_sel_rafF) variant $v - model.use_liger=true model.gradient_checkpointing_mode=selective \
                  model.fsdp_config.reshard_after_forward=false ;;
    noac16k)    variant $v - model.use_liger=true model.enable_gradient_checkpointing=false \
                  data.max_token_len_per_gpu=16384 ;;
    compile_sel) variant $v - model.compile=true model.gradient_checkpointing_mode=selective ;;
    profile)    variant $v - model.use_liger=true model.gradient_checkpointing_mode=selective --profile "$OUT/prof" ;;
  esac
done
python3 - "$OUT/fastpath.jsonl" <<'PY'
import json, sys
print(f"{'variant':<16}{'tok/s':>9}{'trained/s':>11}{'useful':>8}{'model':>8}{'mem GB':>8}{'ttfs':>7}{'mb/step':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"{r['variant']:<16}error {r['error']}"); continue
    print(f"{r['variant']:<16}{r['tokens_per_s_per_gpu']:>9.0f}{r['trained_tokens_per_s_per_gpu']:>11.0f}"
          f"{r['useful_mfu']:>8.1%}{r['model_mfu']:>8.1%}{r['peak_mem_gb']:>8.1f}{r['time_to_first_step_s']:>7.1f}"
          f"{r['micro_batches_per_step']:>8.1f}")
PY
