"""CUDA field backend: the kernels of cuda/triplane_field.cu compiled at run time by NVRTC (cupy.RawModule).

Thin by design: the GPU runs the same kernels (and the same coarse-to-fine steps) as the CPU build, whose
per-point versions are tested on the CPU by driving this class with a host runtime (tests/test_cuda_field.py).
CuPy is imported lazily, so importing this module never needs it.

Inputs: torch CUDA tensors and CuPy arrays are used in place through DLPack (no copy when already float32
and contiguous); host tensors / arrays are uploaded. Planes are repacked once per field to the kernels'
channel-last layout, optionally as float16 (accumulation stays float32).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import BackendError, ConfigError, ResourceError
from .base import FieldBackend
from .memory import check_grid_memory
from .native import (
    FLAG_RAW_DENSITY,
    CoarseToFine,
    check_mode,
    field_flags,
    grid_request,
    importance_u,
    pack_decoder,
    render_kernel_options,
)
from .spec import TriplaneField, check_finite_points

PLANE_DTYPES = ("float32", "float16")
RAY_BLOCK = 64  # render kernels: a thread does a whole ray, so small blocks spread few rays over every SM
RENDER_SMEM_BYTES = 48 * 1024  # staging a larger decoder would leave one block (of few rays) per SM
RENDER_KERNEL_MODES = ("auto", "always")
COMPACT_CHUNK = 1 << 24  # nodes per compacted slab (a multiple of 32): 16 MB of flags + up to 128 MB of indices


def reference_render_preferred(n_params: int, stage_weights: Optional[bool], tensors_on_cuda: bool) -> bool:
    """Whether torch's reference renderer on the GPU beats the fused kernel.

    Measured on an H200 (benchmarks/results/gpu-nvidia-h200): when the decoder does not fit the render
    kernel's shared memory, its weights come from global memory and torch (cuBLAS on all samples) wins —
    TripoSR 11 vs 130 ms, OpenLRM base 19 vs 30 ms per 128^2 view; staged (lrm-tiny) the kernel wins, 10 vs
    14 ms. Only for torch CUDA tensors, where the reference renderer runs on the GPU.
    """
    staged = stage_weights is not False and 4 * n_params <= RENDER_SMEM_BYTES
    return tensors_on_cuda and not staged


def kernel_source() -> str:
    """triplane_field.cu and volume_render.cu as one NVRTC module (headers inlined once)."""
    from ..kernels import nvrtc_module_source

    return nvrtc_module_source("triplane_field.cu", "volume_render.cu")


def lattice_count(r: int, s: int) -> int:
    return (r - 1) // s + 1 + (1 if (r - 1) % s else 0)


def level_in_space(level: float, space: int) -> float:
    """The iso-level in the space the refinement test uses (cuda/field.cuh lrm_c2f_space)."""
    if space == 0:
        return float(level)
    if level <= 0:
        return -100.0
    if space == 1:
        return math.log(level)
    return level if level > 20 else math.log(math.expm1(level))


class CupyRuntime:
    """Launches the kernels on one GPU with CuPy. Also the interface a host runtime implements in tests:
    xp, from_input, from_torch, to_output, launch, smem_limit_bytes, free_bytes, stream."""

    def __init__(self, device: Optional[int] = None, block: int = 256, staged_block: int = 1024) -> None:
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise BackendError(f"the CUDA field backend needs CuPy (pip install cupy-cuda12x): {e}") from None
        if cupy.cuda.runtime.getDeviceCount() == 0:  # pragma: no cover
            raise BackendError("the CUDA field backend found no CUDA device")
        self.cp = self.xp = cupy
        self.device = cupy.cuda.Device(cupy.cuda.runtime.getDevice() if device is None else device)
        self.block = block
        self.staged_block = staged_block
        attrs = self.device.attributes
        self._sm_count = int(attrs.get("MultiProcessorCount", 80))
        self._smem_optin = int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 * 1024))
        self._modules: dict = {}

    # -- arrays
    def from_torch(self, t: torch.Tensor):
        if t.is_cuda:
            return self.cp.from_dlpack(t.detach())
        return self.cp.asarray(t.detach().cpu().numpy())

    def from_input(self, x: Any) -> Tuple[Any, str]:
        """(float32 contiguous device array, kind) where kind says how to hand results back."""
        cp = self.cp
        if isinstance(x, torch.Tensor):
            if x.is_cuda:
                return self.from_torch(x.detach().to(torch.float32).contiguous()), "torch_cuda"
            return cp.asarray(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)), "host"
        if isinstance(x, cp.ndarray):
            return cp.ascontiguousarray(x, dtype=cp.float32), "cupy"
        return cp.asarray(np.ascontiguousarray(x, dtype=np.float32)), "host"

    def to_output(self, a, kind: str):
        if kind == "cupy":
            return a
        if kind == "host":
            return torch.from_numpy(self.cp.asnumpy(a))
        return torch.from_dlpack(a)  # torch_cuda: zero copy

    def grid_output_kind(self) -> str:
        return "torch_cuda" if torch.cuda.is_available() else "cupy"

    def stream(self):
        """Run on torch's current stream when torch has CUDA, so work is ordered with the caller's."""
        if torch.cuda.is_available():
            return self.cp.cuda.ExternalStream(torch.cuda.current_stream(self.device.id).cuda_stream)
        return contextlib.nullcontext()

    # -- device facts
    def smem_limit_bytes(self) -> int:
        return self._smem_optin

    def free_bytes(self) -> int:
        free, _ = self.cp.cuda.runtime.memGetInfo()
        return int(free) + int(self.cp.get_default_memory_pool().free_bytes())

    # -- kernels
    def _module(self, max_width: int):
        mod = self._modules.get(max_width)
        if mod is None:
            try:
                mod = self.cp.RawModule(code=kernel_source(),
                                        options=("-std=c++17", f"-DLRM_FIELD_MAX_WIDTH={max_width}"))
                mod.compile()
            except Exception as e:  # noqa: BLE001 - NVRTC errors come in several CuPy exception types
                raise BackendError(f"compiling the field kernels with NVRTC failed: {e}") from None
            self._modules[max_width] = mod
        return mod

    def launch(self, name: str, n: int, args: Sequence[Any], smem_floats: int = 0, max_width: int = 128,
               block: Optional[int] = None) -> None:
        if n <= 0:
            return
        fn = self._module(max_width).get_function(name)
        smem = 4 * smem_floats
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        if block is None:
            # A block whose weights fill an SM's shared memory runs alone on it: make it as large as the
            # kernel's registers allow (1024 threads = half the SM's warps for the TripoSR decoder, where
            # 512 gave a quarter: 1.2x faster grids on an H100, benchmarks/results/gpu-nvidia-h100).
            block = (min(self.staged_block, fn.max_threads_per_block) // 32 * 32) if smem > 48 * 1024 else self.block
        grid = max(1, min(-(-n // block), self._sm_count * 32))
        with self.device:
            fn((grid,), (block,), tuple(args), shared_mem=smem)


class _DeviceField:
    """A field's arguments on the device: planes (3, H, W, C) channel-last (float32 or float16 bits),
    packed decoder, dims."""

    def __init__(self, rt, field: TriplaneField, plane_dtype: str) -> None:
        planes = field.planes.detach()
        if planes.ndim != 4 or planes.shape[0] != 3:
            raise ConfigError(f"planes must be (3, C, H, W), got {tuple(planes.shape)}")
        _, c, h, w = planes.shape
        hwc = planes.permute(0, 2, 3, 1).contiguous()
        if plane_dtype == "float16":
            hwc = hwc.to(torch.float16).view(torch.int16)  # the kernels take the raw half bits
            self.planes = rt.from_torch(hwc).view(rt.xp.uint16)
        else:
            self.planes = rt.from_torch(hwc.to(torch.float32))
        params, dims = pack_decoder(field)
        self.params = rt.from_torch(params.contiguous())
        self.dims = rt.from_torch(dims)
        self.n_params = int(params.numel())
        self.n_layers = len(field.weights)
        self.c, self.h, self.w = int(c), int(h), int(w)
        self.max_width = int(max(dims.tolist()))
        self.suffix = "_f16" if plane_dtype == "float16" else "_f32"


class CudaFieldBackend(FieldBackend):
    """Triplane field on a CUDA GPU (NVRTC kernels through CuPy).

    plane_dtype: "float32", or "float16" to halve plane memory traffic (values rounded to half; the sums
        and the MLP stay float32). Mind TripoSR's triplane range (|x| up to ~1.4e3, half spacing ~1 there).
    mode / c2f: density-grid mode and coarse-to-fine settings, as ``NativeFieldBackend``.
    stage_weights: stage the decoder in shared memory (None: when it fits the device's opt-in limit).
    compact: refine coarse-to-fine grids by listing the nodes to decode first and decoding only those (full
        warps; default) instead of one thread per node that skips the nodes away from the surface (False).
        Same grid bit for bit; on an H100, TripoSR-size field, 27 vs 45 ms at 256^3 and 100 vs 174 ms at
        512^3 (benchmarks/results/gpu-nvidia-h100).
    render_kernel: "auto" renders with torch's reference renderer on the GPU where that is faster (decoders
        too large to stage, torch CUDA inputs: ``reference_render_preferred``), "always" with the kernel.
    runtime: the launcher (default ``CupyRuntime(device)``); tests pass a host one.
    Results come back like the input: torch CUDA tensors, CuPy arrays, or CPU tensors for host input;
    density grids as torch CUDA tensors when torch has CUDA, else CuPy arrays.
    """

    name = "cuda"

    def __init__(self, device: Optional[int] = None, plane_dtype: str = "float32", mode: str = "auto",
                 c2f: Optional[CoarseToFine] = None, stage_weights: Optional[bool] = None, runtime=None,
                 render_kernel: str = "auto", compact: bool = True) -> None:
        if plane_dtype not in PLANE_DTYPES:
            raise ConfigError(f"plane_dtype must be one of {PLANE_DTYPES}, got {plane_dtype!r}")
        if render_kernel not in RENDER_KERNEL_MODES:
            raise ConfigError(f"render_kernel must be one of {RENDER_KERNEL_MODES}, got {render_kernel!r}")
        self.render_kernel = render_kernel
        self.compact = compact
        check_mode(mode)
        self.rt = runtime if runtime is not None else CupyRuntime(device)
        self.plane_dtype = plane_dtype
        self.mode = mode
        self.c2f = c2f or CoarseToFine()
        self.stage_weights = stage_weights
        self.last_grid_stats: dict = {}
        self._cache_key = None
        self._cache_owner = None
        self._cache_lock = threading.Lock()
        self._cache: Optional[_DeviceField] = None

    # -- helpers
    def _prepare(self, field: TriplaneField) -> _DeviceField:
        tensors = [field.planes, *field.weights, *field.biases]
        key = (id(field), self.plane_dtype, tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors))
        with self._cache_lock:  # threads sharing this backend: key and copy are replaced together
            if key != self._cache_key:
                self._cache = _DeviceField(self.rt, field, self.plane_dtype)
                # The key names objects by id and address, so they are kept alive with it: a freed field's id and
                # memory would otherwise be reused by the next request's, which would be answered from this copy.
                self._cache_key, self._cache_owner = key, (field, tensors)
            return self._cache

    def _smem_floats(self, dev: _DeviceField) -> int:
        fits = 4 * dev.n_params <= self.rt.smem_limit_bytes()
        stage = fits if self.stage_weights is None else (self.stage_weights and fits)
        return dev.n_params if stage else 0

    def _field_args(self, dev: _DeviceField, field: TriplaneField, flags: int, smem: int) -> list:
        return [dev.planes, np.int32(dev.c), np.int32(dev.h), np.int32(dev.w), dev.params, dev.dims,
                np.int32(dev.n_layers), np.int32(flags), np.float32(field.spec.radius),
                np.float32(field.spec.density_bias), np.int32(smem)]

    def _width(self, dev: _DeviceField) -> int:
        return max(32, -(-dev.max_width // 32) * 32)

    # -- queries
    def query(self, field: TriplaneField, points, raw_density: bool = False):
        return self._query(field, points, raw_density, True)

    def query_density(self, field: TriplaneField, points):
        """Activated density only (N,): the colour rows of the last layer are skipped."""
        return self._query(field, points, False, False)[0]

    def _query(self, field, points, raw_density, want_rgb):
        rt, xp = self.rt, self.rt.xp
        with rt.stream():
            pts, kind = rt.from_input(points)
            pts = pts.reshape(-1, 3)
            check_finite_points(bool(xp.isfinite(pts).all()))
            n = int(pts.shape[0])
            dev = self._prepare(field)
            density = xp.empty((n,), dtype=xp.float32)
            rgb = xp.empty((n, 3), dtype=xp.float32)
            flags = field_flags(field.spec) | (FLAG_RAW_DENSITY if raw_density else 0)
            smem = self._smem_floats(dev)
            rt.launch("lrm_field_query" + dev.suffix, n,
                      [np.int64(n), pts, *self._field_args(dev, field, flags, smem), np.int32(int(want_rgb)),
                       density, rgb], smem, self._width(dev))
            return rt.to_output(density, kind), (rt.to_output(rgb, kind) if want_rgb else None)

    # -- density grids
    def density_grid(self, field: TriplaneField, resolution: int, level: Optional[float] = None,
                     mode: Optional[str] = None):
        """Activated density (R, R, R); see ``NativeFieldBackend.density_grid`` for level / mode."""
        from .torch_ref import grid_axis

        rt, xp = self.rt, self.rt.xp
        r, mode, stride = grid_request(field, resolution, level, mode or self.mode, self.c2f)
        nc_fine = lattice_count(r, 2) - 1 if stride > 1 else 0
        # per node of a compacted slab: flags (1 byte), indices (8) and 9 of headroom for nonzero's scan temporaries
        compact_bytes = 18 * min(COMPACT_CHUNK, r ** 3) if self.compact and stride > 1 else 0
        check_grid_memory(r, 2 * nc_fine ** 3 + compact_bytes, rt.free_bytes(), "GPU")
        with rt.stream():
            dev = self._prepare(field)
            try:
                grid = xp.empty((r, r, r), dtype=xp.float32)
            except Exception as e:  # noqa: BLE001 - cupy.cuda.memory.OutOfMemoryError and friends
                raise ResourceError(f"allocating a {r}^3 density grid ({r ** 3 * 4} bytes) failed: {e}") from None
            axis = rt.from_torch(grid_axis(r, field.spec).to(torch.float32).contiguous())
            smem = self._smem_floats(dev)
            fargs = self._field_args(dev, field, field_flags(field.spec), smem)
            width = self._width(dev)
            s = stride
            m = lattice_count(r, s)
            evaluated = warps = 0
            rt.launch("lrm_field_lattice" + dev.suffix, m ** 3,
                      [np.int64(m ** 3), np.int64(r), np.int64(s), axis, *fargs, grid], smem, width)
            c = self.c2f
            space = c.space(field.spec)
            lvl = np.float32(level_in_space(level, space)) if mode == "coarse_to_fine" else None
            while s > 1:
                nc = lattice_count(r, s) - 1
                cells = nc ** 3
                mask = xp.empty((cells,), dtype=xp.uint8)
                tmp = xp.empty((cells,), dtype=xp.uint8)
                rt.launch("lrm_c2f_mask", cells,
                          [np.int64(cells), np.int64(r), np.int64(s), grid, lvl, np.float32(c.margin_rel),
                           np.float32(c.margin_abs), np.int32(space), np.int32(int(c.neighbourhood)), mask])
                if c.dilation > 0:
                    for axis_id, (src, dst) in enumerate(((mask, tmp), (tmp, mask), (mask, tmp))):
                        rt.launch("lrm_c2f_dilate", cells, [np.int64(cells), np.int64(nc), np.int32(axis_id),
                                                            np.int32(c.dilation), src, dst])
                    mask = tmp
                m2 = lattice_count(r, s // 2)
                if self.compact:
                    counts = self._refine_compacted(dev, r, s, m2 ** 3, mask, axis, fargs, grid, smem, width)
                    evaluated, warps = evaluated + counts[0], warps + counts[1]
                else:
                    rt.launch("lrm_field_c2f_level" + dev.suffix, m2 ** 3,
                              [np.int64(m2 ** 3), np.int64(r), np.int64(s), mask, axis, *fargs, grid], smem, width)
                s //= 2
            self.last_grid_stats = {"mode": mode, "resolution": r, "coarse_stride": stride}
            if self.compact and stride > 1:
                # warps_touched: 32-node groups the in-place kernel would run (lane use = evaluated / 32 / warps)
                self.last_grid_stats.update(evaluated=m ** 3 + evaluated, fraction=(m ** 3 + evaluated) / r ** 3,
                                            refined=evaluated, warps_touched=warps)
            return rt.to_output(grid, rt.grid_output_kind())

    def _refine_compacted(self, dev, r, s, n, mask, axis, fargs, grid, smem, width) -> Tuple[int, int]:
        """Level s -> s/2 in slabs of COMPACT_CHUNK nodes: fill / flag, list the flagged nodes, decode them."""
        rt, xp = self.rt, self.rt.xp
        evaluated = warps = 0
        need = xp.empty((min(n, COMPACT_CHUNK),), dtype=xp.uint8)
        for t0 in range(0, n, COMPACT_CHUNK):
            k = min(COMPACT_CHUNK, n - t0)
            rt.launch("lrm_c2f_level_split", k, [np.int64(k), np.int64(t0), np.int64(r), np.int64(s), mask, grid, need])
            idx = xp.ascontiguousarray(xp.flatnonzero(need[:k]), dtype=xp.int64)
            count = int(idx.size)
            if count:
                rt.launch("lrm_field_c2f_points" + dev.suffix, count,
                          [np.int64(count), idx, np.int64(t0), np.int64(r), np.int64(s), axis, *fargs, grid],
                          smem, width)
                # idx is sorted and t0 a multiple of 32: count the distinct 32-node groups (the in-place warps)
                group = idx // 32
                warps += 1 + int((group[1:] != group[:-1]).sum())
            evaluated += count
        return evaluated, warps

    # -- rendering
    def _launch_rays(self, name: str, n: int, args: list, smem: int, width: int) -> None:
        if isinstance(self.rt, CupyRuntime):
            self.rt.launch(name, n, args, smem, width, block=RAY_BLOCK)
        else:  # other runtimes (the tests' host one) keep the documented launch signature
            self.rt.launch(name, n, args, smem, width)

    def render(self, field: TriplaneField, rays_o, rays_d, options=None):
        """Fused renderer (cuda/volume_render.cu, one thread per ray) for the deterministic modes (TripoSR
        always, OpenLRM without injected draws / generator); the reference renderer otherwise. Results come
        back like the rays (torch CUDA, CuPy, or CPU tensors for host rays)."""
        from ..render import RenderOutput

        opt = render_kernel_options(field, options)
        if opt is None:
            return super().render(field, rays_o, rays_d, options)
        if self.render_kernel == "auto":
            tensors = (rays_o, rays_d, field.planes, *field.weights, *field.biases)
            on_cuda = all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
            n_params = sum(t.numel() for t in (*field.weights, *field.biases))
            if reference_render_preferred(n_params, self.stage_weights, on_cuda):
                from ..render import render_field

                return render_field(field, rays_o, rays_d, options)
        rt, xp = self.rt, self.rt.xp
        with rt.stream():
            o, kind = rt.from_input(rays_o)
            d, _ = rt.from_input(rays_d)
            if o.shape != d.shape or o.ndim < 1 or o.shape[-1] != 3:
                raise ConfigError(f"rays_o and rays_d must both be (..., 3), got {o.shape} and {d.shape}")
            shape = tuple(o.shape[:-1])
            o, d = o.reshape(-1, 3), d.reshape(-1, 3)
            n = int(o.shape[0])
            dev = self._prepare(field)
            smem = dev.n_params if self.stage_weights is not False and 4 * dev.n_params <= RENDER_SMEM_BYTES else 0
            fargs = self._field_args(dev, field, field_flags(field.spec), smem)
            width = self._width(dev)
            rgb, weight = xp.empty((n, 3), dtype=xp.float32), xp.empty((n,), dtype=xp.float32)

            def out(a, s):
                return rt.to_output(a, kind).reshape(s)

            if field.spec.family == "triposr":
                self._launch_rays("lrm_render_triposr" + dev.suffix, n,
                                  [np.int64(n), o, d, np.int32(opt.n_samples), *fargs, rgb, weight], smem, width)
                return RenderOutput(rgb=out(rgb, (*shape, 3)), weight=out(weight, shape))
            depth = xp.empty((n,), dtype=xp.float32)
            zrange = xp.empty((n, 2), dtype=xp.float32)
            coarse = xp.empty((n, opt.n_coarse), dtype=xp.float32)
            fine = xp.empty((n, opt.n_fine), dtype=xp.float32)
            if n > 0:
                # rays that miss the box take (min, max) of the hitting rays' starts; (-1, -2) if none hits
                lohi = xp.empty((n, 2), dtype=xp.float32)
                rt.launch("lrm_render_openlrm_limits", n, [np.int64(n), o, d, lohi])
                lo, hi = lohi[:, 0].min(), lohi[:, 1].max()
                lim = xp.where(lo <= hi, xp.stack([lo, hi]), xp.asarray([-1.0, -2.0], dtype=xp.float32))
                lim = xp.ascontiguousarray(lim, dtype=xp.float32)
                u = rt.from_torch(importance_u(opt.n_fine))
                self._launch_rays("lrm_render_openlrm" + dev.suffix, n,
                                  [np.int64(n), o, d, lim, np.int32(opt.n_coarse), np.int32(opt.n_fine), u,
                                   np.float32(opt.out_of_box_sigma), np.int32(int(opt.version == "1.0")),
                                   np.float32(opt.bg_color), *fargs, rgb, weight, depth, zrange, coarse, fine],
                                  smem, width)
                # depths are clamped to the sample-depth range of the whole call (as the reference)
                zlim = xp.ascontiguousarray(xp.stack([zrange[:, 0].min(), zrange[:, 1].max()]), dtype=xp.float32)
                rt.launch("lrm_render_depth_clamp", n, [np.int64(n), zlim, depth])
            return RenderOutput(rgb=out(rgb, (*shape, 3)), weight=out(weight, shape), depth=out(depth, shape),
                                extras={"depths_coarse": rt.to_output(coarse, kind),
                                        "depths_fine": rt.to_output(fine, kind)})
