"""Native CPU field backend: cuda/triplane_field.cu compiled as C++/OpenMP, called through its C ABI (ctypes).

Queries and dense grids decode tiles of points through a vectorised fused sampler + MLP. With an iso-level,
``density_grid`` can evaluate coarse-to-fine: only cells near the surface are decoded at full resolution and
every other value is replaced by one on the same side of the level, so marching cubes gives the dense mesh.
The helpers at the top (flags, decoder packing, memory checks) are shared with the CUDA backend.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..errors import BackendError, ConfigError, ResourceError
from ..kernels import usable_cpus
from .base import FieldBackend
from .memory import available_host_memory, check_grid_memory  # noqa: F401  (re-exported)
from .spec import FieldSpec, TriplaneField, check_finite_planes, check_finite_points

# Flag bits: keep in sync with cuda/field.cuh.
FLAG_THIRD_ZY = 1
FLAG_RELU = 2
FLAG_SOFTPLUS = 4
FLAG_COLOR_CLAMP = 8
FLAG_RAW_DENSITY = 16

_STATUS = {1: "invalid arguments", 2: "out of memory"}

ArrayLike = Union[torch.Tensor, np.ndarray]
MODES = ("auto", "dense", "coarse_to_fine")


def field_flags(spec: FieldSpec) -> int:
    flags = 0
    if spec.third_plane == "zy":
        flags |= FLAG_THIRD_ZY
    if spec.hidden_activation == "relu":
        flags |= FLAG_RELU
    if spec.density_activation == "softplus":
        flags |= FLAG_SOFTPLUS
    if spec.color_activation == "sigmoid_clamp":
        flags |= FLAG_COLOR_CLAMP
    return flags


def pack_decoder(field: TriplaneField) -> Tuple[torch.Tensor, torch.Tensor]:
    """(params, dims) in the kernels' layout: per layer W (out, in) then b, back to back; dims [in0, out0, ...]."""
    ws, bs = field.weights, field.biases
    if not ws or len(ws) != len(bs):
        raise ConfigError("the field needs as many decoder weights as biases (at least one layer)")
    dims = [int(ws[0].shape[1])]
    for w, b in zip(ws, bs):
        if w.ndim != 2 or int(w.shape[1]) != dims[-1] or tuple(b.shape) != (int(w.shape[0]),):
            raise ConfigError(f"decoder layer shapes do not chain: {tuple(w.shape)} after width {dims[-1]}")
        dims.append(int(w.shape[0]))
    if dims[0] != 3 * field.channels or dims[-1] != 4:
        raise ConfigError(f"decoder maps {dims[0]} -> {dims[-1]}, the field needs {3 * field.channels} -> 4")
    parts = []
    for w, b in zip(ws, bs):
        parts += [w.detach().reshape(-1), b.detach().reshape(-1)]
    params = torch.cat([p.to(device=parts[0].device, dtype=torch.float32) for p in parts])
    return params, torch.tensor(dims, dtype=torch.int32)


def auto_coarse_stride(resolution: int) -> int:
    """Base stride of coarse-to-fine: the coarsest lattice keeps >= ~32 cells per axis (thin parts survive)."""
    s = 1
    while (resolution - 1) // (2 * s) >= 32:
        s *= 2
    return s


@dataclass(frozen=True)
class CoarseToFine:
    """Coarse-to-fine settings. The defaults gave the dense grid's exact mesh (no inside/outside flip) on
    the three tiny fixture fields and three random full-size-decoder fields at 128^3 and 256^3, where
    margin_rel 0.5 or value-space tests each missed small components on some of them.

    coarse_stride: stride of the first, dense lattice (power of two); None picks ``auto_coarse_stride``.
    margin_rel / margin_abs: a cell is refined when the level is within its corner range widened by
        margin_abs + margin_rel * (value range around the cell) on both sides.
    raw_space: run that test on the decoder's raw scale (log / inverse softplus of the density), where
        the field is smooth; exp densities otherwise have narrow peaks that can hide between nodes.
    neighbourhood: take the range for the margin over the cell and its 26 neighbours (curvature-aware).
    dilation: refined region grown by this many cells at every level.
    """

    coarse_stride: Optional[int] = None
    margin_rel: float = 1.0
    margin_abs: float = 0.0
    raw_space: bool = True
    neighbourhood: bool = False
    dilation: int = 1

    def space(self, spec: FieldSpec) -> int:
        if not self.raw_space:
            return 0
        return 1 if spec.density_activation == "exp" else 2

    def stride_for(self, resolution: int) -> int:
        s = auto_coarse_stride(resolution) if self.coarse_stride is None else int(self.coarse_stride)
        if s < 1 or s & (s - 1):
            raise ConfigError(f"coarse_stride must be a power of two, got {s}")
        return s


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown density-grid mode {mode!r} ({', '.join(MODES)})")


