#!/usr/bin/env bash
# One-shot GPU check for a machine with a CUDA device (CI has none): build accel with its CUDA extension,
# run the GPU twins of the CPU tests (tests/test_gpu.py, the Triton kernels compiled for the device, not
# interpreted), then bench/bench_gpu.py. Every stage runs even if an earlier one failed; logs and
# bench_gpu.csv go to $OUT (default /tmp/gpu_out).
#   bash bench/gpu_check.sh            # everything
#   GPU_QUICK=1 bash bench/gpu_check.sh  # small decode setting
# Wheels in .whl/ (e.g. the transformers version requirements.txt pins) are installed first, to /tmp/site.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stage() { echo "== $1 ($(date +%T))"; }
stage env
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1; nproc; } 2>&1 | tee "$OUT/env.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -c "import transformers; print('transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
stage build
t0=$(date +%s)
# only the CUDA extension: the CPU one is built and tested on the project machines
ACCEL_SKIP_CPU_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=${MAX_JOBS:-16} \
  timeout "${BUILD_TIMEOUT:-300}" $PY -m pip install --no-index --no-deps --no-build-isolation --no-compile . > "$OUT/build.txt" 2>&1
echo "build rc=$? in $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/build.txt"
(cd /tmp && $PY -c "import accel, accel._ext as e; from accel.ops.attention import backend_report; print(accel.__file__, 'cuda ext:', e.HAS_CUDA_EXT, e.CUDA_EXT_REASON); print(backend_report())") 2>&1 | tee -a "$OUT/env.txt"
stage tests
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -rf tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" | tail -40
stage bench
Q=""; [ "${GPU_QUICK:-0}" = "1" ] && Q="--quick"
timeout "${BENCH_TIMEOUT:-240}" $PY bench/bench_gpu.py --out "$OUT" --time-budget "${BENCH_BUDGET:-150}" $Q 2>&1 | tee "$OUT/bench.txt" | tail -60
stage done
