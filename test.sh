#!/usr/bin/env bash
# Run the test suite in the repo's .venv (created/updated by scripts/ensure_env.sh).
#   ./test.sh                 # everything under tests/
#   ./test.sh -k delta -x     # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
bash "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
export TORCHDYNAMO_DISABLE=1
# The architecture contracts (.importlinter): layers, nothing imports testing, no cycles.
.venv/bin/lint-imports --no-cache .importlinter
exec .venv/bin/python -m pytest -q --durations=15 tests "$@"