def grid_mode(mode: str, level: Optional[float], resolution: int) -> str:
    check_mode(mode)
    if mode == "coarse_to_fine" and level is None:
        raise ConfigError("coarse-to-fine density grids need the iso-level (level=...)")
    if mode == "auto":  # small grids are cheap: keep them exact everywhere
        return "coarse_to_fine" if level is not None and resolution >= 64 else "dense"
    return mode


def grid_request(field: TriplaneField, resolution: int, level: Optional[float], mode: str,
                 c2f: "CoarseToFine") -> Tuple[int, str, int]:
    """Validated (resolution, mode, coarse stride) of a density-grid request (native and CUDA backends)."""
    r = int(resolution)
    if r < 2:
        raise ConfigError(f"density-grid resolution must be >= 2, got {resolution}")
    mode = grid_mode(mode, level, r)
    check_finite_planes(field.planes)
    return r, mode, (c2f.stride_for(r) if mode == "coarse_to_fine" else 1)


def c2f_scratch_bytes(resolution: int, stride: int) -> int:
    """Two cell masks of the second-finest level (uint8)."""
    if stride <= 1:
        return 0
    nc = (resolution - 1) // 2 + 1
    return 2 * nc ** 3


# ---- fused rendering (cuda/volume_render.cu)

RENDER_MAX_SAMPLES = 128  # LRM_RENDER_MAX_SAMPLES: OpenLRM samples per pass held in per-ray scratch
RENDER_MIN_COARSE = 4  # the importance pdf needs >= 1 bin (coarse weights [1:-1])


def render_kernel_options(field: TriplaneField, options):
    """The family's render options when the fused kernels reproduce the reference for them, else None.

    TripoSR: always (its sampling is deterministic). OpenLRM: the deterministic mode only (no injected draws,
    no generator) with sample counts the per-ray scratch holds; anything else takes the reference renderer.
    """
    from ..render import OpenLRMRenderOptions, TripoSRRenderOptions

    if field.spec.family == "triposr":
        opt = TripoSRRenderOptions() if options is None else options
        return opt if isinstance(opt, TripoSRRenderOptions) and opt.n_samples >= 1 else None
    opt = OpenLRMRenderOptions() if options is None else options
    if not isinstance(opt, OpenLRMRenderOptions):
        return None  # the reference raises the ConfigError
    if opt.stratified_u is not None or opt.importance_u is not None or opt.generator is not None:
        return None
    if not (RENDER_MIN_COARSE <= opt.n_coarse <= RENDER_MAX_SAMPLES and 1 <= opt.n_fine <= RENDER_MAX_SAMPLES):
        return None
    return opt


def importance_u(n_fine: int) -> torch.Tensor:
    """The deterministic importance draws, from torch.linspace itself (its rounding differs from a plain formula)."""
    return torch.linspace(0.0, 1.0, n_fine, dtype=torch.float32)


# ---- ctypes

_i64, _i32, _f32, _vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_FIELD_ARGTYPES = [_vp, _i64, _i64, _i64, _vp, _vp, _i32, _i32, _f32, _f32]
_lib_cache: Optional[ctypes.CDLL] = None


