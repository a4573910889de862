#!/usr/bin/env bash
# Start-up with and without the tokenised cache (docs/PERFORMANCE.md "Tokenised cache"), on CPU or GPU hosts.
# Cold builds on ROWS distinct conversations with 1, 2 and 4 processes; warm start-up on
# ROWS*COPIES conversations (big.parquet = small.parquet repeated; its cache is written by
# `sft.bench.cache replicate` from the small cache, see that module); host memory per rank.
# Usage: bash benchmarks/cache_bench.sh [OUT_DIR]   (default /tmp/sft_cache_bench; about 7 GB with the defaults)
# Results: one JSON line per launch in OUT_DIR/results.jsonl, disk use in OUT_DIR/disk.txt.
set -euo pipefail
OUT=${1:-${OUT_DIR:-/tmp/sft_cache_bench}}
ROWS=${ROWS:-20000}
COPIES=${COPIES:-50}
mkdir -p "$OUT"
RES=$OUT/results.jsonl
launch() {  # launch NPROC FILE CACHE_DIR ("" = no cache)
  SFT_LAUNCH_T=$(date +%s.%N) torchrun --standalone --nproc_per_node="$1" -m sft.bench.cache run \
    "$2" "$3" --tok "$OUT/tok" --out "$RES" 2>&1 | grep -v "sequence length is longer" || true
}
[ -f "$OUT/big.parquet" ] || python -m sft.bench.cache gen "$OUT" --rows "$ROWS" --copies "$COPIES"
for n in 1 2 4; do
  rm -rf "$OUT/cold$n"
  launch "$n" "$OUT/small.parquet" "$OUT/cold$n"          # cold: tokenize and write
done
launch 1 "$OUT/small.parquet" "$OUT/cold1"                 # warm, small
for n in 1 4; do launch "$n" "$OUT/small.parquet" ""; done # no cache: in-memory, per-rank copies
[ -d "$OUT/big_cache" ] || { cp -r "$OUT/cold1" "$OUT/big_cache" && python -m sft.bench.cache replicate "$OUT" "$OUT/big_cache" --copies "$COPIES"; }
for n in 1 4 1; do launch "$n" "$OUT/big.parquet" "$OUT/big_cache"; done  # warm, big
du -sh "$OUT"/big_cache/sft-* "$OUT/big.parquet" "$OUT/small.parquet" | tee -a "$OUT/disk.txt"
