#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py). Two uses:
#   bash bench/gpu_check.sh prepare   # here: diffusers' wheels into bench/results/wheels (ignored)
#   bash bench/gpu_check.sh device    # there, as the ONE device call:
#     run(command="bash bench/gpu_check.sh device",
#         carry=[".host/ComfyUI", "bench/results/wheels"], timeout_s=480)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/results/wheels
case "${1:-}" in
  prepare)
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" diffusers==0.42.1 importlib_metadata==10.2.0
    du -sh "$WHEELS" ;;
  device)
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
    else
      echo "no wheels in $WHEELS: the peers section will skip diffusers"
    fi
    OUT_DIR="${OUT:-/tmp}"
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" "${@:2}" \
      2>&1 | tee "$OUT_DIR/gpu_check.log" ;;
  *) echo "usage: $0 prepare|device [gpu_check.py options]" >&2; exit 2 ;;
esac
