#!/usr/bin/env bash
# The main job from a clean checkout: set up what is missing (venv, pinned ComfyUI host; no
# browser needed), then run the bundled text-to-video workflow headlessly through a real
# ComfyUI server and print where the video was written.
#   scripts/main_job.sh [--models ~/ComfyUI/models] [--demo] [--prompt "..."] [--seed N]
# Real weights are used when they are in --models (or $MOCHI_MODELS); otherwise the generated
# demo checkpoint, and the output is labelled DEMO (random weights).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh --no-browser
exec .venv/bin/python scripts/run_main_job.py "$@"
