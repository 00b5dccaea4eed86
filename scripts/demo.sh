#!/usr/bin/env bash
# Quick start: sets up its own venv (.venv) with the CPU torch first (a bare `torch` could pull a multi-GB CUDA
# build), then the pack with the trainer's packages, then runs the trainer's demo end to end on tiny models
# (prepare -> fit -> export -> eval; CPU, about a minute, nothing downloaded). Arguments go to the demo:
#   bash scripts/demo.sh [--steps 30] [--out demo_output] [--photos DIR --insightface-root ROOT] [--synthetic]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
pip install --quiet -e ".[train]"
python -m train demo "$@"
