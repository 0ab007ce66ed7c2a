#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
bash scripts/setup.sh
export OMP_NUM_THREADS=1
python -m pytest -q tests
