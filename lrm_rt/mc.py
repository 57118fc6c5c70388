"""Marching cubes: dense density grid -> welded triangle mesh, plus the fixtures' canonical mesh order.

Backends:

* ``native``   the CPU build of cuda/marching_cubes.cu (OpenMP), through ``lrm_rt.kernels.native()``.
* ``cuda``     the same kernels compiled by NVRTC (CuPy RawModule); the scans between the passes are
               CuPy ``flatnonzero`` / ``cumsum``. CuPy is imported only when this backend is used.
* ``pymcubes`` PyMCubes (``import mcubes``), the library OpenLRM uses; a reference for tests.
* ``auto``     ``cuda`` for a CuPy array or a CUDA torch tensor, else ``native`` if it builds, else
               ``pymcubes``.

All backends use the same conventions: inside = value > level; vertices (V, 3) float32 in grid index
units ordered like the grid axes, (x, y, z) = (i, j, k); faces (F, 3) wound outward (positive volume)
for "inside = field above level". ``native`` and ``cuda`` run the same kernels and scans, so they give
the same arrays (bit for bit; the gpu-marked test checks it) in a deterministic order (vertices by grid
edge, faces by cell), with the same vertex and face counts as PyMCubes. Their generated case table
(cuda/gen_mc_tables.py) resolves ambiguous faces the same way in both neighbouring cells, so a closed
surface gives a watertight 2-manifold mesh; polygons may be split along other diagonals than PyMCubes'.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any, Tuple

import numpy as np

from .errors import BackendError, ConfigError, FieldError

BACKENDS = ("auto", "native", "cuda", "pymcubes")

# Status codes of the host API in cuda/marching_cubes.cu.
_MC_OK, _MC_EINVAL, _MC_ENAN, _MC_ENOMEM = 0, -1, -2, -3
_NAN_BIT = 0x80
_POPCOUNT3 = np.array([0, 1, 1, 2, 1, 2, 2, 3], dtype=np.int64)


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _empty(index_dtype) -> Tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 3), np.float32), np.zeros((0, 3), index_dtype)


def _check_args(shape, level) -> float:
    if len(shape) != 3:
        raise ConfigError(f"marching cubes needs a 3-D grid, got shape {tuple(shape)}")
    level = float(level)
    if not np.isfinite(level):
        raise ConfigError(f"marching-cubes level must be finite, got {level}")
    return level


def _host_grid(grid: Any) -> np.ndarray:
    if _is_torch(grid):
        grid = grid.detach().cpu().numpy()
    elif _is_cupy(grid):
        grid = grid.get()
    return np.ascontiguousarray(grid, dtype=np.float32)


def _nan_error(shape) -> FieldError:
    return FieldError(f"the density grid {tuple(shape)} holds NaN values; it cannot be meshed "
                      "(check the triplane / network output)")


def marching_cubes(grid: Any, level: float, backend: str = "auto", *, index_dtype=np.int64,
                   device_output: bool = False) -> Tuple[Any, Any]:
    """Extract the ``level`` iso-surface of a dense (R0, R1, R2) grid.

    grid: numpy array, torch tensor (CPU or CUDA) or CuPy array; converted to float32.
    Returns (vertices (V, 3) float32 in grid index units, faces (F, 3) ``index_dtype``), as numpy
    arrays. With ``backend="cuda"`` and ``device_output=True`` the arrays stay on the GPU (CuPy, or
    torch tensors for a torch input). A grid with no crossing, or with a side < 2, gives an empty mesh;
    NaN in the grid raises ``FieldError``. ±inf values are allowed (treated as far inside / outside).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown marching-cubes backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not hasattr(grid, "shape"):
        grid = np.asarray(grid, dtype=np.float32)
    level = _check_args(grid.shape, level)
    if backend == "auto":
        on_gpu = _is_cupy(grid) or (_is_torch(grid) and grid.is_cuda)
        if on_gpu:
            backend = "cuda"
        else:
            from .kernels import native_available

            backend = "native" if native_available() else "pymcubes"
    if backend == "cuda":
        return _marching_cubes_cuda(grid, level, index_dtype, device_output)
    host = _host_grid(grid)
    if backend == "native":
        return _marching_cubes_native(host, level, index_dtype)
    return _marching_cubes_pymcubes(host, level, index_dtype)


# ------------------------------------------------------------------------------------------- native


