"""CUDA field backend.

Two parts:
* "emulated" tests (run everywhere): CudaFieldBackend drives the per-point kernels of triplane_field.cu -
  the exact code the GPU runs, minus shared memory and the half conversion instruction - compiled into the
  CPU library, through a host runtime. This checks the kernels' arithmetic, the fp16 plane path, the
  coarse-to-fine kernel sequence and the backend's argument marshalling without a GPU.
* ``gpu`` tests: the real thing through CuPy/NVRTC, skipped when CuPy or a device is missing.

Tolerances: fp32 <= 1e-4 (relative for TripoSR's exp densities). fp16 planes: <= 1e-4 against the reference
evaluated on the same half-rounded planes (conversion exact, accumulation fp32); against fp32 planes the
rounding of the planes themselves shows: measured <= 2e-3 relative density and 2.1e-4 rgb on the fixtures,
tested at 1e-2 and 1e-3.
"""
from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest
import torch

from lrm_rt.errors import BackendError, FieldError
from lrm_rt.field import torch_ref
from lrm_rt.field.cuda import CudaFieldBackend, kernel_source, level_in_space
from lrm_rt.field.native import CoarseToFine, NativeFieldBackend, available_host_memory
from lrm_rt.field.spec import OPENLRM_FIELD, TRIPOSR_FIELD, TriplaneField
from lrm_rt.kernels import native
from test_native_field import (
    ATOL,
    RTOL,
    assert_same_mesh,
    make_field,
    mesh_diff,
    random_case,
    surface_field,
)


def _cuda_device_count() -> int:
    try:
        import cupy
    except Exception:  # noqa: BLE001 - no CuPy (or a broken install): no GPU tests
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - CuPy without a driver raises CUDARuntimeError
        return 0


HAS_GPU = _cuda_device_count() > 0  # evaluated here, once: a bare function object would always be truthy
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs CuPy and a CUDA device")


class HostRuntime:
    """The CupyRuntime interface on the host: kernels from the CPU build, numpy arrays, ctypes calls."""

    xp = np
    MAX_WIDTH = 256  # LRM_FIELD_MAX_WIDTH of the CPU build

    def __init__(self) -> None:
        self.launches: list = []

    def from_torch(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().contiguous().numpy()

    def from_input(self, x):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return np.ascontiguousarray(x, dtype=np.float32), "host"

    def to_output(self, a: np.ndarray, kind: str) -> torch.Tensor:
        return torch.from_numpy(a)

    def grid_output_kind(self) -> str:
        return "host"

    def stream(self):
        return contextlib.nullcontext()

    def smem_limit_bytes(self) -> int:
        return 1 << 30  # staging is a no-op on the host; this exercises the argument path

    def free_bytes(self):
        return available_host_memory()

    def launch(self, name, n, args, smem_floats=0, max_width=128):
        assert max_width <= self.MAX_WIDTH
        self.launches.append(name)
        if n <= 0:
            return
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                conv.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int64):
                conv.append(ctypes.c_int64(int(a)))
            elif isinstance(a, np.int32):
                conv.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.float32):
                conv.append(ctypes.c_float(float(a)))
            else:
                raise TypeError(f"kernel argument of type {type(a).__name__} for {name}")
        fn = getattr(native(), name)
        fn.restype = None
        fn(*conv)


def emulated(**kw) -> CudaFieldBackend:
    return CudaFieldBackend(runtime=HostRuntime(), **kw)


def half_planes(field: TriplaneField) -> TriplaneField:
    return TriplaneField(field.planes.half().float(), field.weights, field.biases, field.spec)


@pytest.fixture(scope="module")
def triposr_field(triposr_io, triposr_weights):
    return make_field(triposr_io, triposr_weights, TRIPOSR_FIELD)


@pytest.fixture(scope="module")
def openlrm_field(openlrm_io, openlrm_weights):
    return make_field(openlrm_io, openlrm_weights, OPENLRM_FIELD)


# ------------------------------------------------------------------------------ emulated (host)


def test_kernel_source_is_self_contained():
    src = kernel_source()
    assert '#include "' not in src and "#pragma once" not in src
    for name in ("lrm_field_query_f32", "lrm_field_query_f16", "lrm_field_lattice_f32", "lrm_c2f_mask",
                 "lrm_c2f_dilate", "lrm_field_c2f_level_f16", "LRM_FOR_EACH"):
        assert name in src


def test_level_in_space_matches_activations():
    assert level_in_space(25.0, 0) == 25.0
    assert abs(np.exp(level_in_space(25.0, 1)) - 25.0) < 1e-9
    x = level_in_space(3.0, 2)
    assert abs(np.log1p(np.exp(x)) - 3.0) < 1e-9


