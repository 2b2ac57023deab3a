#!/usr/bin/env bash
# Run the project's main job in the repo's .venv (created/updated by scripts/ensure_env.sh).
# Runs in the caller's cwd so relative paths given as arguments keep their meaning.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
bash "$ROOT/scripts/ensure_env.sh"
exec "$ROOT/.venv/bin/python" -m ders_megatron.pipeline.main_job "$@"