def _native_lib():
    from .kernels import native

    lib = native()
    if not getattr(lib, "_lrm_mc_typed", False):
        i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        lib.lrm_mc_plan_dense.argtypes = [vp, i64, i64, i64, f32, ctypes.POINTER(vp),
                                          ctypes.POINTER(i64), ctypes.POINTER(i64)]
        lib.lrm_mc_plan_dense.restype = ctypes.c_int
        lib.lrm_mc_plan_emit.argtypes = [vp, vp, vp]
        lib.lrm_mc_plan_emit.restype = ctypes.c_int
        lib.lrm_mc_plan_free.argtypes = [vp]
        lib.lrm_mc_plan_free.restype = None
        lib.lrm_mc_classify.argtypes = [i64, vp, i64, i64, i64, f32, vp]
        lib.lrm_mc_emit_vertices.argtypes = [i64, vp, vp, vp, vp, i64, i64, i64, f32, vp]
        lib.lrm_mc_emit_faces.argtypes = [i64, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, f32, vp]
        for name in ("lrm_mc_classify", "lrm_mc_emit_vertices", "lrm_mc_emit_faces"):
            getattr(lib, name).restype = None
        lib._lrm_mc_typed = True
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _marching_cubes_native(grid: np.ndarray, level: float, index_dtype) -> Tuple[np.ndarray, np.ndarray]:
    lib = _native_lib()
    R0, R1, R2 = grid.shape
    plan = ctypes.c_void_p()
    nv, nf = ctypes.c_int64(), ctypes.c_int64()
    st = lib.lrm_mc_plan_dense(_ptr(grid), R0, R1, R2, level, ctypes.byref(plan), ctypes.byref(nv),
                               ctypes.byref(nf))
    if st == _MC_ENAN:
        raise _nan_error(grid.shape)
    if st == _MC_ENOMEM:
        from .errors import ResourceError

        raise ResourceError(f"out of memory in marching cubes on a {R0}x{R1}x{R2} grid")
    if st != _MC_OK:
        raise BackendError(f"lrm_mc_plan_dense failed with status {st}")
    try:
        verts = np.empty((nv.value, 3), np.float32)
        faces = np.empty((nf.value, 3), np.int64)
        st = lib.lrm_mc_plan_emit(plan, _ptr(verts), _ptr(faces))
        if st != _MC_OK:
            raise BackendError(f"lrm_mc_plan_emit failed with status {st}")
    finally:
        lib.lrm_mc_plan_free(plan)
    return verts, faces.astype(index_dtype, copy=False)


def _marching_cubes_passes_numpy(grid: Any, level: float) -> Tuple[np.ndarray, np.ndarray]:
    """The CUDA backend's exact sequence of passes and scans, run with numpy + the CPU kernels.

    Not a user backend (the host API above is faster); it lets the CPU-only test suite exercise the
    orchestration that ``_marching_cubes_cuda`` performs with CuPy.
    """
    grid = _host_grid(grid)
    lib = _native_lib()
    if min(grid.shape) < 2:
        return _empty(np.int64)
    R0, R1, R2 = grid.shape
    n = grid.size
    flags = np.empty(n, np.uint8)
    lib.lrm_mc_classify(n, _ptr(grid), R0, R1, R2, level, _ptr(flags))
    if (flags & _NAN_BIT).any():
        raise _nan_error(grid.shape)
    points, vbase, nv, cells, tbase, nf, row_start = _scan(np, flags, R0 * R1, R2)
    verts = np.empty((nv, 3), np.float32)
    faces = np.empty((nf, 3), np.int64)
    lib.lrm_mc_emit_vertices(len(points), _ptr(points), _ptr(vbase), _ptr(flags), _ptr(grid), R0, R1, R2,
                             level, _ptr(verts))
    lib.lrm_mc_emit_faces(len(cells), _ptr(cells), _ptr(tbase), _ptr(row_start), _ptr(points), _ptr(vbase),
                          _ptr(flags), _ptr(grid), R0, R1, R2, level, _ptr(faces))
    return verts, faces


def _scan(xp, flags, rows: int, row_len: int):
    """Pass 2 for either array module: ordered point / cell lists, their exclusive prefix sums, and
    the first slot of each grid row in the point list."""
    points = xp.flatnonzero(flags & 0x07).astype(xp.int64, copy=False)
    counts = xp.asarray(_POPCOUNT3)[flags[points] & 0x07]
    vbase = xp.cumsum(counts, dtype=xp.int64) - counts
    nv = int(vbase[-1] + counts[-1]) if len(points) else 0
    cells = xp.flatnonzero((flags >> 3) & 0x07).astype(xp.int64, copy=False)
    tcount = ((flags[cells] >> 3) & 0x07).astype(xp.int64)
    tbase = xp.cumsum(tcount, dtype=xp.int64) - tcount
    nf = int(tbase[-1] + tcount[-1]) if len(cells) else 0
    row_start = xp.searchsorted(points, xp.arange(rows + 1, dtype=xp.int64) * row_len).astype(xp.int64)
    return points, vbase, nv, cells, tbase, nf, row_start


# ------------------------------------------------------------------------------------------- cuda


def cuda_source() -> str:
    """marching_cubes.cu as one NVRTC module (headers inlined)."""
    from .kernels import nvrtc_module_source

    return nvrtc_module_source("marching_cubes.cu")


@functools.lru_cache(maxsize=None)
def _cuda_module(source: str):
    import cupy

    return cupy.RawModule(code=source, options=("-std=c++17",))