def _lib() -> ctypes.CDLL:
    global _lib_cache
    if _lib_cache is None:
        from ..kernels import native

        lib = native()
        try:
            lib.lrm_field_query.argtypes = _FIELD_ARGTYPES + [_vp, _i64, _vp, _vp]
            lib.lrm_field_density_grid.argtypes = _FIELD_ARGTYPES + [_vp, _i64, _vp]
            lib.lrm_field_density_grid_c2f.argtypes = _FIELD_ARGTYPES + [
                _vp, _i64, _f32, _i64, _f32, _f32, _i32, _i32, _i32, _vp, ctypes.POINTER(_i64)]
            lib.lrm_render_triposr.argtypes = _FIELD_ARGTYPES + [_vp, _vp, _i64, _i32, _vp, _vp]
            lib.lrm_render_openlrm.argtypes = _FIELD_ARGTYPES + [
                _vp, _vp, _i64, _i32, _i32, _vp, _f32, _i32, _f32, _vp, _vp, _vp, _vp, _vp]
            lib.lrm_field_set_num_threads.argtypes = [_i32]
            lib.lrm_field_get_num_threads.restype = _i32
        except AttributeError as e:
            raise BackendError(f"the native library lacks the field kernels ({e}); rebuild it") from None
        for name in ("lrm_field_query", "lrm_field_density_grid", "lrm_field_density_grid_c2f",
                     "lrm_render_triposr", "lrm_render_openlrm"):
            getattr(lib, name).restype = ctypes.c_int
        _lib_cache = lib
    return _lib_cache


