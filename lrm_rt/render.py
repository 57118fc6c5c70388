"""Cameras and volume rendering for both families (PyTorch reference).

The renderers only sample rays and composite; the field is evaluated through a ``query``
callable with the ``FieldBackend.query`` signature, so fast backends plug in unchanged.

TripoSR: ``spherical_cameras`` -> ``render_triposr`` (128 fixed midpoint samples, Δ = 1/N in
normalised ray parameter, white background).
OpenLRM: 25-number cameras (``surrounding_cameras``) -> ``openlrm_rays`` -> ``render_openlrm``
(stratified coarse + importance fine samples, MipRayMarcher2 compositing). By default it is
deterministic (no jitter, u = linspace); the reference's random draws can be injected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Callable, Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .field import torch_ref
from .field.spec import TriplaneField

# query(field, points (N,3), raw_density) -> (density (N,), rgb (N,3)); see FieldBackend.query
QueryFn = Callable[[TriplaneField, torch.Tensor, bool], Tuple[torch.Tensor, torch.Tensor]]


def _default_query(field: TriplaneField, points: torch.Tensor, raw_density: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch_ref.query(field, points, raw_density=raw_density)


@dataclass
class RenderOutput:
    """Rendered values with the rays' leading shape: rgb (..., 3), weight = opacity Σw (...), depth (...) or None.

    extras holds per-ray intermediates (OpenLRM: ``depths_coarse``/``depths_fine`` (n_rays, n)).
    """

    rgb: torch.Tensor
    weight: torch.Tensor
    depth: Optional[torch.Tensor] = None
    extras: Dict[str, torch.Tensor] = dc_field(default_factory=dict)


# --------------------------------------------------------------------------------------------- TripoSR


@dataclass
class TripoSRRenderOptions:
    n_samples: int = 128
    chunk_rays: int = 8192  # rays per field query (n_samples points each)


def spherical_cameras(
    n_views: int, elevation_deg: float, distance: float, fovy_deg: float, height: int, width: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TripoSR orbit cameras: rays_o, rays_d of shape (V, H, W, 3), row 0 = top.

    z-up world, azimuth linspace(0, 360) without the endpoint, c2w columns (right, up, -lookat)
    (OpenGL), pixel centres, f = 0.5 H / tan(fovy / 2).
    """
    azimuth = torch.linspace(0.0, 360.0, n_views + 1)[:n_views] * math.pi / 180
    elevation = torch.full_like(azimuth, elevation_deg) * math.pi / 180
    dist = torch.full_like(azimuth, distance)
    pos = torch.stack(
        [dist * torch.cos(elevation) * torch.cos(azimuth), dist * torch.cos(elevation) * torch.sin(azimuth), dist * torch.sin(elevation)],
        dim=-1,
    )
    world_up = torch.tensor([0.0, 0.0, 1.0]).expand(n_views, 3)
    lookat = F.normalize(-pos, dim=-1)
    right = F.normalize(torch.linalg.cross(lookat, world_up), dim=-1)
    up = F.normalize(torch.linalg.cross(right, lookat), dim=-1)
    rot = torch.stack([right, up, -lookat], dim=-1)  # (V, 3, 3), columns = camera axes in world

    fovy = torch.full_like(azimuth, fovy_deg) * math.pi / 180
    focal = 0.5 * height / torch.tan(0.5 * fovy)  # (V,)
    cols = torch.arange(width, dtype=torch.float32) + 0.5
    rows = torch.arange(height, dtype=torch.float32) + 0.5
    jj, ii = torch.meshgrid(rows, cols, indexing="ij")  # (H, W): row, column
    f = focal[:, None, None]
    x, y = (ii - width / 2) / f, -(jj - height / 2) / f  # (V, H, W)
    dirs_cam = torch.stack([x, y, torch.full_like(x, -1.0)], dim=-1)
    rays_d = F.normalize((dirs_cam[..., None, :] * rot[:, None, None]).sum(-1), dim=-1)
    rays_o = pos[:, None, None, :].expand_as(rays_d)
    return rays_o, rays_d