def _launch(kernel, n: int, args: tuple) -> None:
    if n <= 0:
        return
    threads = 256
    blocks = min((n + threads - 1) // threads, 1 << 20)  # grid-stride loops cover the rest
    kernel((blocks,), (threads,), args)


def _marching_cubes_cuda(grid: Any, level: float, index_dtype, device_output: bool):
    try:
        import cupy as cp
    except ImportError as e:
        raise BackendError(f"the cuda marching-cubes backend needs CuPy: {e}") from None
    was_torch = _is_torch(grid)
    device, stream = None, None
    if was_torch:
        grid = grid.detach()
        if grid.is_cuda:
            import torch

            # Run on torch's device and current stream, so the kernels see the finished grid and
            # torch sees the finished mesh without a device-wide synchronisation.
            device = cp.cuda.Device(grid.device.index)
            stream = cp.cuda.ExternalStream(torch.cuda.current_stream(grid.device).cuda_stream)
        else:
            grid = grid.numpy()
    with (device if device is not None else contextlib.nullcontext()), \
            (stream if stream is not None else contextlib.nullcontext()):
        verts, faces = _cuda_passes(cp, grid, level, index_dtype)
        if not device_output:
            return cp.asnumpy(verts), cp.asnumpy(faces)
    if was_torch:
        import torch

        return torch.from_dlpack(verts), torch.from_dlpack(faces)
    return verts, faces


def _cuda_passes(cp, grid: Any, level: float, index_dtype):
    g = cp.ascontiguousarray(cp.asarray(grid), dtype=cp.float32)
    if min(g.shape) < 2:
        verts, faces = cp.zeros((0, 3), cp.float32), cp.zeros((0, 3), index_dtype)
    else:
        mod = _cuda_module(cuda_source())
        R0, R1, R2 = (np.int64(s) for s in g.shape)
        lvl = np.float32(level)
        n = int(g.size)
        flags = cp.empty(n, cp.uint8)
        _launch(mod.get_function("lrm_mc_classify"), n, (np.int64(n), g, R0, R1, R2, lvl, flags))
        if bool((flags & _NAN_BIT).any()):
            raise _nan_error(g.shape)
        points, vbase, nv, cells, tbase, nf, row_start = _scan(cp, flags, int(R0 * R1), int(R2))
        verts = cp.empty((nv, 3), cp.float32)
        faces = cp.empty((nf, 3), cp.int64)
        _launch(mod.get_function("lrm_mc_emit_vertices"), len(points),
                (np.int64(len(points)), points, vbase, flags, g, R0, R1, R2, lvl, verts))
        _launch(mod.get_function("lrm_mc_emit_faces"), len(cells),
                (np.int64(len(cells)), cells, tbase, row_start, points, vbase, flags, g,
                 R0, R1, R2, lvl, faces))
        faces = faces.astype(index_dtype, copy=False)
    return verts, faces


# ------------------------------------------------------------------------------------------- pymcubes


def _marching_cubes_pymcubes(grid: np.ndarray, level: float, index_dtype) -> Tuple[np.ndarray, np.ndarray]:
    try:
        import mcubes
    except ImportError as e:
        raise BackendError(f"the pymcubes backend needs PyMCubes (pip install PyMCubes): {e}") from None
    if np.isnan(grid).any():
        raise _nan_error(grid.shape)
    if min(grid.shape) < 2:
        return _empty(index_dtype)
    verts, faces = mcubes.marching_cubes(grid, level)
    return (np.ascontiguousarray(verts, dtype=np.float32).reshape(-1, 3),
            np.ascontiguousarray(faces, dtype=index_dtype).reshape(-1, 3))


# ------------------------------------------------------------------------------------------- canonical order


def canonical_mesh(vertices: Any, faces: Any) -> Tuple[np.ndarray, np.ndarray]:
    """The fixtures' canonical order (fixtures README §6.4), so meshes from any library compare directly.

    Vertices sorted lexicographically by (x, y, z); faces re-indexed; each face rotated (winding kept)
    to start at its smallest index; faces sorted lexicographically. Keeps the input dtypes.
    """
    v = np.asarray(vertices)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ConfigError(f"canonical_mesh needs (V, 3) vertices and (F, 3) faces, got {v.shape}, {f.shape}")
    order = np.lexsort((v[:, 2], v[:, 1], v[:, 0]))  # last key is primary: x, then y, then z
    rank = np.empty(len(v), np.int64)
    rank[order] = np.arange(len(v))
    g = rank[f.astype(np.int64)]
    # Rotate (not reorder) each triangle so its smallest index comes first: the winding is kept.
    shift = np.argmin(g, axis=1)
    cols = (shift[:, None] + np.arange(3)[None, :]) % 3
    g = np.take_along_axis(g, cols, axis=1)
    g = g[np.lexsort((g[:, 2], g[:, 1], g[:, 0]))]
    return v[order], g.astype(f.dtype, copy=False)
