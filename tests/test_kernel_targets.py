"""The CPU kernels' narrower SIMD paths against the PyTorch references.

The library is built with -march=native, so the rest of the tests only run the widest vector path this
machine has (16 lanes on AVX-512). triplane_field.cu also has an 8-lane path (AVX/AVX2 CPUs) and a 4-lane
one (SSE, and NEON on ARM such as Jetson). Each is built here for a narrower x86 target and the kernel tests
run against it in a subprocess (LRM_RT_NATIVE_LIB)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lrm_rt import kernels
from lrm_rt._build import native_compile_command
from lrm_rt.field import torch_ref
from lrm_rt.field.native import CoarseToFine, field_flags, pack_decoder
from lrm_rt.field.spec import OPENLRM_FIELD, TRIPOSR_FIELD, TriplaneField

TESTS = Path(__file__).resolve().parent
# Every test that runs a native kernel: field queries and grids, rendering, marching cubes, image ops, texels.
KERNEL_TESTS = ["test_native_field.py", "test_render_kernels.py", "test_marching_cubes.py",
                "test_preprocess.py::test_native_box_reduce_equals_the_reference",
                "test_preprocess.py::test_native_masks_equal_torch_max_pool",
                "test_preprocess.py::test_native_colour_distance_equals_the_reference",
                "test_preprocess.py::test_native_background_removal_equals_the_reference",
                "test_texture.py::test_native_rasteriser_equals_the_numpy_reference"]


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(tmp_path: Path, march: str) -> Path:
    # skipped only when the compiler does not know the target; an error in the sources fails the test
    probe = subprocess.run([os.environ.get("CXX", "g++"), f"-march={march}", "-x", "c++", "-c", "-o", os.devnull, "-"],
                           input="int f() { return 0; }\n", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the compiler does not build for -march={march}: {probe.stderr.strip()[:200]}")
    out = tmp_path / f"lrm_native-{march}.so"
    cmd = native_compile_command(kernels.cuda_source_dir(), out, arch=[f"-march={march}"])
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.mark.parametrize("march, lanes, needs", [("x86-64", 4, "sse2"), ("x86-64-v3", 8, "avx2")])
def test_kernels_built_for_a_narrower_target_match_the_references(tmp_path, march, lanes, needs):
    if needs not in _cpu_flags():
        pytest.skip(f"this CPU cannot run {march} code (no {needs})")
    lib = _build(tmp_path, march)
    env = {**os.environ, "LRM_RT_NATIVE_LIB": str(lib)}
    probe = subprocess.run([sys.executable, "-c", "from lrm_rt import kernels; print(kernels.simd_lanes())"],
                           env=env, capture_output=True, text=True, check=True)
    assert int(probe.stdout) == lanes
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow",
                          *[str(TESTS / t) for t in KERNEL_TESTS]],
                         env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_native_lib_override_names_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LRM_RT_NATIVE_LIB", str(tmp_path / "nothing.so"))
    with pytest.raises(kernels.BackendError, match="LRM_RT_NATIVE_LIB"):
        kernels.native_library_path()


# ------------------------------------------------------------------ aarch64 (Jetson) under an emulator

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
REPLAY = TESTS / "cpp" / "kernel_replay.cpp"


def _write_arrays(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        for name, a in arrays.items():
            data = np.ascontiguousarray(a).tobytes()
            f.write(struct.pack("<I", len(name)) + name.encode() + struct.pack("<Q", len(data)) + data)


def _read_arrays(path: Path, dtypes: dict) -> dict:
    out, buf, pos = {}, Path(path).read_bytes(), 0
    while pos < len(buf):
        (n,) = struct.unpack_from("<I", buf, pos)
        name = buf[pos + 4:pos + 4 + n].decode()
        (size,) = struct.unpack_from("<Q", buf, pos + 4 + n)
        start = pos + 12 + n
        out[name] = np.frombuffer(buf[start:start + size], dtype=dtypes.get(name, np.float32))
        pos = start + size
    return out


def _build_replay(cxx: str, arch: list, out: Path) -> None:
    src = kernels.cuda_source_dir()
    cmd = [cxx, "-x", "c++", "-std=c++17", "-O3", "-fopenmp", "-fno-math-errno", *arch, "-I", str(src),
           *sorted(str(p) for p in src.glob("*.cu")), str(REPLAY), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _field_inputs(field) -> tuple:
    params, dims = pack_decoder(field)
    spec = field.spec
    arrays = {"planes": field.planes.numpy(), "params": params.numpy(), "dims": dims.numpy()}
    C, H, W = field.planes.shape[1:]
    return arrays, [C, H, W, field_flags(spec), spec.radius, spec.density_bias]


def _calls() -> list:
    """(op, inputs) of every replayed call: a TripoSR-like and an OpenLRM-like field with surfaces."""
    from test_native_field import surface_field

    # Small enough for the emulator (about 5,000 points a second with these decoders).
    tri = surface_field(seed=3, res=32, channels=16, n_hidden=4)
    olrm = surface_field(seed=4, spec=OPENLRM_FIELD, level=5.0, res=32, channels=16, n_hidden=4)
    g = np.random.default_rng(0)
    calls = []
    for field, level in ((tri, 25.0), (olrm, 5.0)):
        arrays, s = _field_inputs(field)
        pts = g.uniform(-1.1, 1.1, (3001, 3)).astype(np.float32)  # not a multiple of the tile; some outside
        calls.append(("query", {**arrays, "points": pts, "s": np.array(s + [1], np.float64)}))
        calls.append(("query", {**arrays, "points": pts, "s": np.array(s + [0], np.float64)}))  # density only
        axis = torch_ref.grid_axis(33, field.spec).numpy()
        calls.append(("grid", {**arrays, "axis": axis, "s": np.array(s + [level, 0, 0, 0, 0, 0, 0], np.float64)}))
        c2f = CoarseToFine(coarse_stride=4)
        calls.append(("grid", {**arrays, "axis": axis, "s": np.array(
            s + [level, c2f.stride_for(33), c2f.margin_rel, c2f.margin_abs, c2f.space(field.spec), 0, c2f.dilation],
            np.float64)}))
    n = 200
    o = np.tile(np.array([[0.0, -2.0, 0.2]], np.float32), (n, 1))
    d = np.stack([g.uniform(-0.4, 0.4, n), np.ones(n), g.uniform(-0.4, 0.4, n)], 1).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    arrays, s = _field_inputs(tri)
    calls.append(("triposr", {**arrays, "rays_o": o * 0.87, "rays_d": d, "s": np.array(s + [64], np.float64)}))
    arrays, s = _field_inputs(olrm)
    u = np.sort(g.uniform(0, 1, 24)).astype(np.float32)
    for white in (0, 1):
        calls.append(("openlrm", {**arrays, "rays_o": o, "rays_d": d, "u_fine": u, "s": np.array(
            s + [24, 24, -float(np.finfo(np.float32).max) / 8, white, 0.5], np.float64)}))
    x = np.linspace(-1, 1, 40, dtype=np.float32)
    sphere = np.sqrt(x[:, None, None] ** 2 + (0.8 * x[None, :, None]) ** 2 + x[None, None, :] ** 2)
    calls.append(("mc", {"grid": sphere, "s": np.array([40, 40, 40, 0.7], np.float64)}))
    h, w = 61, 77
    rgba = g.integers(0, 256, (h, w, 4), dtype=np.uint8)
    mask = (g.uniform(size=(h, w)) < 0.3).astype(np.uint8)
    calls.append(("image", {"rgba": rgba, "mask": mask, "s": np.array([h, w, 4, 2, 250.0, 251.0, 249.0])}))
    from lrm_rt.texture import EDGE_MARGIN, _raster_setup

    uv = g.uniform(0.05, 0.95, (60, 2))
    faces = np.stack([g.permutation(60)[:3] for _ in range(40)])  # overlapping faces: the closest one wins
    lo, hi, coef = _raster_setup(uv, faces, 64)
    calls.append(("uv", {"coef": coef, "lo": lo, "hi": hi, "s": np.array([64, EDGE_MARGIN], np.float64)}))
    return calls


OUT_DTYPES = {"status": np.int32, "simd_lanes": np.int32, "n_evaluated": np.int64, "faces": np.int64,
              "reduced": np.uint8, "filled": np.uint8, "dilated": np.uint8, "eroded": np.uint8, "best": np.uint64,
              "face": np.int32}


def test_aarch64_build_matches_this_machines_build(tmp_path):
    """The kernels cross-compiled for a Jetson Orin CPU (Cortex-A78AE, NEON: the 4-lane path) and run under qemu
    give what the same calls give on this machine (whose build the other tests check against torch)."""
    if shutil.which(CROSS_CXX) is None or shutil.which(QEMU) is None:
        pytest.skip(f"needs {CROSS_CXX} and {QEMU} (Debian: g++-aarch64-linux-gnu qemu-user)")
    host, arm = tmp_path / "replay-host", tmp_path / "replay-aarch64"
    _build_replay("g++", ["-march=native"], host)
    _build_replay(CROSS_CXX, ["-mcpu=cortex-a78ae"], arm)
    sysroot = Path("/usr/aarch64-linux-gnu")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for i, (op, arrays) in enumerate(_calls()):
        src = tmp_path / f"call{i}.bin"
        _write_arrays(src, arrays)
        results = []
        for cmd in ([str(host)], [QEMU, "-L", str(sysroot), str(arm)]):
            dst = tmp_path / f"call{i}-{len(results)}.out"
            subprocess.run([*cmd, op, str(src), str(dst)], check=True, env=env, timeout=600)
            results.append(_read_arrays(dst, OUT_DTYPES))
        ref, got = results
        assert ref["status"][0] == 0 and got["status"][0] == 0, (op, i)
        assert got["simd_lanes"][0] == 4
        assert sorted(ref) == sorted(got)
        for name in ref:
            if name in ("simd_lanes", "status"):
                continue
            a, b = ref[name], got[name]
            assert a.size and a.shape == b.shape, (op, i, name)
            if a.dtype == np.float32:  # contraction into fused multiply-adds differs between the compilers
                np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5, err_msg=f"{op} call {i}: {name}")
            elif name == "n_evaluated":  # the refined region depends on values within rounding of the margins
                assert abs(int(b[0]) - int(a[0])) <= 0.01 * a[0], (op, i)
            else:
                np.testing.assert_array_equal(b, a, err_msg=f"{op} call {i}: {name}")
        if op == "query" and arrays["s"][6]:  # the harness itself: this machine's answers are the reference's
            tri = arrays["s"][3] == field_flags(TRIPOSR_FIELD)
            spec = TRIPOSR_FIELD if tri else OPENLRM_FIELD
            field = _field_from_inputs(arrays, spec)
            density, rgb = torch_ref.query(field, torch.from_numpy(arrays["points"]))
            np.testing.assert_allclose(ref["density"], density.numpy().ravel(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(ref["rgb"].reshape(-1, 3), rgb.numpy(), rtol=1e-4, atol=1e-4)
        if op == "mc":
            assert len(ref["faces"]) > 1000
        if op == "uv":
            assert (ref["face"] >= 0).sum() > 500


def _field_from_inputs(arrays: dict, spec) -> TriplaneField:
    dims, params = arrays["dims"].tolist(), torch.from_numpy(arrays["params"].copy())
    ws, bs, pos = [], [], 0
    for i, o in zip(dims[:-1], dims[1:]):
        ws.append(params[pos:pos + i * o].reshape(o, i))
        bs.append(params[pos + i * o:pos + i * o + o])
        pos += i * o + o
    return TriplaneField(torch.from_numpy(arrays["planes"].copy()), ws, bs, spec)
