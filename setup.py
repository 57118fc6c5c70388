"""Build and install lrm_rt.

The CPU build of the kernels in cuda/ is compiled here as C++ (through cuda/compat.cuh) into one
shared library, lrm_rt/_lrm_native*.so, which lrm_rt.kernels loads with ctypes. It exposes a plain
C ABI, so the build needs no torch or Python headers. The .cu sources are also shipped inside the
package (lrm_rt/cuda_src) for the CuPy/NVRTC GPU path.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _build_module():
    # Loaded by path: importing the lrm_rt package here would need its runtime dependencies.
    spec = importlib.util.spec_from_file_location("_lrm_build", ROOT / "lrm_rt" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildNative(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not list((ROOT / "cuda").glob("*.cu")):
            raise RuntimeError(f"the kernel sources (cuda/*.cu) are missing from {ROOT}: an incomplete checkout or "
                               "source distribution")
        build = _build_module()
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = build.native_compile_command(ROOT / "cuda", out)
        print(" ".join(cmd))
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            # lrm_rt still runs: it builds the kernels just in time when a compiler appears, else the "auto"
            # field backend uses the torch reference (much slower).
            print(f"WARNING: the native CPU kernels were not built ({e}); lrm_rt needs a C++17 compiler with "
                  "OpenMP (g++) for its fast CPU path, and uses the torch reference until it has one")
            out.unlink(missing_ok=True)
            return
        # A -march=native library runs only on CPUs with the build CPU's extensions; lrm_rt.kernels reads this
        # record and rebuilds (or falls back) on others instead of dying of SIGILL. Wheels and plain installs
        # carry it; an editable install does not (it runs where it was built).
        build.write_isa_record(out)


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        dst = Path(self.build_lib) / "lrm_rt" / "cuda_src"
        dst.mkdir(parents=True, exist_ok=True)
        for src in (p for pattern in ("*.cu", "*.cuh", "*.h") for p in (ROOT / "cuda").glob(pattern)):
            shutil.copy2(src, dst / src.name)


setup(
    name="lrm_rt",
    version="0.2.0",
    description="Fast inference runtime for Large Reconstruction Models (OpenLRM, TripoSR)",
    packages=find_packages(include=["lrm_rt", "lrm_rt.*"]),
    # built-in models (lrm_rt/models_data/<name>/: config, weights, model card) ship with the package
    package_data={"lrm_rt": ["models_data/**/*"]},
    python_requires=">=3.10",
    # torch is not pinned here on purpose: install it first (see README) so pip does not pull
    # a multi-GB CUDA build; any torch >= 2.4 works (the GPU machine runs 2.11).
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=10",
        "safetensors>=0.4",
        "trimesh>=4",
        "PyMCubes>=0.1.4",
        "pyyaml>=6",
    ],
    extras_require={
        # rtree: trimesh's ray caster without embree, which training/ renders its ground truth with
        "test": ["pytest>=7", "scipy>=1.10", "onnx>=1.16", "onnxruntime>=1.18", "rtree>=1.0", "xatlas>=0.0.9",
                 "fast-simplification>=0.1.7"],
        "texture": ["xatlas>=0.0.9", "fast-simplification>=0.1.7"],  # --texture (UV unwrapping), --faces
        "hub": ["huggingface_hub>=0.20"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        # the CuPy build for CUDA 13 drivers and torch cu13x wheels (the tested set-up); CUDA 12: gpu-cuda12
        "gpu": ["cupy-cuda13x"],
        "gpu-cuda12": ["cupy-cuda12x"],
    },
    ext_modules=[Extension("lrm_rt._lrm_native", sources=[])],
    cmdclass={"build_ext": BuildNative, "build_py": BuildPyWithKernels},
    entry_points={"console_scripts": ["lrm-rt=lrm_rt.cli:main"]},
)
