#!/usr/bin/env bash
# Sets up the project with its dev extras, then runs the linters and the test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
python3 -m ruff check sft tests
python3 -m ruff format --check sft tests
python3 -m pytest -q -x "$@"