def triposr_ray_box(
    rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float, near: float = 0.0, valid_thresh: float = 0.01
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray / cube [-r', r']^3 intersection, r' = r (1 - 1e-3): (t_near, t_far, valid) of the rays' leading shape.

    t_near is clamped to >= near; rays with t_far - t_near <= valid_thresh are invalid and get 0 / 0.
    """
    # tiny direction components are replaced by +1e-6 (not 0) so the slabs stay finite
    d = torch.where(rays_d.abs() < 1e-6, torch.full_like(rays_d, 1e-6), rays_d)
    r = torch.tensor(radius, dtype=rays_o.dtype, device=rays_o.device) * (1.0 - 1.0e-3)
    t0 = (r - rays_o) / d
    t1 = (-r - rays_o) / d
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    valid = t_far - t_near > valid_thresh
    zero = torch.zeros_like(t_near)
    return torch.where(valid, t_near, zero), torch.where(valid, t_far, zero), valid


def render_triposr(
    field: TriplaneField,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    query: Optional[QueryFn] = None,
    options: Optional[TripoSRRenderOptions] = None,
) -> RenderOutput:
    """TripoSR's NeRF renderer: midpoint samples between box entry/exit, α = 1 - exp(-σ/N), white background."""
    query = query or _default_query
    opt = options or TripoSRRenderOptions()
    shape = rays_o.shape[:-1]
    o, d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    t_near, t_far, valid = triposr_ray_box(o, d, field.spec.radius)

    t_vals = torch.linspace(0.0, 1.0, opt.n_samples + 1, device=o.device)
    t_mid = (t_vals[:-1] + t_vals[1:]) / 2.0
    deltas = t_vals[1:] - t_vals[:-1]  # the reference's quirk: normalised-t spacing, not world length

    rgb = torch.zeros_like(o)
    opacity = torch.zeros_like(t_near)
    idx = valid.nonzero().squeeze(-1)
    for s in range(0, idx.numel(), opt.chunk_rays):
        sel = idx[s : s + opt.chunk_rays]
        z = t_near[sel, None] * (1 - t_mid) + t_far[sel, None] * t_mid  # (R, S)
        pts = o[sel, None, :] + z[..., None] * d[sel, None, :]
        density, color = query(field, pts.reshape(-1, 3), False)
        density, color = density.reshape(z.shape), color.reshape(*z.shape, 3)
        alpha = 1 - torch.exp(-deltas * density)
        trans = torch.cat([torch.ones_like(alpha[:, :1]), torch.cumprod(1 - alpha[:, :-1] + 1e-10, dim=-1)], dim=-1)
        w = alpha * trans
        rgb[sel] = (w[..., None] * color).sum(dim=-2)
        opacity[sel] = w.sum(dim=-1)
    rgb = rgb + (1 - opacity[:, None])  # invalid rays: opacity 0 -> white
    return RenderOutput(rgb=rgb.reshape(*shape, 3), weight=opacity.reshape(shape))


# --------------------------------------------------------------------------------------------- OpenLRM

FLT_MAX = torch.finfo(torch.float32).max


@dataclass
class OpenLRMRenderOptions:
    """OpenLRM ImportanceRenderer settings.

    n_coarse / n_fine: samples per ray of each pass (config samples_per_ray // 2 each).
    version: "1.1" (out-of-box σ = -FLT_MAX/8, rgb += bg·(1-Σw)) or "1.0" (-FLT_MAX/3, white_back).
    stratified_u (n_rays, n_coarse) / importance_u (n_rays, n_fine): U[0,1) draws to inject; when None
        they are drawn from ``generator`` if one is given, else the deterministic choice is used
        (jitter 0, u = linspace(0, 1, n_fine)).
    """

    n_coarse: int = 48
    n_fine: int = 48
    version: Literal["1.1", "1.0"] = "1.1"
    bg_color: float = 1.0
    stratified_u: Optional[torch.Tensor] = None
    importance_u: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    chunk_rays: int = 4096

    @property
    def out_of_box_sigma(self) -> float:
        return -FLT_MAX / (3.0 if self.version == "1.0" else 8.0)


def default_intrinsics() -> Tuple[float, float, float, float]:
    """Normalised (fx, fy, cx, cy) of OpenLRM's render cameras (v1.1 create_intrinsics(0.75, 0.5); v1.0 384/512, 256/512)."""
    return 0.75, 0.75, 0.5, 0.5


def look_at_origin(positions: torch.Tensor) -> torch.Tensor:
    """(M, 3) camera positions -> (M, 3, 4) OpenGL c2w looking at the origin with world up +z."""
    up = torch.tensor([0.0, 0.0, 1.0], dtype=positions.dtype, device=positions.device).expand_as(positions)
    z = positions / positions.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(up, z)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    y = y / y.norm(dim=-1, keepdim=True)
    return torch.stack([x, y, z, positions], dim=-1)


def surrounding_views(
    n_views: int, radius: float = 2.0, height: float = 0.8, version: Literal["1.1", "1.0"] = "1.1"
) -> torch.Tensor:
    """OpenLRM orbit extrinsics (n, 3, 4) at the given height on a circle of 3-D radius ``radius``.

    v1.1 ``surrounding_views_linspace``: θ = linspace(-π/2, 3π/2, n) in float32 (first and last view coincide).
    v1.0 ``_get_surrounding_views``: θ = 2πi/n - π/2 in float64, then float32.
    """
    if n_views <= 0 or radius <= 0 or height >= radius:
        raise ConfigError(f"invalid orbit: n_views={n_views}, radius={radius}, height={height}")
    r = math.sqrt(radius**2 - height**2)
    if version == "1.1":
        theta = torch.linspace(-math.pi / 2, 3 * math.pi / 2, n_views)
        pos = torch.stack([torch.cos(theta) * r, torch.sin(theta) * r, torch.full((n_views,), height)], dim=1)
    else:
        th = [2 * math.pi * i / n_views - math.pi / 2 for i in range(n_views)]
        pos = torch.tensor([[r * math.cos(t), r * math.sin(t), height] for t in th], dtype=torch.float32)
    return look_at_origin(pos)


def build_cameras(extrinsics: torch.Tensor, intrinsics: Tuple[float, float, float, float]) -> torch.Tensor:
    """(M, 3, 4) c2w + normalised (fx, fy, cx, cy) -> (M, 25) = c2w 4x4 row-major + K 3x3 row-major."""
    m = extrinsics.shape[0]
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=extrinsics.dtype).expand(m, 1, 4)
    c2w = torch.cat([extrinsics, bottom], dim=1)
    fx, fy, cx, cy = intrinsics
    k = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=extrinsics.dtype).expand(m, 3, 3)
    return torch.cat([c2w.reshape(m, 16), k.reshape(m, 9)], dim=1)


