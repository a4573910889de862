# Sourced by the GPU scripts on a device machine: unbuffered output, NVLink multicast off,
# $OUT ready, and the carried wheels (.whl, from ../shared/gpu/fetch_wheels.sh) on PYTHONPATH.
# liger-kernel goes to its own folder ($LIGER_SITE) so a script can run with and without it.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Nothing outside the device machine can be reached: libraries that would ask the Hub (TRL, datasets) must
# not wait on connections that never answer.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$@"; }
  pipi /tmp/site $(ls .whl/*.whl | grep -v liger_kernel) || exit 1
  LIGER_SITE=/tmp/liger_site
  ls .whl/liger_kernel*.whl >/dev/null 2>&1 && { pipi $LIGER_SITE .whl/liger_kernel*.whl || exit 1; }
  export LIGER_SITE PYTHONPATH=/tmp/site:$LIGER_SITE:$PWD:${PYTHONPATH:-}
fi
