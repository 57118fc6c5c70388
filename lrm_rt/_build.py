"""The compiler command for the CPU build of cuda/*.cu, and the instruction-set extensions a -march=native build
may use (stdlib only: setup.py loads this file directly)."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# /proc/cpuinfo flags of x86 instruction-set extensions a compiler may emit code for (the other flags describe
# the machine: a VM of the same CPU lists fewer of them). On ARM every "Features" entry is an ISA feature.
_X86_ISA = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|abm|movbe|popcnt|amx|gfni|vaes|vpclmulqdq|sha_ni|adx|aes|"
                      r"pclmulqdq|lzcnt)")


def isa_flags(cpuinfo: "str | None" = None, machine: "str | None" = None) -> list:
    """This CPU's instruction-set extensions (sorted), or [] where /proc/cpuinfo cannot tell. Read for this
    process's architecture: under qemu-user (an arm64 image built on an x86 host) /proc/cpuinfo is the host's.
    ``cpuinfo`` / ``machine`` replace the file and platform.machine() (tests)."""
    machine = (machine or platform.machine()).lower()
    key_wanted = "flags" if machine in ("x86_64", "amd64", "i386", "i686") else \
        "Features" if machine in ("aarch64", "arm64") or machine.startswith("arm") else None
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text() if key_wanted else ""
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == key_wanted:
            return sorted({f for f in value.split() if key_wanted == "Features" or _X86_ISA.match(f)})
    return []


def is_portable() -> bool:
    return bool(os.environ.get("LRM_RT_PORTABLE"))


def native_compile_command(src_dir: Path, out: Path, arch: "list | None" = None) -> list:
    cxx = os.environ.get("CXX", "g++")
    # -march=native by default: the library is built on the machine that runs it (pip install or the
    # just-in-time build), as ggml does; LRM_RT_PORTABLE=1 builds for the generic target instead.
    # `arch` replaces both (the tests build the narrower SIMD paths this way).
    if arch is None:
        arch = [] if is_portable() else ["-march=native"]
    sources = sorted(str(p) for p in Path(src_dir).glob("*.cu"))
    return [cxx, "-x", "c++", "-std=c++17", "-O3", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
            *arch, "-I", str(src_dir), *sources, "-o", str(out)]


def isa_record(lib: Path) -> Path:
    """The file beside a -march=native library listing the extensions of the CPU it was built on."""
    return Path(str(lib) + ".isa")


def write_isa_record(lib: Path) -> None:
    """Record what a -march=native build may use (nothing for a portable build, which runs anywhere)."""
    rec = isa_record(lib)
    if is_portable():
        rec.unlink(missing_ok=True)
    else:
        rec.write_text(" ".join(isa_flags()) + "\n")


def missing_isa(lib: Path) -> list:
    """Extensions the library's build CPU had and this one lacks (a wheel or cache copied between machines:
    loading it would end in SIGILL, which no Python code can catch). [] when there is no record or this CPU's
    extensions cannot be read."""
    try:
        built = set(isa_record(lib).read_text().split())
    except OSError:
        return []
    here = isa_flags()
    return sorted(built - set(here)) if here else []
