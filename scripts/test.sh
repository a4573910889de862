#!/usr/bin/env bash
# Sets up the project with its dev extras, then runs the linters and the test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# sft's Triton kernels are tested under Triton's interpreter on CPU (tests/triton_interp.py). Where the environment
# has no triton, it goes into a side folder that only those tests' subprocesses see.
if ! python3 -c "import triton" 2>/dev/null && [ ! -d .cache/triton-interpreter/triton ]; then
  python3 -m pip install -q --no-deps --target .cache/triton-interpreter "triton==${SFT_TRITON_VERSION:-3.5.0}"
fi
python3 -m ruff check sft tests benchmarks
python3 -m ruff format --check sft tests benchmarks
# Two workers, whole files each (module fixtures build their models once): the 2-core CI machine's second core
# would otherwise idle while one test waits on process start-up and imports.
python3 -m pytest -q -x -n "${SFT_TEST_WORKERS:-2}" --dist loadfile "$@"
