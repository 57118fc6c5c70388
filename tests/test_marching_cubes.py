"""Marching cubes (cuda/marching_cubes.cu through lrm_rt.mc) against PyMCubes and the fixtures.

Expectations and why:
* Face and vertex counts equal PyMCubes exactly: both emit one vertex per crossed grid edge, and our
  generated table resolves ambiguous faces the way PyMCubes' table does (same triangles per case;
  checked case by case below), only quads / polygons may be split along other diagonals.
* Vertices equal as sets up to float32 rounding (we output float32, PyMCubes float64): compared in
  coordinates normalised by (R - 1), where the tolerance 1e-6 is ~8 float32 ulps at R = 64.
* Surface area: the different diagonal splits change it by O(h^2 curvature); rel 1e-4 holds on
  smooth fields at these resolutions.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrm_rt.errors import ConfigError, FieldError
from lrm_rt.mc import _marching_cubes_passes_numpy, canonical_mesh, marching_cubes
from lrm_rt.meshcompare import (bbox, boundary_edge_count, chamfer, compare_meshes, edge_topology,
                                euler_characteristic, signed_volume, surface_area)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- fields


def _coords(shape):
    axes = [np.linspace(0.0, 1.0, s) for s in shape]
    return np.meshgrid(*axes, indexing="ij")


def sphere(shape, center=(0.47, 0.51, 0.53), radius=0.33):
    x, y, z = _coords(shape)
    d = np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2)
    return (radius - d).astype(np.float32)


def torus(shape, center=(0.5, 0.49, 0.52), major=0.27, minor=0.11):
    x, y, z = _coords(shape)
    x, y, z = x - center[0], y - center[1], z - center[2]
    # tilted about the x axis so that no symmetry lines up with the grid
    c, s = np.cos(0.4), np.sin(0.4)
    y, z = c * y - s * z, s * y + c * z
    q = np.sqrt(x**2 + y**2) - major
    return (minor - np.sqrt(q**2 + z**2)).astype(np.float32)


def noise(shape, seed=0, modes=12, freq=5.0):
    """Smooth random field: a sum of random plane waves (many ambiguous faces)."""
    rng = np.random.default_rng(seed)
    x, y, z = _coords(shape)
    f = np.zeros(shape)
    for _ in range(modes):
        k = rng.normal(size=3) * freq
        f += np.cos(2 * np.pi * (k[0] * x + k[1] * y + k[2] * z) + rng.uniform(0, 2 * np.pi))
    return (f / np.sqrt(modes)).astype(np.float32)


def noise_in_ball(shape, seed=0):
    """Noise clipped to a ball inside the grid: closed surfaces with many ambiguous faces."""
    return np.minimum(noise(shape, seed) + 0.4, 3.0 * sphere(shape, radius=0.4)).astype(np.float32)


def border_sphere(shape):
    """A ball centred near a grid corner: the surface is cut open by the grid border."""
    return sphere(shape, center=(0.1, 0.95, 0.2), radius=0.6)


FIELDS = {"sphere": sphere, "torus": torus, "noise": noise, "noise_in_ball": noise_in_ball,
          "border": border_sphere}
SHAPES = [(9, 9, 9), (32, 32, 32), (24, 31, 40), (64, 64, 64)]


def ambiguous_faces(grid, level=0.0):
    """Number of cell faces whose inside corners sit on one diagonal only."""
    ins = grid > level
    total = 0
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        def corner(da, db):
            sl = [slice(None)] * 3
            sl[a] = slice(da, grid.shape[a] - 1 + da)
            sl[b] = slice(db, grid.shape[b] - 1 + db)
            return ins[tuple(sl)]
        c00, c10, c01, c11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
        total += int(((c00 == c11) & (c10 == c01) & (c00 != c10)).sum())
    return total


def _norm(v, shape):
    return np.asarray(v, np.float64) / (np.asarray(shape, np.float64) - 1.0)


# --------------------------------------------------------------------------------------- vs PyMCubes


def _area_rtol(name, shape):
    """Surface-area agreement with PyMCubes. The polygons are identical, only their diagonal splits
    differ, which changes the area by O(h^2 * curvature): < 1e-4 on smooth fields once features span
    several cells (measured <= 6.3e-5 at >= 24^3). The noise fields have features ~4 cells wide and
    the 9^3 grids ~2 cells per feature, where the splits matter at the 0.1-1 % level (measured up to
    7.8e-3; ours is the smaller area: minimum-diagonal splits)."""
    smooth = name in ("sphere", "torus", "border")
    return 1e-4 if smooth and min(shape) >= 24 else 1e-2


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(FIELDS))
def test_matches_pymcubes(name, shape):
    g = FIELDS[name](shape)
    v, f = marching_cubes(g, 0.0, backend="native")
    pv, pf = marching_cubes(g, 0.0, backend="pymcubes")
    assert v.dtype == np.float32 and f.dtype == np.int64
    assert len(f) > 0
    assert len(f) == len(pf)
    assert len(v) == len(pv)
    ch = chamfer(_norm(v, shape), _norm(pv, shape))
    assert ch.max <= 1e-6, ch
    cv, cpv = canonical_mesh(v, f)[0], canonical_mesh(pv, pf)[0]
    np.testing.assert_allclose(_norm(cv, shape), _norm(cpv, shape), rtol=0, atol=1e-6)
    for ours, ref in zip(bbox(v), bbox(pv)):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    area, parea = surface_area(v, f), surface_area(pv, pf)
    assert abs(area - parea) <= _area_rtol(name, shape) * parea, (area, parea)
    # Orientation: consistent on every component, and the same sign of the volume as PyMCubes (about
    # the common vertex centroid; open surfaces like "noise" and "border" have no intrinsic sign).
    assert edge_topology(f).inconsistent_edges == 0
    assert np.sign(signed_volume(v, f)) == np.sign(signed_volume(pv, pf)) != 0
    if name in ("sphere", "torus", "noise_in_ball"):
        assert signed_volume(v, f) > 0
    # no unreferenced vertices: every crossed edge is used by a triangle
    assert len(np.unique(f)) == len(v)
    assert f.min() >= 0 and f.max() < len(v)


def test_every_case_matches_pymcubes_per_cell():
    """All 256 corner sign patterns on one cell with generic values: same triangle count, same
    vertices, and the same vector area (sum of n*A, which depends only on the patch's boundary
    loops and winding, not on how the polygons are split)."""
    rng = np.random.default_rng(7)
    for case in range(256):
        mags = rng.uniform(0.2, 1.0, size=8)
        g = np.zeros((2, 2, 2), np.float32)
        for c in range(8):
            g[c & 1, (c >> 1) & 1, (c >> 2) & 1] = mags[c] if (case >> c) & 1 else -mags[c]
        v, f = marching_cubes(g, 0.0, backend="native")
        pv, pf = marching_cubes(g, 0.0, backend="pymcubes")
        assert len(f) == len(pf), case
        np.testing.assert_allclose(canonical_mesh(v, f)[0], canonical_mesh(pv, pf)[0], atol=1e-6)
        if len(f):
            def vector_area(vv, ff):
                vv = vv.astype(np.float64)
                a, b, c = vv[ff[:, 0]], vv[ff[:, 1]], vv[ff[:, 2]]
                return 0.5 * np.cross(b - a, c - a).sum(axis=0)
            np.testing.assert_allclose(vector_area(v, f), vector_area(pv, pf), atol=1e-5, err_msg=str(case))


def test_fields_exercise_ambiguous_faces():
    # Otherwise the watertightness tests below would not test the ambiguity resolution.
    assert ambiguous_faces(noise_in_ball((64, 64, 64))) > 20
    assert ambiguous_faces(noise((32, 32, 32))) > 5


# --------------------------------------------------------------------------------------- topology


@pytest.mark.parametrize("shape", [(24, 31, 40), (64, 64, 64), (96, 96, 96)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,euler", [("sphere", 2), ("torus", 0), ("noise_in_ball", None)])
def test_closed_surfaces_are_watertight(name, euler, shape):
    g = FIELDS[name](shape)
    v, f = marching_cubes(g, 0.0, backend="native")
    topo = edge_topology(f)
    assert topo.boundary_edges == 0 and boundary_edge_count(f) == 0
    assert topo.nonmanifold_edges == 0, topo
    assert topo.inconsistent_edges == 0, topo
    assert topo.watertight
    assert topo.degenerate_faces == 0
    if euler is not None:
        assert euler_characteristic(v, f) == euler
    assert signed_volume(v, f) > 0


def test_open_surface_has_boundary():
    g = border_sphere((32, 32, 32))
    _, f = marching_cubes(g, 0.0, backend="native")
    topo = edge_topology(f)
    assert topo.boundary_edges > 0 and topo.nonmanifold_edges == 0 and topo.inconsistent_edges == 0


def test_orientation_follows_inside_above_level():
    g = sphere((32, 32, 32))
    v, f = marching_cubes(g, 0.0, backend="native")
    nv, nf = marching_cubes(-g, 0.0, backend="native")  # inside and outside swapped
    assert signed_volume(v, f) > 0
    # the flipped field gives the same vertices with every triangle reversed
    assert len(nf) == len(f)
    assert signed_volume(nv, nf) < 0


# --------------------------------------------------------------------------------------- determinism


def _omp_set_threads(n: int) -> None:
    from lrm_rt.kernels import native

    fn = native().omp_set_num_threads  # libgomp, resolved through our library's dependencies
    fn.argtypes = [ctypes.c_int]
    fn(n)


def test_deterministic_across_thread_counts():
    from lrm_rt.kernels import native

    get = native().omp_get_max_threads
    get.restype = ctypes.c_int
    before = get()
    g = noise((80, 72, 64), seed=3)
    try:
        _omp_set_threads(1)
        v1, f1 = marching_cubes(g, 0.1, backend="native")
        _omp_set_threads(2)
        v2, f2 = marching_cubes(g, 0.1, backend="native")
    finally:
        _omp_set_threads(before)
    assert len(f1) > 1000
    assert v1.tobytes() == v2.tobytes()
    assert f1.tobytes() == f2.tobytes()
    # the numpy-scanned sequence of passes (what the CUDA backend does with CuPy) is bit-identical too
    v3, f3 = _marching_cubes_passes_numpy(g, 0.1)
    assert v3.tobytes() == v1.tobytes() and f3.tobytes() == f1.tobytes()


def test_gpu_granularity_classify_gives_identical_meshes(tmp_path):
    """The GPU classifies one point per thread, the CPU build whole rows: compile the GPU variant as
    C++ (-DLRM_MC_POINTWISE=1) and check both give bit-identical meshes (incl. odd sizes, NaN)."""
    import os

    from lrm_rt._build import native_compile_command

    src = REPO / "cuda"
    out = tmp_path / "mc_pointwise.so"
    cmd = native_compile_command(src, out)
    cmd = [c for c in cmd if not (c.endswith(".cu") and Path(c).name != "marching_cubes.cu")]
    cmd.insert(1, "-DLRM_MC_POINTWISE=1")
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    lib = ctypes.CDLL(str(out))
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.lrm_mc_plan_dense.argtypes = [vp, i64, i64, i64, ctypes.c_float, ctypes.POINTER(vp),
                                      ctypes.POINTER(i64), ctypes.POINTER(i64)]
    lib.lrm_mc_plan_emit.argtypes = [vp, vp, vp]
    lib.lrm_mc_plan_free.argtypes = [vp]

    def run(g, level):
        plan, nv, nf = vp(), i64(), i64()
        st = lib.lrm_mc_plan_dense(g.ctypes.data, *g.shape, level, ctypes.byref(plan), ctypes.byref(nv),
                                   ctypes.byref(nf))
        if st != 0:
            return st
        v = np.empty((nv.value, 3), np.float32)
        f = np.empty((nf.value, 3), np.int64)
        lib.lrm_mc_plan_emit(plan, v.ctypes.data, f.ctypes.data)
        lib.lrm_mc_plan_free(plan)
        return v, f

    for g, level in [(noise((20, 21, 300), seed=4), 0.0), (noise_in_ball((40, 41, 257)), 0.0),
                     (border_sphere((33, 34, 35)), 0.0), (noise((2, 3, 2), seed=1), 0.0)]:
        g = np.ascontiguousarray(g)
        v, f = marching_cubes(g, level, backend="native")
        pv, pf = run(g, level)
        assert pv.tobytes() == v.tobytes() and pf.tobytes() == f.tobytes()
    g = sphere((16, 16, 16))
    g[15, 15, 15] = np.nan  # a corner point: no cell of its own
    assert run(g, 0.0) == -2
    with pytest.raises(FieldError):
        marching_cubes(g, 0.0, backend="native")


def test_output_order_is_edge_then_cell_order():
    g = noise((20, 21, 22), seed=5)
    v, f = marching_cubes(g, 0.0, backend="native")
    # vertex order = grid edge order (3 * flat point index + axis): the point part is non-decreasing
    base = np.floor(v).astype(np.int64)
    axis = np.argmax(v - base, axis=1)
    # a crossing at t == 0 lands on the lower point itself; the test field has none
    assert np.all(v - base >= 0)
    flat = (base[:, 0] * 21 + base[:, 1]) * 22 + base[:, 2]
    edge_id = 3 * flat + axis
    assert np.all(np.diff(edge_id) > 0)


# --------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", ["native", "pymcubes"])
def test_empty_and_full_grids(backend):
    for g in (np.zeros((8, 8, 8), np.float32), np.ones((8, 8, 8), np.float32)):
        v, f = marching_cubes(g, 0.5, backend=backend)
        assert v.shape == (0, 3) and f.shape == (0, 3)
        assert v.dtype == np.float32
    # a side < 2 has no cells
    v, f = marching_cubes(np.random.default_rng(0).normal(size=(1, 6, 6)).astype(np.float32), 0.0, backend=backend)
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_single_cell_and_inputs():
    import torch

    g = np.full((2, 2, 2), -1.0, np.float32)
    g[1, 1, 1] = 1.0
    v, f = marching_cubes(g, 0.0)  # auto -> native
    np.testing.assert_allclose(canonical_mesh(v, f)[0], [[0.5, 1, 1], [1, 0.5, 1], [1, 1, 0.5]])
    assert f.shape == (1, 3)
    # torch (any float dtype) and a non-contiguous view give the same result
    g2 = noise((16, 17, 18), seed=2)
    ref = marching_cubes(g2, 0.0, backend="native")
    for x in (torch.from_numpy(g2.astype(np.float64)), np.asfortranarray(g2)):
        out = marching_cubes(x, 0.0)
        assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1])
    _, f32 = marching_cubes(g2, 0.0, index_dtype=np.int32)
    assert f32.dtype == np.int32 and np.array_equal(f32, ref[1])


@pytest.mark.parametrize("backend", ["native", "pymcubes", "passes"])
def test_nan_raises_field_error(backend):
    g = sphere((16, 16, 16))
    g[3, 4, 5] = np.nan
    with pytest.raises(FieldError, match="NaN"):
        if backend == "passes":
            _marching_cubes_passes_numpy(g, 0.0)
        else:
            marching_cubes(g, 0.0, backend=backend)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        marching_cubes(np.zeros((4, 4), np.float32), 0.0)
    with pytest.raises(ConfigError):
        marching_cubes(np.zeros((4, 4, 4), np.float32), float("nan"))
    with pytest.raises(ConfigError):
        marching_cubes(np.zeros((4, 4, 4), np.float32), 0.0, backend="skimage")


def test_infinite_values_are_meshed():
    g = sphere((16, 16, 16))
    g[g > 0.2] = np.inf
    g[g < -0.3] = -np.inf
    v, f = marching_cubes(g, 0.0, backend="native")
    assert len(f) > 0 and np.isfinite(v).all()
    assert edge_topology(f).watertight


def test_crossing_between_huge_values_of_opposite_sign():
    """b - a overflows to inf for finite corners near +-3.4e38: the crossing must still sit where the
    interpolation puts it (midway for -3e38 / +3e38 at level 0), not at the first corner."""
    big = np.float32(3e38)
    g = np.full((2, 2, 3), -big, np.float32)
    g[:, :, 2] = big
    g[:, :, 0] = -big  # cells along axis 2: (-big, -big, +big), crossing at 1.5
    v, f = marching_cubes(g, 0.0, backend="native")
    assert len(f) > 0 and np.isfinite(v).all()
    np.testing.assert_allclose(v[:, 2], 1.5, atol=1e-6)
    g[:, :, 2] = big / 3  # (-3e38, 1e38): crossing 3/4 of the way
    v, _ = marching_cubes(g, 0.0, backend="native")
    np.testing.assert_allclose(v[:, 2], 1.75, atol=1e-6)


# --------------------------------------------------------------------------------------- fixtures


def _fixture_case(io, level, radius):
    grid = io["density_grid"].numpy()
    R = grid.shape[0]
    v, f = marching_cubes(grid, level, backend="native")
    world = (v.astype(np.float64) / (R - 1) * (2 * radius) - radius)
    return grid, v, f, world


def test_triposr_fixture_mesh(triposr_io):
    grid, v, f, world = _fixture_case(triposr_io, 25.0, 0.87)
    ref_v = triposr_io["mc_vertices"].numpy()
    ref_f = triposr_io["mc_faces"].numpy()
    assert len(f) == len(ref_f) == 17074
    assert len(v) == 8892  # PyMCubes' welded count (README §3; torchmcubes + trimesh leave 9018)
    assert chamfer(world, ref_v).max <= 1e-5
    bmin, bmax = bbox(world)
    np.testing.assert_allclose(bmin, ref_v.min(axis=0), atol=1e-5)
    np.testing.assert_allclose(bmax, ref_v.max(axis=0), atol=1e-5)
    # the reference mesh (torchmcubes, other splits) has the same area up to the split differences
    assert abs(surface_area(world, f) - surface_area(ref_v, ref_f)) <= 1e-2 * surface_area(ref_v, ref_f)
    assert edge_topology(f).inconsistent_edges == 0
    # an open surface (it touches the grid border): orientation = the reference's
    assert np.sign(signed_volume(world, f)) == np.sign(signed_volume(ref_v, ref_f)) != 0
    pv, pf = marching_cubes(grid, 25.0, backend="pymcubes")
    assert len(pf) == len(f) and len(pv) == len(v)


def test_openlrm_fixture_mesh(openlrm_io):
    grid, v, f, world = _fixture_case(openlrm_io, 3.0, 1.0)
    ref_v = openlrm_io["mc_vertices"].numpy()
    ref_f = openlrm_io["mc_faces"].numpy()
    assert len(f) == len(ref_f) == 21701
    assert len(v) == len(ref_v) == 12461
    assert chamfer(world, ref_v).max <= 1e-5
    report = compare_meshes(world, f, ref_v, ref_f)
    assert report["bbox_max_abs_diff"] <= 1e-5
    assert report["area_rel_diff"] <= 1e-2  # a noisy 32^3 field: diagonal splits differ (see _area_rtol)
    assert edge_topology(f).inconsistent_edges == 0
    assert np.sign(signed_volume(world, f)) == np.sign(signed_volume(ref_v, ref_f)) != 0
    # The fixture is PyMCubes' output in canonical order: our canonical_mesh reproduces it exactly.
    pv, pf = marching_cubes(grid, 3.0, backend="pymcubes")
    import mcubes

    pv64, pf64 = mcubes.marching_cubes(grid, 3.0)
    cv, cf = canonical_mesh(pv64 / (grid.shape[0] - 1) * 2 - 1, pf64)
    np.testing.assert_allclose(cv, ref_v, rtol=0, atol=1e-6)
    assert np.array_equal(cf.astype(np.int64), ref_f)
    # canonical_mesh keeps each face's winding (a rotation, never a swap)
    cw, cwf = canonical_mesh(world, f)
    assert np.isclose(signed_volume(cw, cwf), signed_volume(world, f))
    assert np.all(cwf[:, 0] < cwf[:, 1]) and np.all(cwf[:, 0] < cwf[:, 2])


@pytest.mark.parametrize("which", ["triposr", "openlrm"])
def test_canonical_mesh_reproduces_fixture_order(which, triposr_io, openlrm_io):
    io = triposr_io if which == "triposr" else openlrm_io
    ref_v, ref_f = io["mc_vertices"].numpy(), io["mc_faces"].numpy()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(ref_v))  # shuffle vertices, faces and each face's rotation
    inv = np.argsort(perm)
    f = inv[ref_f][rng.permutation(len(ref_f))]
    f = np.take_along_axis(f, (rng.integers(0, 3, len(f))[:, None] + np.arange(3)) % 3, axis=1)
    cv, cf = canonical_mesh(ref_v[perm], f)
    assert np.array_equal(cv, ref_v) and np.array_equal(cf, ref_f)


def test_canonical_mesh_properties():
    v = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]], np.float32)
    f = np.array([[0, 1, 3], [2, 3, 1], [3, 0, 2]], np.int64)
    cv, cf = canonical_mesh(v, f)
    np.testing.assert_array_equal(cv, [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # old->new: 0->3, 1->1, 2->0, 3->2; faces (3,1,2) -> (1,2,3); (0,2,1) stays; (2,3,0) -> (0,2,3)
    np.testing.assert_array_equal(cf, [[0, 2, 1], [0, 2, 3], [1, 2, 3]])


# --------------------------------------------------------------------------------------- table


def test_generated_table_is_up_to_date():
    r = subprocess.run([sys.executable, str(REPO / "cuda" / "gen_mc_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------- cuda


def test_cuda_orchestration_with_numpy_standin(monkeypatch):
    """Run the CUDA backend's pass sequence (_cuda_passes) with numpy standing in for CuPy and the
    CPU kernels standing in for the RawModule: catches argument-order / scan mistakes without a GPU."""
    from types import SimpleNamespace

    from lrm_rt import mc

    lib = mc._native_lib()

    class Kernel:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, grid, block, args):
            assert len(grid) == 1 and len(block) == 1
            self.fn(*[a.ctypes.data if isinstance(a, np.ndarray) else a.item() for a in args])

    class Module:
        def get_function(self, name):
            return Kernel(getattr(lib, name))

    fake_cp = SimpleNamespace(**{name: getattr(np, name) for name in (
        "ascontiguousarray", "asarray", "float32", "int64", "uint8", "empty", "zeros", "flatnonzero",
        "cumsum", "searchsorted", "arange")})
    monkeypatch.setattr(mc, "_cuda_module", lambda source: Module())
    for g, level in [(noise((30, 31, 32), seed=6), 0.05), (sphere((2, 2, 2)), 0.0),
                     (np.zeros((5, 5, 5), np.float32), 1.0)]:
        v, f = marching_cubes(g, level, backend="native")
        cv, cf = mc._cuda_passes(fake_cp, g, level, np.int64)
        assert cv.tobytes() == v.tobytes() and cf.tobytes() == f.tobytes()
    bad = sphere((8, 8, 8))
    bad[2, 2, 2] = np.nan
    with pytest.raises(FieldError):
        mc._cuda_passes(fake_cp, bad, 0.0, np.int64)


def test_cuda_source_compiles_for_the_device(tmp_path):
    """The NVRTC source (includes inlined) compiles as device code; needs nvcc, not a GPU."""
    import shutil

    from lrm_rt.mc import cuda_source

    src = cuda_source()
    assert '#include "' not in src
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    (tmp_path / "mc.cu").write_text(src)
    r = subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-ptx", str(tmp_path / "mc.cu"), "-o",
                        str(tmp_path / "mc.ptx")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = (tmp_path / "mc.ptx").read_text()
    for name in ("lrm_mc_classify", "lrm_mc_emit_vertices", "lrm_mc_emit_faces"):
        assert f".entry {name}(" in ptx


def _cuda_device_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_device_count() == 0, reason="needs CuPy and a CUDA device")
def test_cuda_matches_native(triposr_io, openlrm_io):
    import cupy
    import torch

    grids = [(sphere((64, 64, 64)), 0.0), (noise((48, 50, 52), seed=1), 0.0),
             (noise_in_ball((96, 96, 96)), 0.0), (triposr_io["density_grid"].numpy(), 25.0),
             (openlrm_io["density_grid"].numpy(), 3.0), (np.zeros((8, 8, 8), np.float32), 1.0)]
    for g, level in grids:
        v, f = marching_cubes(g, level, backend="native")
        cv, cf = marching_cubes(cupy.asarray(g), level, backend="cuda")  # host output by default
        assert cv.tobytes() == v.tobytes() and cf.tobytes() == f.tobytes()
    g, level = grids[0]
    dv, df = marching_cubes(cupy.asarray(g), level, backend="auto", device_output=True)
    assert isinstance(dv, cupy.ndarray) and np.array_equal(cupy.asnumpy(df), marching_cubes(g, level)[1])
    if torch.cuda.is_available():
        tv, tf = marching_cubes(torch.from_numpy(g).cuda(), level, backend="auto", device_output=True)
        assert tv.is_cuda and np.array_equal(tv.cpu().numpy(), marching_cubes(g, level)[0])
    bad = cupy.asarray(g)
    bad[1, 2, 3] = cupy.nan
    with pytest.raises(FieldError):
        marching_cubes(bad, level, backend="cuda")