@pytest.mark.parametrize("plane_dtype", ["float32", "float16"])
def test_emulated_query_matches_fixtures(plane_dtype, triposr_field, triposr_io, openlrm_field, openlrm_io):
    be = emulated(plane_dtype=plane_dtype)
    for field, io, dkey, ckey in ((triposr_field, triposr_io, "decoder_density_act", "decoder_color"),
                                  (openlrm_field, openlrm_io, "decoder_sigma_act", "decoder_rgb")):
        pts = io["query_points"]
        d, rgb = be.query(field, pts)
        if plane_dtype == "float32":
            torch.testing.assert_close(d, io[dkey][:, 0], atol=ATOL if field.spec.family == "openlrm" else 0,
                                       rtol=RTOL)
            torch.testing.assert_close(rgb, io[ckey], atol=ATOL, rtol=RTOL)
        else:
            ref_d, ref_rgb = torch_ref.query(half_planes(field), pts)
            torch.testing.assert_close(d, ref_d, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(d, io[dkey][:, 0], atol=1e-3, rtol=1e-2)
            torch.testing.assert_close(rgb, io[ckey], atol=1e-3, rtol=0)
        torch.testing.assert_close(be.query_density(field, pts), d, atol=0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(0, 12, 2))
def test_emulated_random_decoders_match_torch_reference(seed):
    field, pts = random_case(seed)
    be = emulated()
    ref_d, ref_rgb = torch_ref.query(field, pts)
    d, rgb = be.query(field, pts)
    torch.testing.assert_close(d, ref_d, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)
    raw_ref, _ = torch_ref.query(field, pts, raw_density=True)
    torch.testing.assert_close(be.query(field, pts, raw_density=True)[0], raw_ref, atol=ATOL, rtol=RTOL)


def test_emulated_non_finite_query_points_are_refused(triposr_field):
    pts = torch.zeros(4, 3)
    pts[2, 1] = float("-inf")
    with pytest.raises(FieldError, match="NaN/inf"):
        emulated().query(triposr_field, pts)


def test_device_copy_is_not_reused_for_a_new_field():
    """The device copy of a field is cached by id and address: a field freed after its request must not hand its
    id and memory to the next request's field while the cache still answers for them (it once answered a new
    image with the previous triplane). Fields live only during their request, as in Reconstructor.reconstruct."""
    import gc
    import weakref

    from lrm_rt.field.native import NativeFieldBackend

    g = torch.Generator().manual_seed(0)
    c, h = 8, 16
    ws = [torch.randn(16, 3 * c, generator=g), torch.randn(4, 16, generator=g)]
    bs = [torch.randn(16, generator=g), torch.randn(4, generator=g)]
    pts = torch.rand(200, 3, generator=g) * 1.6 - 0.8
    backend, native = emulated(), NativeFieldBackend(threads=1)
    for seed in range(40):
        planes = torch.randn(3, c, h, h, generator=torch.Generator().manual_seed(seed))
        field = TriplaneField(planes, ws, bs, TRIPOSR_FIELD)
        torch.testing.assert_close(backend.query(field, pts)[0], native.query(field, pts)[0], rtol=1e-4, atol=1e-5)
        alive = weakref.ref(field)
        del field, planes
        gc.collect()
        assert alive() is not None  # held by the cache, so no new object can take its id or address


def test_emulated_half_conversion_covers_subnormals_and_signs(triposr_field, triposr_io):
    planes = triposr_field.planes.clone()
    planes[0, :, :4, :4] = 3.0e-6  # subnormal in half precision
    planes[1, :, :4, :4] = -2.5e-7
    planes[2, 0] = 0.0
    planes[2, 1, :2, :2] = -0.0
    field = TriplaneField(planes, triposr_field.weights, triposr_field.biases, triposr_field.spec)
    pts = triposr_io["query_points"]
    ref_d, ref_rgb = torch_ref.query(half_planes(field), pts)
    d, rgb = emulated(plane_dtype="float16").query(field, pts)
    torch.testing.assert_close(d, ref_d, atol=0, rtol=RTOL)
    torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)


def test_emulated_dense_grid_matches_fixture(triposr_field, triposr_io):
    be = emulated()
    grid = be.density_grid(triposr_field, 32)
    torch.testing.assert_close(grid, triposr_io["density_grid"], atol=0, rtol=RTOL)
    staged = emulated(stage_weights=False).density_grid(triposr_field, 32)
    assert torch.equal(staged, grid)


