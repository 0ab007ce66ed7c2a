"""The C++ kernels' 16-lane vector layer in both of its forms: one native vector with AVX-512, a pair of 8-lane
vectors without it (GCC lowers a 64-byte vector type through memory on AVX2, which made the kernels ~5x slower
than torch there). Both forms are built from csrc/tools/vec_check.cpp and checked against scalar references on
this machine; the headers must also compile for AVX-512, AVX2 and baseline x86-64 targets whatever the host."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")
X86 = platform.machine() in ("x86_64", "AMD64")


def _build(tmp_path, name, flags):
    assert CXX is not None, "a C++ compiler (g++) is needed to build accel's CPU kernels"
    exe = tmp_path / name
    r = subprocess.run([CXX, "-O2", "-std=c++17", "-Wno-psabi", *flags, "-I", str(ROOT / "csrc" / "include"),
                        str(ROOT / "csrc" / "tools" / "vec_check.cpp"), "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return exe


@pytest.mark.parametrize("pair", [False, True])
def test_vector_layer_matches_scalar_reference(tmp_path, pair):
    exe = _build(tmp_path, f"vec_{pair}", ["-march=native"] + (["-DACCEL_VEC_PAIR"] if pair else []))
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    vals = dict(zip(out[1::2], map(float, out[2::2])))
    if pair:
        assert out[0] == "pair"
    assert vals["exp"] < 1e-5 and vals["sum"] < 1e-5 and vals["max"] == 0.0 and vals["ops"] < 1e-4
    assert vals["linear"] < 2e-4  # K up to 1100, fp32 sums


@pytest.mark.skipif(not X86, reason="x86 targets")
@pytest.mark.parametrize("arch", ["skylake-avx512", "haswell", "x86-64"])
def test_kernel_headers_compile_for_each_x86_target(tmp_path, arch):
    src = tmp_path / "all.cpp"
    src.write_text("".join(f'#include "accel/cpu/{h}.h"\n' for h in
                           ("decode_attention", "latent_decode", "block_sparse_prefill", "select", "linear",
                            "quest", "ragged_kv"))
                   + "int main() { return 0; }\n")
    r = subprocess.run([CXX, "-fsyntax-only", "-std=c++17", "-fopenmp", "-Wno-psabi", f"-march={arch}",
                        "-I", str(ROOT / "csrc" / "include"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not X86, reason="x86 targets")
@pytest.mark.parametrize("tool", ["decode_bench.cpp", "linear_bench.cpp"])
@pytest.mark.parametrize("arch", ["skylake-avx512", "haswell"])
def test_kernel_timing_tools_compile(tool, arch):
    """The kernel timing tools in csrc/tools (used for the before/after figures in docs/methods/dense.md) build
    against the current headers for AVX-512 and for AVX2, whatever the host."""
    assert CXX is not None, "a C++ compiler (g++) is needed to build accel's CPU kernels"
    r = subprocess.run([CXX, "-fsyntax-only", "-std=c++17", "-fopenmp", "-Wno-psabi", f"-march={arch}",
                        "-I", str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "tools" / tool)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _host_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not X86, reason="x86 targets")
@pytest.mark.parametrize("arch", ["native", "haswell"])
def test_decode_attention_both_vector_forms(tmp_path, arch):
    """csrc/tools/decode_check.cpp against its double-precision reference, built for the host's vectors and for AVX2:
    on an AVX-512 host this also runs the AVX2 tiles (8 lanes, 16-token tiles), which the Python tests, using the
    extension built for the host, never reach."""
    if arch == "haswell" and not _host_has("avx2"):
        pytest.skip("the host cannot run AVX2 code")
    assert CXX is not None, "a C++ compiler (g++) is needed to build accel's CPU kernels"
    exe = tmp_path / f"decode_check_{arch}"
    r = subprocess.run([CXX, "-O2", "-std=c++17", "-fopenmp", "-Wno-psabi", f"-march={arch}",
                        "-I", str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "tools" / "decode_check.cpp"),
                        "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    want = "lanes 8" if arch == "haswell" else ("lanes 16" if _host_has("avx512f") else "lanes")
    assert want in out.stdout, out.stdout
