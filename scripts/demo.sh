#!/usr/bin/env bash
# Quick start: sets up its own venv (.venv), installs the pack with the trainer's packages, runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
pip install --quiet -e ".[train]"
python -m train.demo "$@"
