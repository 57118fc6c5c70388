"""Packaging: what the source distribution holds, what setup.py does without a compiler, and the guard that
keeps a -march=native library away from CPUs that lack its extensions (a wheel or cache copied between
machines would otherwise die of SIGILL, which no Python code can catch)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lrm_rt import _build, kernels
from lrm_rt.errors import BackendError

ROOT = Path(__file__).resolve().parent.parent


def _setup_py(args: list, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_sdist_holds_what_a_build_and_the_tests_need(tmp_path):
    run = _setup_py(["-q", "sdist", "-d", str(tmp_path), "--formats=gztar"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (archive,) = tmp_path.glob("lrm_rt-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    kernel_sources = {f"cuda/{p.name}" for p in (ROOT / "cuda").iterdir() if p.suffix in (".cu", ".cuh", ".h")}
    assert kernel_sources and kernel_sources <= names  # without them the sdist could not be built at all
    wanted = {"setup.py", "MANIFEST.in", "pytest.ini", "README.md", "tests/conftest.py", "examples/chair.png",
              "CMakeLists.txt", "include/lrm_rt.h", "src/api.cpp", "lrm_rt/models_data/lrm-tiny/model.safetensors",
              "training/train.py", "benchmarks/suite.py"}  # what tests/test_training.py and test_bench.py import
    assert wanted <= names, wanted - names
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n or n.startswith(
        ("training/data/", "benchmarks/results/"))]


def test_setup_without_a_compiler_warns_and_goes_on(tmp_path):
    run = _setup_py(["build_ext", "--build-lib", str(tmp_path), "--build-temp", str(tmp_path / "t")], tmp_path,
                    CXX="/bin/false")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "native CPU kernels were not built" in run.stdout + run.stderr
    assert not list(tmp_path.rglob("_lrm_native*.so"))


def test_native_build_records_the_cpu_extensions_it_may_use(tmp_path):
    if not _build.isa_flags():
        pytest.skip("this CPU's extensions cannot be read")
    lib = tmp_path / "lib.so"
    _build.write_isa_record(lib)
    assert _build.isa_record(lib).read_text().split() == _build.isa_flags()
    assert _build.missing_isa(lib) == []
    _build.isa_record(lib).write_text("avx2 avx512_madeup\n")
    assert _build.missing_isa(lib) == ["avx512_madeup"]


def test_a_library_built_for_another_cpu_is_rebuilt_for_this_one(tmp_path, monkeypatch):
    """The installed library's record names an extension this CPU lacks: it is not loaded; the kernels are built
    for this CPU into the cache instead, and when that cannot be done the error says why."""
    if not _build.isa_flags():
        pytest.skip("this CPU's extensions cannot be read")
    installed = tmp_path / "pkg" / "_lrm_native.so"
    installed.parent.mkdir()
    shutil.copy(kernels.native_library_path(), installed)
    _build.isa_record(installed).write_text(" ".join(_build.isa_flags() + ["avx512_madeup"]) + "\n")
    monkeypatch.delenv("LRM_RT_NATIVE_LIB", raising=False)
    monkeypatch.setattr(kernels, "_built_library", lambda: installed)
    monkeypatch.setenv("LRM_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(BackendError, match="built for a CPU with avx512_madeup, which this one lacks, and "
                                           "rebuilding them here failed.*exit status 1"):
        kernels.native_library_path()
    _build.isa_record(installed).write_text(" ".join(_build.isa_flags()) + "\n")
    assert kernels.native_library_path() == installed  # same CPU: the installed build is used as it is


def test_cache_names_differ_between_cpus(monkeypatch):
    src = kernels.cuda_source_dir()
    monkeypatch.delenv("LRM_RT_PORTABLE", raising=False)
    here = kernels._sources_digest(src)
    monkeypatch.setattr(kernels, "isa_flags", lambda: ["sse2"])
    assert kernels._sources_digest(src) != here
    monkeypatch.setenv("LRM_RT_PORTABLE", "1")  # a portable build is the same on every CPU
    portable = kernels._sources_digest(src)
    monkeypatch.setattr(kernels, "isa_flags", lambda: ["avx2"])
    assert kernels._sources_digest(src) == portable


def test_cpu_extensions_are_read_for_the_process_architecture():
    """x86 keeps its ISA flags only (a VM lists fewer machine flags); ARM takes every Features entry; an arm64
    process under qemu-user sees the x86 host's cpuinfo, which says nothing about it: no record, no false rebuild."""
    x86 = "processor\t: 0\nflags\t\t: fpu vme avx2 avx512f hypervisor constant_tsc fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve i8mm\n"
    assert _build.isa_flags(x86, "x86_64") == ["avx2", "avx512f", "fma"]
    assert _build.isa_flags(arm, "aarch64") == ["asimd", "fp", "i8mm", "sve"]
    assert _build.isa_flags(x86, "aarch64") == [] and _build.isa_flags(arm, "x86_64") == []
    assert _build.isa_flags(x86, "riscv64") == []


def test_info_copes_with_a_library_without_the_lanes_entry(monkeypatch, capsys):
    """LRM_RT_NATIVE_LIB may name a library built before lrm_field_simd_lanes existed: info says 'unknown'."""
    from lrm_rt.cli import main

    monkeypatch.setattr(kernels, "native", lambda: object())
    assert kernels.simd_lanes() is None
    assert main(["info"]) == 0
    assert "native yes (unknown float lanes)" in capsys.readouterr().out
