"""Native CPU field backend (cuda/triplane_field.cu built as C++): fixture parity, random decoder shapes
against the PyTorch reference, coarse-to-fine grids against dense ones (same marching-cubes mesh), errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lrm_rt.errors import ConfigError, FieldError, ResourceError
from lrm_rt.field import torch_ref
from lrm_rt.field.native import CoarseToFine, NativeFieldBackend, auto_coarse_stride
from lrm_rt.field.spec import OPENLRM_FIELD, TRIPOSR_FIELD, FieldSpec, TriplaneField

from conftest import make_field

ATOL = RTOL = 1e-4


def surface_field(seed: int = 0, spec: FieldSpec = TRIPOSR_FIELD, level: float = 25.0, channels: int = 40,
                  res: int = 64, hidden: int = 64, n_hidden: int = 9, base: int = 4, gain: float = 1.0,
                  noise: float = 0.05, inside: float = 0.1) -> TriplaneField:
    """A TripoSR-size field with an object-like surface: smooth random planes (base x base detail upsampled,
    plus texel noise), a random 120 -> 64 x 9 -> 4 decoder, whose density row is rescaled so the raw density
    has std 1.5 on a 32^3 grid and ``inside`` of it lies above ``level`` (as the fixtures were tuned)."""
    g = torch.Generator().manual_seed(seed)
    planes = F.interpolate(torch.randn(3, channels, base, base, generator=g), size=(res, res), mode="bicubic",
                           align_corners=False)
    planes = planes + noise * torch.randn(3, channels, res, res, generator=g)
    dims = [3 * channels] + [hidden] * n_hidden + [4]
    ws = [torch.randn(o, i, generator=g) * (gain / math.sqrt(i)) for i, o in zip(dims[:-1], dims[1:])]
    bs = [0.1 * torch.randn(o, generator=g) for o in dims[1:]]
    field = TriplaneField(planes.contiguous(), ws, bs, spec)
    raw = torch_ref.query_raw(field, torch_ref.grid_points(32, spec))[:, 0]
    raw_level = (math.log(level) if spec.density_activation == "exp" else math.log(math.expm1(level))) - spec.density_bias
    scale = 1.5 / raw.std()
    q = torch.quantile((raw - raw.mean()) * scale, 1 - inside)
    ws[-1][0] *= scale
    bs[-1][0] = (bs[-1][0] - raw.mean()) * scale + (raw_level - q)
    return field


@pytest.fixture(scope="module")
def backend() -> NativeFieldBackend:
    return NativeFieldBackend()




# ----------------------------------------------------------------------------------- fixture parity


def test_triposr_query_matches_fixture(backend, triposr_field, triposr_io):
    density, rgb = backend.query(triposr_field, triposr_io["query_points"])
    # exp densities reach 1e4: relative tolerance (fixtures README §8)
    torch.testing.assert_close(density, triposr_io["decoder_density_act"][:, 0], atol=0, rtol=RTOL)
    torch.testing.assert_close(rgb, triposr_io["decoder_color"], atol=ATOL, rtol=RTOL)
    raw, _ = backend.query(triposr_field, triposr_io["query_points"], raw_density=True)
    torch.testing.assert_close(raw, triposr_io["decoder_density_raw"][:, 0], atol=ATOL, rtol=RTOL)
    # density-only decoding (no colour rows) gives the same densities
    only = backend.query_density(triposr_field, triposr_io["query_points"])
    torch.testing.assert_close(only, density, atol=0, rtol=1e-5)


def test_openlrm_query_matches_fixture(backend, openlrm_case):
    io, field = openlrm_case
    density, rgb = backend.query(field, io["query_points"])
    torch.testing.assert_close(density, io["decoder_sigma_act"][:, 0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rgb, io["decoder_rgb"], atol=ATOL, rtol=RTOL)
    raw, _ = backend.query(field, io["query_points"], raw_density=True)
    torch.testing.assert_close(raw, io["decoder_sigma_raw"][:, 0], atol=ATOL, rtol=RTOL)


def test_triposr_density_grid_matches_fixture(backend, triposr_field, triposr_io):
    grid = backend.density_grid(triposr_field, 32)
    torch.testing.assert_close(grid, triposr_io["density_grid"], atol=0, rtol=RTOL)
    # grid nodes are the fixture's mc_grid_points (flat index i*1024 + j*32 + k)
    pts = triposr_io["mc_grid_points"]
    torch.testing.assert_close(backend.query_density(triposr_field, pts).reshape(32, 32, 32), grid,
                               atol=0, rtol=1e-5)


def test_openlrm_density_grid_matches_fixture(backend, openlrm_case):
    io, field = openlrm_case
    grid = backend.density_grid(field, 32)
    torch.testing.assert_close(grid, io["density_grid"], atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ random shapes vs torch reference


def random_case(seed: int):
    """Random family conventions, channels, plane sizes (non-square, 1-texel), depth and widths (not multiples
    of the SIMD width), and points inside, outside and exactly on the box / texel borders."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    spec = FieldSpec(
        family="triposr" if seed % 2 else "openlrm",
        radius=[0.87, 1.0, 0.5][seed % 3],
        third_plane="yz" if rnd(0, 1) else "zy",
        hidden_activation="silu" if rnd(0, 1) else "relu",
        density_activation="exp" if rnd(0, 1) else "softplus",
        color_activation="sigmoid" if rnd(0, 1) else "sigmoid_clamp",
    )
    C, H, W = rnd(1, 12), rnd(1, 20), rnd(1, 20)
    depth = rnd(1, 5)
    dims = [3 * C] + [rnd(1, 40) for _ in range(depth - 1)] + [4]
    planes = torch.randn(3, C, H, W, generator=g)
    ws = [torch.randn(o, i, generator=g) / math.sqrt(i) for i, o in zip(dims[:-1], dims[1:])]
    bs = [0.2 * torch.randn(o, generator=g) for o in dims[1:]]
    field = TriplaneField(planes, ws, bs, spec)
    r = spec.radius
    pts = [(torch.rand(997, 3, generator=g) * 2 - 1) * r * 1.3]  # ~40 % outside the box
    edges = torch.tensor([-1.0, 1.0, 0.0, -1.0 + 1.0 / W, 1.0 - 1.0 / H, -1.0 - 1.0 / W, 1.0 + 1.0 / H]) * r
    pts.append(edges[torch.randint(0, len(edges), (211, 3), generator=g)])  # borders, texel centres, half texels
    pts.append(torch.tensor([[r, r, r], [-r, -r, -r], [10 * r, 0, 0], [0, -5 * r, 0]]))
    return field, torch.cat(pts).contiguous()