@pytest.mark.parametrize("name,resolution,stride", [("triposr_tiny", 97, 8), ("full_size", 49, 4)])
def test_emulated_coarse_to_fine_matches_dense(request, name, resolution, stride):
    field = request.getfixturevalue("triposr_field") if name == "triposr_tiny" else surface_field()
    be = emulated(c2f=CoarseToFine(coarse_stride=stride))
    c2f = be.density_grid(field, resolution, level=25.0, mode="coarse_to_fine")
    kernels = be.rt.launches
    # one refinement per level (compacted by default: one slab each at these sizes)
    assert kernels.count("lrm_c2f_level_split") == int(np.log2(stride)) and "lrm_c2f_dilate" in kernels
    dense = NativeFieldBackend().density_grid(field, resolution, mode="dense")
    diff = mesh_diff(dense, c2f, 25.0)
    assert_same_mesh(diff)
    assert diff["flips"] == 0, diff
    # the same nodes are decoded as in the native backend, and both equal the dense values to fp32 rounding
    native_c2f = NativeFieldBackend(c2f=CoarseToFine(coarse_stride=stride)).density_grid(
        field, resolution, level=25.0, mode="coarse_to_fine")
    torch.testing.assert_close(c2f, native_c2f, atol=0, rtol=1e-4)


@pytest.mark.parametrize("plane_dtype", ["float32", "float16"])
def test_compacted_refinement_equals_in_place(plane_dtype, monkeypatch):
    """Listing the nodes to decode first (compact=True) writes exactly the grid of the in-place kernel,
    also when a level spans several slabs; the stats count the decoded nodes and the warps they touch."""
    import lrm_rt.field.cuda as cuda_mod

    field = surface_field()
    c2f = CoarseToFine(coarse_stride=4)
    in_place = emulated(c2f=c2f, plane_dtype=plane_dtype, compact=False)
    ref = in_place.density_grid(field, 49, level=25.0, mode="coarse_to_fine")
    assert "lrm_field_c2f_level" + ("_f16" if plane_dtype == "float16" else "_f32") in in_place.rt.launches
    monkeypatch.setattr(cuda_mod, "COMPACT_CHUNK", 32 * 97)  # several slabs per level, the last one partial
    be = emulated(c2f=c2f, plane_dtype=plane_dtype, compact=True)
    grid = be.density_grid(field, 49, level=25.0, mode="coarse_to_fine")
    assert torch.equal(grid, ref)
    assert be.rt.launches.count("lrm_c2f_level_split") > 2
    st = be.last_grid_stats
    native = NativeFieldBackend(c2f=c2f)
    native.density_grid(field, 49, level=25.0, mode="coarse_to_fine")
    assert st["evaluated"] == native.last_grid_stats["evaluated"]
    assert st["refined"] / 32 <= st["warps_touched"] <= st["refined"]


def test_emulated_errors(triposr_field):
    planes = triposr_field.planes.clone()
    planes[0, 0, 0, 0] = float("nan")
    bad = TriplaneField(planes, triposr_field.weights, triposr_field.biases, triposr_field.spec)
    with pytest.raises(FieldError):
        emulated().density_grid(bad, 16)
    with pytest.raises(Exception, match="plane_dtype"):
        emulated(plane_dtype="bfloat16")


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_missing_cupy_or_device_is_a_backend_error():
    with pytest.raises(BackendError):
        CudaFieldBackend()


