"""Locate the kernel sources and load the CPU build of them (a plain C ABI, called through ctypes).

The library is normally built by ``pip install`` (setup.py). When it is missing, older than the sources (a
developer editing cuda/*.cu in a checkout), or built for a CPU with extensions this one lacks (its .isa record),
it is compiled just in time ($CXX, default g++) into a per-user cache (LRM_RT_CACHE), so tests always run the
code that is on disk. LRM_RT_NATIVE_LIB names a prebuilt library instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from ._build import is_portable, isa_flags, missing_isa, native_compile_command, write_isa_record
from .errors import BackendError
from .files import cache_dir

_PKG = Path(__file__).resolve().parent
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def cuda_source_dir() -> Path:
    """The .cu/.cuh sources: the checkout's cuda/ folder, else the copy shipped in the package."""
    for cand in (_PKG.parent / "cuda", _PKG / "cuda_src"):
        if (cand / "compat.cuh").is_file():
            return cand
    raise BackendError("kernel sources not found (neither cuda/ in a checkout nor lrm_rt/cuda_src)")


def nvrtc_module_source(*files: str) -> str:
    """The .cu files as one NVRTC module text, local ``#include "..."`` headers inlined once.

    Inlining (instead of -I) means NVRTC needs no include path and CuPy's compile cache, keyed on the
    source text, sees header edits.
    """
    src_dir = cuda_source_dir()
    seen = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = re.sub(r"^\s*#\s*pragma\s+once\s*$", "", (src_dir / name).read_text(), flags=re.M)
        return re.sub(r'^\s*#\s*include\s+"([^"]+)"\s*$', lambda m: expand(m.group(1)), text, flags=re.M)

    return "".join(expand(f) for f in files)


def _kernel_files(src: Path) -> list:
    return sorted(p for pattern in ("*.cu", "*.cuh", "*.h") for p in src.glob(pattern))


def _sources_digest(src: Path) -> str:
    h = hashlib.sha256()
    for p in _kernel_files(src):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    # A -march=native build is only good for CPUs like this one (a home folder shared between machines).
    h.update(b"portable" if is_portable() else " ".join(isa_flags()).encode())
    return h.hexdigest()[:16]


def _compile(src: Path, out: Path) -> None:
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = native_compile_command(src, tmp)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BackendError(f"native kernels need a C++ compiler ({cmd[0]}) to build: {e}") from None
    except subprocess.CalledProcessError as e:
        raise BackendError(f"building the native kernels failed (exit status {e.returncode} of {cmd[0]}):\n"
                           f"{(e.stderr or e.stdout or '')[-4000:]}") from None
    write_isa_record(out)  # before the library appears: whoever finds the library finds its record
    os.replace(tmp, out)


def _built_library() -> Optional[Path]:
    libs = sorted(_PKG.glob("_lrm_native*.so")) + sorted(_PKG.glob("_lrm_native*.pyd"))
    return libs[0] if libs else None


def native_library_path() -> Path:
    """Path of an up-to-date CPU build, compiling one into the cache when needed; LRM_RT_NATIVE_LIB names a
    prebuilt one instead (a portable build shipped with an application, or another target's in the tests)."""
    chosen = os.environ.get("LRM_RT_NATIVE_LIB")
    if chosen:
        if not Path(chosen).is_file():
            raise BackendError(f"LRM_RT_NATIVE_LIB={chosen} is not a file")
        return Path(chosen)
    src = cuda_source_dir()
    built = _built_library()
    newest_src = max(p.stat().st_mtime for p in _kernel_files(src))
    # A wheel built on a CPU with extensions this one lacks would die of SIGILL: build for this CPU instead.
    lacking = missing_isa(built) if built is not None else []
    if built is not None and not lacking and (src.parent != _PKG.parent or built.stat().st_mtime >= newest_src):
        return built
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        out = cache / f"lrm_native-{_sources_digest(src)}-py{sys.version_info[0]}.so"
        if not out.exists():
            _compile(src, out)
    except OSError as e:  # e.g. a read-only or missing home directory (a service account)
        raise BackendError(f"cannot build the native kernels into the cache {cache} ({e.strerror or e}): set "
                           "LRM_RT_CACHE to a writable folder") from None
    except BackendError as e:
        if lacking:
            raise BackendError(f"the installed native kernels were built for a CPU with {', '.join(lacking)}, "
                               f"which this one lacks, and rebuilding them here failed: {e}") from None
        raise
    return out


def usable_cpus() -> int:
    """Processors this process may run on (its affinity mask, e.g. under taskset or a container's cpuset): the
    most threads worth starting. OpenMP exits the process, with no Python error, when the OS refuses a thread."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def native() -> ctypes.CDLL:
    """The loaded CPU kernel library (built once per process)."""
    global _lib
    with _lock:
        if _lib is None:
            path = native_library_path()
            try:
                _lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise BackendError(f"cannot load the native kernels {path}: {e}") from None
        return _lib


def simd_lanes() -> Optional[int]:
    """float32 lanes of the CPU build's vector code: 16 (AVX-512), 8 (AVX/AVX2) or 4 (SSE, NEON); None for a
    library from before the entry point existed (LRM_RT_NATIVE_LIB may name one)."""
    fn = getattr(native(), "lrm_field_simd_lanes", None)
    if fn is None:
        return None
    fn.argtypes, fn.restype = [], ctypes.c_int32
    return int(fn())


def native_entry(name: str, argtypes: list):
    """An entry point of the CPU build that returns an int status, its C signature set (ctypes would otherwise
    pass every Python int as a C int)."""
    fn = getattr(native(), name)
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def use_native(backend: str) -> bool:
    """The choice between a kernel's CPU build and the Python reference it equals: "native", "reference", or
    "auto" (native when the library builds here)."""
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"unknown kernel backend {backend!r} (auto, native or reference)")
    return native_available() if backend == "auto" else backend == "native"


def native_available() -> bool:
    return native_unavailable_reason() is None


def native_unavailable_reason() -> Optional[str]:
    """None when the CPU build loads (building it if needed), else why it does not."""
    try:
        native()
        return None
    except (BackendError, OSError) as e:
        return " ".join(str(e).split()) or type(e).__name__
