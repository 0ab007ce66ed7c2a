"""CUDA kernels are compile-checked with nvcc (no GPU here): the torch-free headers must build for
Ampere (sm_80) and Hopper (sm_90)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_headers_compile(tmp_path, arch):
    out = tmp_path / f"check_{arch}.o"
    r = subprocess.run(
        [NVCC, "-c", "-std=c++17", f"-arch={arch}", "-I", str(ROOT / "csrc" / "include"),
         str(ROOT / "csrc" / "tools" / "compile_check.cu"), "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
