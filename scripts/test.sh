#!/usr/bin/env bash
# The project's test command: sets up what is missing (scripts/setup.sh), lints, runs every test.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/core -k parity).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
printf '\n== ruff\n'
.venv/bin/ruff check .
printf '\n== pytest\n'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
