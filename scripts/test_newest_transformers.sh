#!/usr/bin/env bash
# The exactness tests (pytest -m exactness) on the newest transformers release accel supports, installed beside the
# pinned one (pip --target, PYTHONPATH) so the rest of the environment stays as set up. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
NEWEST=$(python -c "from accel.compat import TRANSFORMERS_MAX; print(TRANSFORMERS_MAX)")
DIR="${ACCEL_NEWEST_TF_DIR:-$(python -c 'import sys; print(sys.prefix)')/transformers-$NEWEST}"
if [ ! -f "$DIR/transformers/__init__.py" ]; then
  python -m pip install --disable-pip-version-check -q --no-deps --target "$DIR" "transformers==$NEWEST"
fi
export OMP_NUM_THREADS=1
PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -m exactness tests
