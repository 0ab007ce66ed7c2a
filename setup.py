"""Build script for accel.

The Python package lives in ``python/accel`` and the Triton kernels in ``kernels/`` (installed as
``accel.kernels``). The C++ CPU extension ``accel._C`` (pybind11 + OpenMP, ``-O3 -march=native``) is
always built unless ``ACCEL_SKIP_CPU_BUILD=1``; the CUDA extension ``accel._C_cuda`` is built only
where a CUDA build of torch and ``nvcc`` are present (or never, with ``ACCEL_SKIP_CUDA_BUILD=1``).
Without any extension the package still imports and runs on its pure-torch reference paths.

Install with ``pip install --no-build-isolation .`` so the build uses the torch already installed
(build isolation would resolve a fresh, CUDA, torch).
"""
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(ROOT, "python", "accel", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _extensions():
    exts, cmdclass = [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # pure-Python install
        return exts, cmdclass
    include = [os.path.join(ROOT, "csrc", "include")]
    if os.environ.get("ACCEL_SKIP_CPU_BUILD", "0") != "1":
        march = os.environ.get("ACCEL_MARCH", "native")
        exts.append(
            CppExtension(
                name="accel._C",
                sources=["csrc/bindings.cpp", "csrc/src/decode_attention_cpu.cpp", "csrc/src/linear_cpu.cpp", "csrc/src/sparse_cpu.cpp", "csrc/src/probe_cpu.cpp",
                         "csrc/src/kv_cpu.cpp", "csrc/src/latent_cpu.cpp", "csrc/src/fused_decode_cpu.cpp"],
                include_dirs=include,
                extra_compile_args=["-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-std=c++17"],
                extra_link_args=["-fopenmp"],
            )
        )
    want_cuda = os.environ.get("ACCEL_SKIP_CUDA_BUILD", "0") != "1"
    if want_cuda and torch.version.cuda is not None and shutil.which("nvcc"):
        exts.append(
            CUDAExtension(
                name="accel._C_cuda",
                sources=["csrc/src/decode_attention_cuda.cu"],
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    if exts:
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    return exts, cmdclass


ext_modules, cmdclass = _extensions()

setup(
    name="accel",
    version=_version(),
    description="Inference-time acceleration runtime for HuggingFace LLMs and VLMs",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "python", "accel.kernels": "kernels"},
    # every package under python/ is found (a hand-written list once left subpackages out of non-editable installs)
    packages=find_packages("python", include=["accel", "accel.*"])
    + ["accel.kernels"] + [f"accel.kernels.{p}" for p in find_packages("kernels")],
    package_data={"accel": ["plan/shipped_plans/*.json", "scheduler/shipped_costs/*.json"]},
    install_requires=[
        "torch>=2.4",
        # the window accel is tested on, both ends in CI (accel.compat.TRANSFORMERS_MIN / _MAX)
        "transformers>=5.23.0,<=5.25.0",
        "safetensors",
        "numpy",
        "scipy>=1.9",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["triton"],
        "flash": ["flash-attn"],
        "models": ["gguf", "accelerate", "sentencepiece"],
        "test": ["pytest", "hypothesis"],
        "vlm": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["accel=accel.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
