# Sourced by the GPU scripts on a device machine: unbuffered output, NVLink multicast off,
# $OUT ready, and the carried wheels (.whl, from ../shared/gpu/fetch_wheels.sh) on PYTHONPATH.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
fi
