#!/usr/bin/env bash
# Installs accel non-editable (as `pip install .` users get it) and uses it from outside the source tree:
# `accel info`, one patched generation on the embedded model, `accel eval --quick`. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
# a built (non-editable) copy in a scratch folder, first on the path, so a developer's editable install stays as it is
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps --target "$WORK/site" .
export PYTHONPATH="$WORK/site"
accel() { python -m accel "$@"; }
cd "$WORK"
python - <<'PY'
import os, accel, accel._ext as e
assert accel.__file__.startswith(os.environ["PYTHONPATH"]), accel.__file__  # the installed copy, not the source tree
print("installed accel", accel.__version__, "from", accel.__file__, "| C++ kernels:", "built" if e.HAS_CPU_EXT else e.CPU_EXT_REASON)
PY
accel info
OMP_NUM_THREADS=1 python - <<'PY'
import torch, accel
torch.set_num_threads(1)
model, tok = accel.models.load("smollm2-135m")
enc = tok(["The capital of France is"], return_tensors="pt")
ref = model.generate(**enc, max_new_tokens=8, do_sample=False)
with accel.patch(model, policy="dense") as h:
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    held = h.cache.nbytes()
assert torch.equal(out, ref), "patched generation differs from unpatched"
assert held > 0, "accel's cache held nothing"
print("patched generation equals unpatched:", repr(tok.decode(out[0, enc.input_ids.shape[1]:])), f"({held} KV bytes held)")
PY
OMP_NUM_THREADS=1 accel eval --quick --out "$(pwd)/quick.csv"
