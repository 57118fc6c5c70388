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


def _native_compile_command(out: Path) -> list:
    # Loaded by path: importing the lrm_rt package here would need its runtime dependencies.
    spec = importlib.util.spec_from_file_location("_lrm_build", ROOT / "lrm_rt" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.native_compile_command(ROOT / "cuda", out)


class BuildNative(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = _native_compile_command(out)
        print(" ".join(cmd))
        subprocess.check_call(cmd)


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        dst = Path(self.build_lib) / "lrm_rt" / "cuda_src"
        dst.mkdir(parents=True, exist_ok=True)
        for src in (p for pattern in ("*.cu", "*.cuh", "*.h") for p in (ROOT / "cuda").glob(pattern)):
            shutil.copy2(src, dst / src.name)


setup(
    name="lrm_rt",
    version="0.1.0",
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
        "gpu": ["cupy-cuda12x"],
    },
    ext_modules=[Extension("lrm_rt._lrm_native", sources=[])],
    cmdclass={"build_ext": BuildNative, "build_py": BuildPyWithKernels},
    entry_points={"console_scripts": ["lrm-rt=lrm_rt.cli:main"]},
)