def source_view_camera(distance: float = 2.0) -> torch.Tensor:
    """(25,) render camera of the network's input view: OpenLRM's canonical source camera, default intrinsics."""
    from .models.network import default_source_camera

    return build_cameras(default_source_camera(distance)[0, :12].reshape(1, 3, 4), default_intrinsics())[0]


def surrounding_cameras(
    n_views: int, radius: float = 2.0, height: float = 0.8, version: Literal["1.1", "1.0"] = "1.1"
) -> torch.Tensor:
    """(n, 25) OpenLRM render cameras with the default intrinsics."""
    return build_cameras(surrounding_views(n_views, radius, height, version), default_intrinsics())


def openlrm_rays(camera: torch.Tensor, resolution: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenLRM RaySampler for one 25-number camera: rays_o, rays_d (H, W, 3), row 0 = top.

    Pixel centres ((col + 0.5)/res, (row + 0.5)/res) are lifted with the OpenCV convention, then
    mapped by c2w · diag(1, -1, -1, 1) since the stored c2w is OpenGL.
    """
    cam = camera.reshape(25).float()
    c2w, k = cam[:16].reshape(4, 4), cam[16:].reshape(3, 3)
    fx, fy, cx, cy, sk = k[0, 0], k[1, 1], k[0, 2], k[1, 2], k[0, 1]
    axis = torch.arange(resolution, dtype=torch.float32, device=cam.device)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    x_cam = cols * (1.0 / resolution) + (0.5 / resolution)
    y_cam = rows * (1.0 / resolution) + (0.5 / resolution)
    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx
    y_lift = (y_cam - cy) / fy
    ones = torch.ones_like(x_lift)
    cam_pts = torch.stack([x_lift, y_lift, ones, ones], dim=-1).reshape(-1, 4)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=cam.device))
    # batched matmuls exactly as the reference: rays on the box faces are classified in/out by the
    # last bit of these products (deterministic mode puts the first sample exactly on the entry face)
    c2w_cv = torch.bmm(c2w[None], flip[None])
    world = torch.bmm(c2w_cv, cam_pts.T[None])[0].T[:, :3]
    origin = c2w[:3, 3]
    rays_d = F.normalize(world - origin, dim=-1).reshape(resolution, resolution, 3)
    return origin.expand_as(rays_d), rays_d


def openlrm_ray_limits(rays_o: torch.Tensor, rays_d: torch.Tensor, half: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ray entry/exit depths for the cube [-half, half]^3: rays (..., N, 3) -> (..., N).

    As ``get_ray_limits_box`` + the renderer over one call of N rays (each leading index is a call of its
    own, e.g. one object of a training batch): rays that miss (exit <= entry) get start = min and end = max
    of the valid rays' *start* depths (sic, as in the reference); with no valid ray, the reference's miss
    markers (-1, -2).
    """
    inv = 1 / rays_d
    t0 = (-half - rays_o) * inv
    t1 = (half - rays_o) * inv
    start = torch.minimum(t0, t1).amax(dim=-1)
    end = torch.maximum(t0, t1).amin(dim=-1)
    valid = end > start
    inf = torch.full_like(start, math.inf)
    lo = torch.where(valid, start, inf).amin(dim=-1, keepdim=True)
    hi = torch.where(valid, start, -inf).amax(dim=-1, keepdim=True)
    some = valid.any(dim=-1, keepdim=True)
    start = torch.where(valid, start, torch.where(some, lo, -1.0))
    end = torch.where(valid, end, torch.where(some, hi, -2.0))
    return start, end


def stratified_depths(start: torch.Tensor, end: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """Coarse depths (R, n): linspace(start, end, n) + u · (end - start)/(n - 1)."""
    steps = torch.arange(n, dtype=torch.float32, device=start.device) / (n - 1)
    depths = start[:, None] + steps * (end - start)[:, None]
    return depths + u * ((end - start) / (n - 1))[:, None]


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF samples (R, n) for u (R, n) from piecewise-constant weights (R, B) over bins (R, >= B + 1)."""
    nb = weights.shape[1]
    weights = weights + eps
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # (R, B + 1)
    inds = torch.searchsorted(cdf, u.contiguous(), right=True)
    below = (inds - 1).clamp_min(0)
    above = inds.clamp_max(nb)
    cdf0, cdf1 = cdf.gather(1, below), cdf.gather(1, above)
    bin0, bin1 = bins.gather(1, below), bins.gather(1, above)
    denom = cdf1 - cdf0
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)  # empty bin: never sampled inside anyway
    return bin0 + (u - cdf0) / denom * (bin1 - bin0)


def importance_depths(depths_coarse: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Fine depths (R, n) from the coarse pass: smooth weights (max-pool 2, avg-pool 2, +0.01), invert on mid-points."""
    w = F.max_pool1d(weights.unsqueeze(1), 2, 1, padding=1)
    w = F.avg_pool1d(w, 2, 1).squeeze(1) + 0.01
    mids = 0.5 * (depths_coarse[:, :-1] + depths_coarse[:, 1:])
    return sample_pdf(mids, w[:, 1:-1], u)


def mip_ray_march(
    colors: torch.Tensor, sigma_raw: torch.Tensor, depths: torch.Tensor, field: TriplaneField
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MipRayMarcher2 on sorted samples: colors (R,S,3), raw σ (R,S), depths (R,S).

    Colours and *raw* σ are averaged over each interval before the density activation; Δ is the
    world depth difference. Returns (Σ w·c (R,3), unclamped depth Σw·d/Σw (R,), weights (R,S-1)).
    """
    deltas = depths[:, 1:] - depths[:, :-1]
    colors_mid = (colors[:, :-1] + colors[:, 1:]) / 2
    sigma_mid = torch_ref.activate_density((sigma_raw[:, :-1] + sigma_raw[:, 1:]) / 2, field.spec)
    depths_mid = (depths[:, :-1] + depths[:, 1:]) / 2
    alpha = 1 - torch.exp(-(sigma_mid * deltas))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1), -1)[:, :-1]
    w = alpha * trans
    rgb = (w[..., None] * colors_mid).sum(-2)
    w_sum = w.sum(-1)
    # NaN where Σw = 0, as the reference; dividing through a where keeps that NaN out of the gradients
    hit = w_sum > 0
    depth = torch.where(hit, (w * depths_mid).sum(-1) / torch.where(hit, w_sum, torch.ones_like(w_sum)), math.nan)
    return rgb, depth, w


def _openlrm_samples(
    field: TriplaneField, o: torch.Tensor, d: torch.Tensor, depths: torch.Tensor, query: QueryFn, oob_sigma: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Colours (R,S,3) and raw σ (R,S) at depths; samples outside [-1,1]^3 get rgb 0 and a huge negative σ."""
    pts = (o[:, None, :] + depths[..., None] * d[:, None, :]).reshape(-1, 3)
    inbox = ((pts >= -1.0) & (pts <= 1.0)).all(-1)
    sigma = torch.full((pts.shape[0],), oob_sigma, dtype=pts.dtype, device=pts.device)
    colors = torch.zeros_like(pts)
    if bool(inbox.any()):  # out-of-box samples are overwritten anyway, so only query the inside ones
        s, c = query(field, pts[inbox], True)
        sigma[inbox], colors[inbox] = s, c
    return colors.reshape(*depths.shape, 3), sigma.reshape(depths.shape)


def _draws(
    given: Optional[torch.Tensor],
    n_rays: int,
    n: int,
    gen: Optional[torch.Generator],
    default: torch.Tensor,
    sample_major: bool = False,
) -> torch.Tensor:
    """U[0,1) draws (n_rays, n): injected, drawn from ``gen``, or the deterministic ``default`` (n,).

    sample_major: the reference's stratified jitter comes from rand_like of a permuted tensor, so its
    random stream fills the (sample, ray) memory order; drawing it that way reproduces a seeded run.
    """
    if given is not None:
        if given.numel() != n_rays * n:
            raise ConfigError(f"injected draws have {given.numel()} values, expected {n_rays} x {n}")
        return given.reshape(n_rays, n).to(default)
    if gen is not None:
        if sample_major:
            return torch.rand((n, n_rays), generator=gen, device=gen.device).T.to(default)
        return torch.rand((n_rays, n), generator=gen, device=gen.device).to(default)
    return default.expand(n_rays, n)


def render_openlrm(
    field: TriplaneField,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    query: Optional[QueryFn] = None,
    options: Optional[OpenLRMRenderOptions] = None,
) -> RenderOutput:
    """OpenLRM ImportanceRenderer + MipRayMarcher2 for rays (..., 3).

    The composite depth is clamped to the [min, max] of all sample depths of this call (as the
    reference does over its whole batch), so results for a ray depend on the other rays passed.
    """
    query = query or _default_query
    opt = options or OpenLRMRenderOptions()
    shape = rays_o.shape[:-1]
    o, d = rays_o.reshape(-1, 3).float(), rays_d.reshape(-1, 3).float()
    n_rays = o.shape[0]
    start, end = openlrm_ray_limits(o, d)
    # coarse draws come first, then the fine ones: same order as the reference's RNG calls
    dev = o.device
    u_strat = _draws(opt.stratified_u, n_rays, opt.n_coarse, opt.generator, torch.zeros(opt.n_coarse, device=dev), True)
    u_pdf = _draws(opt.importance_u, n_rays, opt.n_fine, opt.generator, torch.linspace(0.0, 1.0, opt.n_fine, device=dev))

    rgb = torch.empty_like(o)
    depth = torch.empty(n_rays, device=dev)
    weight = torch.empty(n_rays, device=dev)
    coarse_all = torch.empty(n_rays, opt.n_coarse, device=dev)
    fine_all = torch.empty(n_rays, opt.n_fine, device=dev)
    d_min, d_max = math.inf, -math.inf
    oob = opt.out_of_box_sigma
    for s in range(0, n_rays, opt.chunk_rays):
        sl = slice(s, s + opt.chunk_rays)
        co, cd = o[sl], d[sl]
        z_coarse = stratified_depths(start[sl], end[sl], opt.n_coarse, u_strat[sl])
        c_coarse, s_coarse = _openlrm_samples(field, co, cd, z_coarse, query, oob)
        _, _, w_coarse = mip_ray_march(c_coarse, s_coarse, z_coarse, field)
        z_fine = importance_depths(z_coarse, w_coarse, u_pdf[sl])
        c_fine, s_fine = _openlrm_samples(field, co, cd, z_fine, query, oob)

        z_all, order = torch.sort(torch.cat([z_coarse, z_fine], -1), dim=-1)
        c_all = torch.cat([c_coarse, c_fine], 1).gather(1, order[..., None].expand(-1, -1, 3))
        s_all = torch.cat([s_coarse, s_fine], 1).gather(1, order)
        rgb_c, depth_c, w = mip_ray_march(c_all, s_all, z_all, field)
        w_total = w.sum(-1)
        if opt.version == "1.0":
            rgb[sl] = rgb_c + 1 - w_total[:, None]  # white_back
        else:
            rgb[sl] = rgb_c + opt.bg_color * (1 - w_total[:, None])
        depth[sl], weight[sl] = depth_c, w_total
        coarse_all[sl], fine_all[sl] = z_coarse, z_fine
        d_min, d_max = min(d_min, float(z_all.detach().min())), max(d_max, float(z_all.detach().max()))

    # empty rays (Σw = 0) give NaN depth -> +inf -> far end of the global depth range
    depth = torch.nan_to_num(depth, nan=math.inf).clamp(d_min, d_max)
    return RenderOutput(
        rgb=rgb.reshape(*shape, 3),
        weight=weight.reshape(shape),
        depth=depth.reshape(shape),
        extras={"depths_coarse": coarse_all, "depths_fine": fine_all},
    )


def render_field(
    field: TriplaneField,
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    options: Optional[Union[TripoSRRenderOptions, OpenLRMRenderOptions]] = None,
    query: Optional[QueryFn] = None,
) -> RenderOutput:
    """Render with the renderer of the field's family."""
    if field.spec.family == "triposr":
        if options is not None and not isinstance(options, TripoSRRenderOptions):
            raise ConfigError("TripoSR fields take TripoSRRenderOptions")
        return render_triposr(field, rays_o, rays_d, query, options)
    if options is not None and not isinstance(options, OpenLRMRenderOptions):
        raise ConfigError("OpenLRM fields take OpenLRMRenderOptions")
    return render_openlrm(field, rays_o, rays_d, query, options)
