#!/usr/bin/env bash
# Installs everything, then runs the main job: passkey on the embedded SmolLM2, unpatched vs accel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
accel demo "$@"
