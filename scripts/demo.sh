#!/usr/bin/env bash
# Installs everything, then runs the main job: passkey on the embedded SmolLM2, unpatched vs accel.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
bash scripts/setup.sh
accel demo "$@"
