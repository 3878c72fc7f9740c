#!/usr/bin/env bash
# The prepared accelerator run (bench/gpu.py): head step, r50 / r100 train step
# and input pipeline as one table, in <= 8 minutes on one H100/H200.
#   bash bench/gpu.sh [--json FILE]       on the accelerator host
#   bash bench/gpu.sh --smoke             the same code at toy sizes, 8 emulated CPU devices
# Uses $PYTHON, else .venv/bin/python, else python3 (JAX with the accelerator's plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
exec "$py" bench/gpu.py "$@"
