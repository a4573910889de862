#!/usr/bin/env bash
# Device-tool calls on one GPU: the same-call table of docs/PERFORMANCE.md, per shape (SHAPES), each run its own
# process (Liger patches transformers process-wide): the user's own `torchrun -m sft.fsdp_sft_trainer` command
# lines (verl's production keys, the 32k fast path) timed by `sft.bench --command`, and TRL 1.16 flex_attention
# with and without Liger (`sft.bench --baseline trl --trl-only`; TRL_ATTN picks TRL's attention). PART=table then
# PART=trl2 within 30 s (scripts/gpu_verl_keys.sh says what each part runs). Carry .whl (trl, datasets:
# ../shared/gpu/fetch_wheels.sh). On torch 2.11 TRL's flex_attention compile did not finish in 520 s (2026-12-03):
# the table of that day is PART=keep15 then PART=fa4trl, TRL on flash_attention_4 (FA4 carried by scripts/fa4_pack.sh).
set -uo pipefail
for shape in ${SHAPES:-qwen2.5-1.5b}; do
  echo "== $shape (${PART:-table})"
  SHAPE=$shape PART=${PART:-table} bash "$(dirname "$0")/gpu_verl_keys.sh"
done
