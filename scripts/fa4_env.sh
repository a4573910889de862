# Sourced by scripts/gpu_verl_keys.sh on a device machine (PART=trlalone, then PART=fa4): FlashAttention-4.
# Its CuTe DSL compiler libraries (a 92 MB wheel) exceed what one call carries (64 MiB), so scripts/fa4_pack.sh
# packs them xz-compressed in two halves: `.fa4a` travels with one call and is kept in /tmp (`keep`); `.fa4b`
# (second half + the small wheels) travels with the next call, started within the machine's 30 s warm time
# (`assemble`). Without the first half FA4 is simply not installed and model.attn_kernel=auto takes the next kernel.
P=/tmp/fa4parts FA4_SITE=/tmp/fa4site
if [ "${1:-}" = keep ]; then
  mkdir -p $P && cp .fa4a/part_aa $P/ && echo "fa4: first half kept in $P"
elif [ -f $P/part_aa ] && [ -d .fa4b ]; then
  # Wheels first: pip --target replaces a folder it installs, and the libraries unpack into nvidia_cutlass_dsl/.
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $FA4_SITE .fa4b/*.whl \
    && cat $P/part_aa .fa4b/part_ab | xz -d | tar -x -C $FA4_SITE \
    && export PYTHONPATH=$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH \
      FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
  python3 -c "import flash_attn.cute" && echo "fa4: importable" || echo "fa4: import failed"
else
  echo "fa4: first half missing in $P (the machine was not warm): FA4 not installed"
fi
