"""The compiler command for the CPU build of cuda/*.cu (stdlib only: setup.py loads this file directly)."""
from __future__ import annotations

import os
from pathlib import Path


def native_compile_command(src_dir: Path, out: Path, arch: "list | None" = None) -> list:
    cxx = os.environ.get("CXX", "g++")
    # -march=native by default: the library is built on the machine that runs it (pip install or the
    # just-in-time build), as ggml does; LRM_RT_PORTABLE=1 builds for the generic target instead.
    # `arch` replaces both (the tests build the narrower SIMD paths this way).
    if arch is None:
        arch = [] if os.environ.get("LRM_RT_PORTABLE") else ["-march=native"]
    sources = sorted(str(p) for p in Path(src_dir).glob("*.cu"))
    return [cxx, "-x", "c++", "-std=c++17", "-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
            *arch, "-I", str(src_dir), *sources, "-o", str(out)]
