"""The real CUDA build of cuda/*.cu (nvcc, not the C++ shim) for every GPU generation we target.

Runs wherever nvcc is on PATH (no GPU needed); skipped only when it is absent. Two views per source:
* the full nvcc build (device code for every arch + host side), as a C library for CUDA would build it;
* NVRTC's view: -DLRM_HOST_API=0 (no host entry points; compat.cuh honours the override) compiled as
  relocatable device code, which is what cupy.RawModule compiles at run time.
An arch that this nvcc no longer accepts fails loudly (test_arch_supported) instead of being dropped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = ["75", "80", "86", "87", "89", "90"]  # Turing, A100, Ampere consumer, Orin, Ada, Hopper

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def nvcc(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=timeout)


def gencode(archs) -> list:
    return [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]


@pytest.fixture(scope="module")
def nvcc_version() -> str:
    out = nvcc("--version").stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def supported_codes() -> set:
    res = nvcc("--list-gpu-code")
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_sources_found():
    assert "triplane_field.cu" in SOURCES


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_supported(arch, supported_codes, nvcc_version):
    assert f"sm_{arch}" in supported_codes, (
        f"nvcc {nvcc_version} no longer accepts sm_{arch} (it lists {sorted(supported_codes)}): "
        "drop it from the supported targets explicitly")


@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_builds_all_archs(source, tmp_path, supported_codes, nvcc_version):
    archs = [a for a in ARCHS if f"sm_{a}" in supported_codes]  # the unsupported ones fail test_arch_supported
    obj = tmp_path / (Path(source).stem + ".o")
    res = nvcc("-c", "-x", "cu", "-std=c++17", "--threads", "0", *gencode(archs), "-I", str(CUDA_DIR),
               str(CUDA_DIR / source), "-o", str(obj))
    assert res.returncode == 0, f"nvcc {nvcc_version} failed on {source} for sm_{archs}:\n{res.stderr[-4000:]}"
    assert obj.stat().st_size > 0


@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_view_compiles(source, tmp_path, nvcc_version):
    """Device code only, no host API and relocatable, as NVRTC sees the file; warnings count as failures
    for the kernels (-Werror all-warnings), so NVRTC-incompatible host leftovers show up here."""
    obj = tmp_path / (Path(source).stem + "_dc.o")
    res = nvcc("-dc", "-x", "cu", "-std=c++17", "-DLRM_HOST_API=0", "-Werror", "all-warnings",
               *gencode(["75"]), "-I", str(CUDA_DIR), str(CUDA_DIR / source), "-o", str(obj))
    assert res.returncode == 0, f"nvcc {nvcc_version} (NVRTC view) failed on {source}:\n{res.stderr[-4000:]}"


@pytest.mark.parametrize("module", ["field", "marching_cubes"])
def test_cupy_module_text_compiles(module, tmp_path, nvcc_version):
    """The exact text CuPy hands to NVRTC (headers inlined, several .cu files in one module) compiles."""
    if module == "field":
        from lrm_rt.field.cuda import kernel_source as source
    else:
        from lrm_rt.mc import cuda_source as source
    src = tmp_path / f"{module}_module.cu"
    src.write_text(source())
    res = nvcc("-c", "-x", "cu", "-std=c++17", "-DLRM_HOST_API=0", *gencode(["90"]), str(src),
               "-o", str(tmp_path / f"{module}.o"))
    assert res.returncode == 0, f"nvcc {nvcc_version} failed on the {module} module text:\n{res.stderr[-4000:]}"


def test_c_library_renames_every_kernel_it_includes():
    """src/field_cuda.cu compiles kernel files into liblrm_rt beside their CPU build, whose extern "C" names
    are the same: each included kernel needs a #define to a lrm_cuda_ name, or the link fails."""
    src = (CUDA_DIR.parent / "src" / "field_cuda.cu").read_text()
    renamed = set(re.findall(r"#define (lrm_\w+) lrm_cuda_\w+", src))
    for name in re.findall(r'#include "(\w+\.cu)"', src):
        kernels = set(re.findall(r"LRM_KERNEL void (\w+)\(", (CUDA_DIR / name).read_text()))
        assert kernels <= renamed, f"{name}: not renamed in src/field_cuda.cu: {sorted(kernels - renamed)}"
