#!/usr/bin/env bash
# Here, before PART=trlalone / PART=fa4 of scripts/gpu_verl_keys.sh: FlashAttention-4 and its CuTe DSL
# libraries for the device machine (Python 3.12, CUDA 13) in two halves under 64 MiB each (scripts/fa4_env.sh):
# .fa4a/part_aa, and .fa4b/part_ab + the small wheels. Both folders are git-ignored; carry one per call.
set -euo pipefail
cd "$(dirname "$0")/.."
T=$(mktemp -d); mkdir -p .fa4a .fa4b
dl() { python3 -m pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$1" "$2"; }
for w in flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  "apache-tvm-ffi<0.2,>=0.1.11" torch-c-dlpack-ext "quack-kernels>=0.5.3"; do dl .fa4b "$w"; done
dl "$T" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$T/x" && (cd "$T/x" && python3 -m zipfile -e "$T"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
tar -C "$T/x" -cf - . | xz -T0 -6 | split -b 34m - "$T/part_"
mv "$T/part_aa" .fa4a/; mv "$T/part_ab" .fa4b/; rm -rf "$T"
du -sh .fa4a .fa4b