def _cpu_f32(x: ArrayLike, name: str) -> torch.Tensor:
    """float32 contiguous CPU tensor; no copy when x already is one (numpy arrays are wrapped, not copied)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class _Prepared:
    """Arguments shared by every call on one field (kept alive for the duration of the call)."""

    def __init__(self, field: TriplaneField, raw_density: bool = False) -> None:
        planes = _cpu_f32(field.planes, "planes")
        if planes.ndim != 4 or planes.shape[0] != 3:
            raise ConfigError(f"planes must be (3, C, H, W), got {tuple(planes.shape)}")
        self.planes = planes
        self.params, self.dims = pack_decoder(field)
        self.params = self.params.cpu().contiguous()
        flags = field_flags(field.spec) | (FLAG_RAW_DENSITY if raw_density else 0)
        _, c, h, w = planes.shape
        self.args = [_ptr(planes), c, h, w, _ptr(self.params), _ptr(self.dims), len(field.weights), flags,
                     float(field.spec.radius), float(field.spec.density_bias)]


class NativeFieldBackend(FieldBackend):
    """Fused triplane sampling + MLP on the CPU (OpenMP threads, SIMD tiles).

    threads: OpenMP threads per call; None follows ``torch.get_num_threads()``.
    mode: default density-grid mode: "auto" (coarse-to-fine when a level is given and R >= 64, else
        dense), "dense" or "coarse_to_fine".
    c2f: coarse-to-fine settings.
    After each ``density_grid`` call, ``last_grid_stats`` holds the mode and the number of decoded points.
    """

    name = "native"

    def __init__(self, threads: Optional[int] = None, mode: str = "auto", c2f: Optional[CoarseToFine] = None):
        check_mode(mode)
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.mode = mode
        self.c2f = c2f or CoarseToFine()
        self.last_grid_stats: dict = {}
        _lib()  # fail here (BackendError) rather than at the first query

    def _set_threads(self) -> ctypes.CDLL:
        lib = _lib()
        lib.lrm_field_set_num_threads(min(int(self.threads or torch.get_num_threads()), usable_cpus()))
        return lib

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status == 2:
            raise ResourceError(f"native {what}: out of memory")
        if status != 0:
            raise BackendError(f"native {what} failed: {_STATUS.get(status, status)}")

    def query(self, field: TriplaneField, points: ArrayLike, raw_density: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        d, rgb = self._query(field, points, raw_density, want_rgb=True)
        return d, rgb

    def query_density(self, field: TriplaneField, points: ArrayLike) -> torch.Tensor:
        """Activated density only (N,): skips the colour rows of the last layer."""
        return self._query(field, points, False, want_rgb=False)[0]

    def _query(self, field, points, raw_density, want_rgb):
        pts = _cpu_f32(points, "points").reshape(-1, 3)
        ok = torch.isfinite(pts)
        check_finite_points(bool(ok.all()), int((~ok).sum()))
        n = pts.shape[0]
        density = torch.empty(n, dtype=torch.float32)
        rgb = torch.empty((n, 3), dtype=torch.float32) if want_rgb else None
        if n == 0:
            return density, rgb
        prep = _Prepared(field, raw_density)
        lib = self._set_threads()
        st = lib.lrm_field_query(*prep.args, _ptr(pts), n, _ptr(density), _ptr(rgb) if want_rgb else None)
        self._check(st, "query")
        return density, rgb

    def density_grid(self, field: TriplaneField, resolution: int, level: Optional[float] = None,
                     mode: Optional[str] = None) -> torch.Tensor:
        """Activated density (R, R, R) on the family's mesh grid.

        level: iso-level the grid will be meshed at (needed for coarse-to-fine). mode: overrides the
        backend's default ("auto", "dense", "coarse_to_fine"). A coarse-to-fine grid is exact in every
        cell near the surface; elsewhere values are only guaranteed to be on the correct side of ``level``.
        """
        from .torch_ref import grid_axis

        r, mode, stride = grid_request(field, resolution, level, mode or self.mode, self.c2f)
        check_grid_memory(r, c2f_scratch_bytes(r, stride), available_host_memory(), "host")
        try:
            grid = torch.empty((r, r, r), dtype=torch.float32)
        except RuntimeError as e:
            raise ResourceError(f"allocating a {r}^3 density grid ({r ** 3 * 4} bytes) failed: {e}") from None
        axis = grid_axis(r, field.spec).to(torch.float32).contiguous()
        prep = _Prepared(field)
        lib = self._set_threads()
        if mode == "dense":
            st = lib.lrm_field_density_grid(*prep.args, _ptr(axis), r, _ptr(grid))
            evaluated = r ** 3
        else:
            n_eval = _i64(0)
            c = self.c2f
            st = lib.lrm_field_density_grid_c2f(*prep.args, _ptr(axis), r, float(level), stride,
                                                float(c.margin_rel), float(c.margin_abs), c.space(field.spec),
                                                int(c.neighbourhood), int(c.dilation),
                                                _ptr(grid), ctypes.byref(n_eval))
            evaluated = int(n_eval.value)
        self._check(st, "density grid")
        self.last_grid_stats = {"mode": mode, "resolution": r, "evaluated": evaluated,
                                "fraction": evaluated / r ** 3, "coarse_stride": stride}
        return grid

    def render(self, field: TriplaneField, rays_o: ArrayLike, rays_d: ArrayLike, options=None):
        """Fused CPU renderer (cuda/volume_render.cu) for the deterministic modes, the reference otherwise.

        TripoSR always, OpenLRM without injected draws / generator (see ``render_kernel_options``). Rays
        (..., 3) as from ``lrm_rt.render``'s camera functions; results are CPU tensors of the rays' shape.
        """
        from ..render import RenderOutput

        opt = render_kernel_options(field, options)
        if opt is None:
            return super().render(field, rays_o, rays_d, options)
        o, d = _cpu_f32(rays_o, "rays_o"), _cpu_f32(rays_d, "rays_d")
        if o.shape != d.shape or o.ndim < 1 or o.shape[-1] != 3:
            raise ConfigError(f"rays_o and rays_d must both be (..., 3), got {tuple(o.shape)} and {tuple(d.shape)}")
        shape = tuple(o.shape[:-1])
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        n = o.shape[0]
        rgb, weight = torch.empty((n, 3)), torch.empty(n)
        prep = _Prepared(field)
        lib = self._set_threads()
        if field.spec.family == "triposr":
            st = lib.lrm_render_triposr(*prep.args, _ptr(o), _ptr(d), n, int(opt.n_samples), _ptr(rgb), _ptr(weight))
            self._check(st, "render")
            return RenderOutput(rgb=rgb.reshape(*shape, 3), weight=weight.reshape(shape))
        depth = torch.empty(n)
        coarse, fine = torch.empty((n, opt.n_coarse)), torch.empty((n, opt.n_fine))
        u = importance_u(opt.n_fine)
        st = lib.lrm_render_openlrm(*prep.args, _ptr(o), _ptr(d), n, int(opt.n_coarse), int(opt.n_fine), _ptr(u),
                                    float(opt.out_of_box_sigma), int(opt.version == "1.0"), float(opt.bg_color),
                                    _ptr(rgb), _ptr(weight), _ptr(depth), _ptr(coarse), _ptr(fine))
        self._check(st, "render")
        return RenderOutput(rgb=rgb.reshape(*shape, 3), weight=weight.reshape(shape), depth=depth.reshape(shape),
                            extras={"depths_coarse": coarse, "depths_fine": fine})