def test_launch_block_sizes():
    """Staged kernels (weights over 48 KB of shared memory) run in blocks as large as the compiled kernel
    allows, capped by staged_block and rounded down to whole warps; others in the default block."""
    from lrm_rt.field.cuda import CupyRuntime

    class Kernel:  # also stands in for the compiled module: get_function returns the kernel itself
        max_dynamic_shared_size_bytes = 0

        def __init__(self, max_threads):
            self.max_threads_per_block, self.calls = max_threads, []

        def get_function(self, name):
            return self

        def __call__(self, grid, block, args, shared_mem=0):
            self.calls.append((grid[0], block[0], shared_mem))

    rt = object.__new__(CupyRuntime)  # no CuPy here: only the launch arithmetic is under test
    rt.block, rt.staged_block, rt._sm_count, rt.device = 256, 1024, 132, contextlib.nullcontext()
    for max_threads, smem_floats, want in ((1024, 41000, 1024), (1024, 0, 256), (650, 41000, 640),
                                           (1024, 12000, 256)):
        k = Kernel(max_threads)
        rt._module = lambda width, k=k: k
        rt.launch("lrm_field_lattice_f32", 10 ** 6, [], smem_floats)
        assert k.calls == [(min(-(-10 ** 6 // want), 132 * 32), want, 4 * smem_floats)], (max_threads, smem_floats)
    rt.staged_block = 512
    k = Kernel(1024)
    rt._module = lambda width: k
    rt.launch("lrm_field_lattice_f32", 100, [], 41000)
    assert k.calls[0][1] == 512 and k.max_dynamic_shared_size_bytes == 4 * 41000


# ----------------------------------------------------------------------------------- real GPU


@pytest.fixture(scope="module")
def gpu_backend():
    return CudaFieldBackend()


def on_gpu(t: torch.Tensor):
    """A device copy of t: a torch CUDA tensor when torch has CUDA, else a CuPy array."""
    if torch.cuda.is_available():
        return t.cuda()
    import cupy

    return cupy.asarray(t.numpy())


def to_cpu(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    import cupy

    return torch.from_numpy(cupy.asnumpy(x))


@pytest.mark.gpu
@needs_gpu
def test_gpu_query_matches_native(gpu_backend, triposr_field, openlrm_field, triposr_io, openlrm_io):
    cpu = NativeFieldBackend()
    for field, io in ((triposr_field, triposr_io), (openlrm_field, openlrm_io), (surface_field(), triposr_io)):
        pts = io["query_points"]
        d, rgb = gpu_backend.query(field, on_gpu(pts))
        ref_d, ref_rgb = cpu.query(field, pts)
        torch.testing.assert_close(to_cpu(d), ref_d, atol=ATOL if field.spec.family == "openlrm" else 0, rtol=RTOL)
        torch.testing.assert_close(to_cpu(rgb), ref_rgb, atol=ATOL, rtol=RTOL)
    for seed in range(6):
        field, pts = random_case(seed)
        d, rgb = gpu_backend.query(field, pts)  # host input -> host output
        ref_d, ref_rgb = torch_ref.query(field, pts)
        torch.testing.assert_close(d, ref_d, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
@needs_gpu
def test_gpu_inputs_are_not_copied(gpu_backend, triposr_field, triposr_io):
    import cupy

    if torch.cuda.is_available():
        pts = triposr_io["query_points"].cuda()
        arr, kind = gpu_backend.rt.from_input(pts)
        assert kind == "torch_cuda" and arr.data.ptr == pts.data_ptr()
        d = gpu_backend.query_density(triposr_field, pts)
        assert isinstance(d, torch.Tensor) and d.is_cuda
    carr = cupy.asarray(triposr_io["query_points"].numpy())
    same, kind = gpu_backend.rt.from_input(carr)
    assert kind == "cupy" and same.data.ptr == carr.data.ptr
    d = gpu_backend.query_density(triposr_field, carr)
    assert isinstance(d, cupy.ndarray)
    torch.testing.assert_close(to_cpu(d), triposr_io["decoder_density_act"][:, 0],
                               atol=0, rtol=RTOL)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp16_planes(triposr_field, openlrm_field, triposr_io, openlrm_io):
    be = CudaFieldBackend(plane_dtype="float16")
    for field, io, dkey in ((triposr_field, triposr_io, "decoder_density_act"),
                            (openlrm_field, openlrm_io, "decoder_sigma_act")):
        pts = io["query_points"]
        d, rgb = be.query(field, pts)
        ref_d, ref_rgb = torch_ref.query(half_planes(field), pts)
        torch.testing.assert_close(d, ref_d, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(d, io[dkey][:, 0], atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_shared_memory_staging_is_transparent(triposr_field, triposr_io):
    pts = triposr_io["query_points"]
    field = surface_field()  # 165 KB of fp32 weights: staged only where the opt-in limit allows it
    a = CudaFieldBackend(stage_weights=False).query(field, pts)[0]
    b = CudaFieldBackend(stage_weights=True).query(field, pts)[0]
    assert torch.equal(a, b)
    c = CudaFieldBackend(stage_weights=True).query(triposr_field, pts)[0]  # small decoder: always staged
    torch.testing.assert_close(c, triposr_io["decoder_density_act"][:, 0], atol=0, rtol=RTOL)


@pytest.mark.gpu
@needs_gpu
def test_gpu_density_grids(gpu_backend, triposr_field, triposr_io):
    grid = gpu_backend.density_grid(triposr_field, 32)
    torch.testing.assert_close(to_cpu(grid), triposr_io["density_grid"], atol=0, rtol=RTOL)
    field = surface_field()
    dense = NativeFieldBackend().density_grid(field, 128, mode="dense")
    gd = to_cpu(gpu_backend.density_grid(field, 128, mode="dense"))
    torch.testing.assert_close(gd, dense, atol=0, rtol=RTOL)
    gc = to_cpu(gpu_backend.density_grid(field, 128, level=25.0, mode="coarse_to_fine"))
    diff = mesh_diff(dense, gc, 25.0)
    assert_same_mesh(diff)
    assert diff["flips"] == 0, diff