@pytest.mark.parametrize("seed", range(12))
def test_random_decoders_match_torch_reference(backend, seed):
    field, pts = random_case(seed)
    ref_d, ref_rgb = torch_ref.query(field, pts)
    d, rgb = backend.query(field, pts)
    torch.testing.assert_close(d, ref_d, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)
    raw_ref, _ = torch_ref.query(field, pts, raw_density=True)
    torch.testing.assert_close(backend.query(field, pts, raw_density=True)[0], raw_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(backend.query_density(field, pts), ref_d, atol=ATOL, rtol=RTOL)
    # every tile remainder (n not a multiple of the 16-point tile)
    for n in (0, 1, 15, 17):
        dn, rgbn = backend.query(field, pts[:n])
        assert dn.shape == (n,) and rgbn.shape == (n, 3)
        torch.testing.assert_close(dn, ref_d[:n], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("seed,resolution", [(0, 19), (3, 2), (4, 33)])
def test_random_dense_grid_matches_torch_reference(backend, seed, resolution):
    field, _ = random_case(seed)
    grid = backend.density_grid(field, resolution, mode="dense")
    torch.testing.assert_close(grid, torch_ref.density_grid(field, resolution), atol=ATOL, rtol=RTOL)


def test_full_size_decoder_matches_torch_reference(backend):
    field = surface_field()
    pts = (torch.rand(3000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.9
    ref_d, ref_rgb = torch_ref.query(field, pts)
    d, rgb = backend.query(field, pts)
    torch.testing.assert_close(d, ref_d, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rgb, ref_rgb, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------- inputs, threads


def test_numpy_and_strided_inputs(backend, triposr_field, triposr_io):
    pts = triposr_io["query_points"]
    expected, _ = backend.query(triposr_field, pts)
    d_np, _ = backend.query(triposr_field, pts.numpy())
    torch.testing.assert_close(d_np, expected, atol=0, rtol=0)
    strided = torch.cat([pts, pts], dim=1)[:, :3]  # non-contiguous view
    torch.testing.assert_close(backend.query(triposr_field, strided)[0], expected, atol=0, rtol=0)
    torch.testing.assert_close(backend.query(triposr_field, pts.double())[0], expected, atol=0, rtol=0)


def test_thread_count_does_not_change_results(triposr_field, triposr_io):
    one = NativeFieldBackend(threads=1)
    two = NativeFieldBackend(threads=2)
    pts = triposr_io["query_points"]
    assert torch.equal(one.query(triposr_field, pts)[0], two.query(triposr_field, pts)[0])
    assert torch.equal(one.density_grid(triposr_field, 24), two.density_grid(triposr_field, 24))
    assert torch.equal(one.density_grid(triposr_field, 65, level=25.0),
                       two.density_grid(triposr_field, 65, level=25.0))


# -------------------------------------------------------------------------------- coarse-to-fine


def mesh_diff(dense: torch.Tensor, c2f: torch.Tensor, level: float) -> dict:
    """PyMCubes on both grids: vertex/face counts, symmetric mean/max nearest-vertex distance (voxels),
    and how many grid values are on the other side of the level."""
    import mcubes
    from scipy.spatial import cKDTree

    vd, fd = mcubes.marching_cubes(dense.numpy().astype(np.float64), level)
    vc, fc = mcubes.marching_cubes(c2f.numpy().astype(np.float64), level)
    assert len(vd) > 1000, "the test field must have a surface"
    d1, d2 = cKDTree(vc).query(vd)[0], cKDTree(vd).query(vc)[0]
    return {"V": (len(vd), len(vc)), "F": (len(fd), len(fc)), "chamfer": 0.5 * (d1.mean() + d2.mean()),
            "max": max(d1.max(), d2.max()), "flips": int(((dense > level) != (c2f > level)).sum())}


def assert_same_mesh(diff: dict) -> None:
    (vd, vc), (fd, fc) = diff["V"], diff["F"]
    assert abs(vd - vc) <= 0.005 * vd and abs(fd - fc) <= 0.005 * fd, diff
    assert diff["chamfer"] <= 0.1, diff


@pytest.fixture(scope="module")
def full_size_field() -> TriplaneField:
    return surface_field()


def c2f_case(request, name):
    if name == "triposr_tiny":
        return request.getfixturevalue("triposr_field"), 25.0
    if name == "openlrm_tiny":
        return make_field(request.getfixturevalue("openlrm_io"), request.getfixturevalue("openlrm_weights"),
                          OPENLRM_FIELD), 3.0
    if name == "full_size":
        return request.getfixturevalue("full_size_field"), 25.0
    return surface_field(seed=2, spec=OPENLRM_FIELD, level=3.0), 3.0  # full-size shape, OpenLRM conventions


C2F_CASES = ["triposr_tiny", "openlrm_tiny", "full_size", "full_size_openlrm"]


@pytest.mark.parametrize("name", C2F_CASES)
def test_coarse_to_fine_matches_dense_128(backend, request, name):
    field, level = c2f_case(request, name)
    dense = backend.density_grid(field, 128, mode="dense")
    c2f = backend.density_grid(field, 128, level=level, mode="coarse_to_fine")
    stats = backend.last_grid_stats
    assert stats["mode"] == "coarse_to_fine" and stats["evaluated"] < 128 ** 3
    diff = mesh_diff(dense, c2f, level)
    assert_same_mesh(diff)
    assert diff["flips"] == 0, diff


@pytest.mark.slow
@pytest.mark.parametrize("name", C2F_CASES)
def test_coarse_to_fine_matches_dense_256(backend, request, name):
    field, level = c2f_case(request, name)
    dense = backend.density_grid(field, 256, mode="dense")
    c2f = backend.density_grid(field, 256, level=level, mode="coarse_to_fine")
    frac = backend.last_grid_stats["fraction"]
    diff = mesh_diff(dense, c2f, level)
    assert_same_mesh(diff)
    assert diff["flips"] == 0, diff
    if name == "full_size":
        assert frac < 0.25, backend.last_grid_stats  # the point of coarse-to-fine: ~14 % decoded here


@pytest.mark.parametrize("resolution,stride", [(101, 8), (67, 16), (40, 4)])
def test_coarse_to_fine_irregular_last_cell(resolution, stride, full_size_field):
    """(R - 1) not a multiple of the stride: the box edge is an extra lattice node with a short last cell."""
    backend = NativeFieldBackend(c2f=CoarseToFine(coarse_stride=stride))
    dense = backend.density_grid(full_size_field, resolution, mode="dense")
    c2f = backend.density_grid(full_size_field, resolution, level=25.0, mode="coarse_to_fine")
    assert backend.last_grid_stats["coarse_stride"] == stride
    assert not torch.equal(dense, c2f)  # some far cells were filled, not decoded
    diff = mesh_diff(dense, c2f, 25.0)
    assert_same_mesh(diff)
    assert diff["flips"] == 0, diff
    # every node of a cell the surface crosses is decoded exactly (bitwise the dense value)
    crossing = _crossing_nodes(dense, 25.0)
    assert crossing.any() and torch.equal(c2f[crossing], dense[crossing])


def _crossing_nodes(grid: torch.Tensor, level: float) -> torch.Tensor:
    """Mask of the 8 corners of every unit cell whose corner values straddle the level."""
    above = (grid > level).float()[None, None]
    mx = F.max_pool3d(above, 2, stride=1)
    mn = -F.max_pool3d(-above, 2, stride=1)
    cells = (mx != mn).float()  # (R-1)^3
    corners = F.max_pool3d(F.pad(cells, (1, 1, 1, 1, 1, 1)), 2, stride=1)
    return corners[0, 0] > 0


def test_auto_mode_and_defaults(full_size_field):
    backend = NativeFieldBackend()
    backend.density_grid(full_size_field, 32, level=25.0)
    assert backend.last_grid_stats["mode"] == "dense"  # small grids stay exact
    backend.density_grid(full_size_field, 64, level=25.0)
    assert backend.last_grid_stats["mode"] == "coarse_to_fine"
    backend.density_grid(full_size_field, 64)
    assert backend.last_grid_stats["mode"] == "dense"  # no level: no refinement possible
    assert auto_coarse_stride(256) == 4 and auto_coarse_stride(128) == 2 and auto_coarse_stride(64) == 1
    assert auto_coarse_stride(512) == 8


# --------------------------------------------------------------------------------------- errors


def test_non_finite_triplane_raises_field_error(backend, triposr_field):
    planes = triposr_field.planes.clone()
    planes[1, 3, 4, 5] = float("nan")
    planes[2, 0, 0, 0] = float("inf")
    bad = TriplaneField(planes, triposr_field.weights, triposr_field.biases, triposr_field.spec)
    with pytest.raises(FieldError, match="2 NaN/inf"):
        backend.density_grid(bad, 16)
    with pytest.raises(FieldError):
        backend.density_grid(bad, 64, level=25.0, mode="coarse_to_fine")


def test_oversized_grid_raises_resource_error(backend, triposr_field):
    r = 100_000  # 4e15 bytes: refused before anything is allocated
    with pytest.raises(ResourceError, match=str(r ** 3 * 4)):
        backend.density_grid(triposr_field, r, mode="dense")


def test_bad_options(backend, triposr_field):
    with pytest.raises(ConfigError):
        backend.density_grid(triposr_field, 64, mode="coarse_to_fine")  # no level
    with pytest.raises(ConfigError):
        backend.density_grid(triposr_field, 64, level=25.0, mode="sparse")
    with pytest.raises(ConfigError):
        NativeFieldBackend(c2f=CoarseToFine(coarse_stride=3)).density_grid(triposr_field, 64, level=25.0)
    with pytest.raises(ConfigError):
        NativeFieldBackend(threads=0)
    wrong = TriplaneField(triposr_field.planes[:, :4].contiguous(), triposr_field.weights, triposr_field.biases,
                          triposr_field.spec)
    with pytest.raises(ConfigError, match="needs 12 -> 4"):
        backend.query(wrong, torch.zeros(4, 3))


def test_unwritable_kernel_cache_is_a_named_error_and_auto_falls_back(tmp_path, monkeypatch, caplog):
    """A checkout whose in-tree build is stale rebuilds into the cache; a cache that cannot be created (read-only
    home, a file in the way) names the cache and LRM_RT_CACHE, and the "auto" field backend uses torch instead
    (it once failed every default run with a bare FileNotFoundError)."""
    import lrm_rt.field.native as N
    from lrm_rt import kernels
    from lrm_rt.errors import BackendError
    from lrm_rt.field.torch_ref import TorchFieldBackend
    from lrm_rt.pipeline import field_backend

    (tmp_path / "afile").write_text("x")
    monkeypatch.delenv("LRM_RT_NATIVE_LIB", raising=False)  # set when test_kernel_targets runs this file
    monkeypatch.setenv("LRM_RT_CACHE", str(tmp_path / "afile" / "cache"))
    monkeypatch.setattr(kernels, "_built_library", lambda: None)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(N, "_lib_cache", None)
    with pytest.raises(BackendError, match=r"cannot build the native kernels into the cache .*afile.*LRM_RT_CACHE"):
        kernels.native_library_path()
    assert not kernels.native_available()
    assert "cannot build the native kernels" in kernels.native_unavailable_reason()
    with caplog.at_level("WARNING", logger="lrm_rt.pipeline"):
        assert isinstance(field_backend("auto"), TorchFieldBackend)
    assert "native CPU kernels are unavailable (cannot build" in caplog.text  # the fallback is said, not silent
    with pytest.raises(BackendError, match="native field backend unavailable: cannot build"):
        field_backend("native")


def test_non_finite_query_points_are_refused(backend, triposr_field):
    """The kernels clamp points into the box, so a NaN or inf point would decode as a finite density (the torch
    reference gives NaN): a FieldError names them instead."""
    pts = torch.zeros(5, 3)
    pts[1, 0] = float("nan")
    pts[3, 2] = float("inf")
    with pytest.raises(FieldError, match="query points hold 2 NaN/inf coordinates"):
        backend.query(triposr_field, pts)
    with pytest.raises(FieldError, match="NaN/inf"):
        backend.query_density(triposr_field, pts)
