"""Training-time rendering of a whole batch of objects in one pass (CPU or GPU).

``lrm_rt.render.render_openlrm`` renders one object's field; a training step renders B objects. Calling it B
times costs B rounds of small kernels, which leaves a GPU idle, so this module does the same arithmetic with
the objects as a leading batch dimension: one ``grid_sample`` over B x 3 planes and one decoder MLP over every
sample. Building blocks (ray limits, stratified and importance depths, the ray marcher) are the runtime's own;
``tests/test_training.py`` checks the result against ``render_openlrm`` object by object, values and gradients.

A *batched field* is a ``TriplaneField`` whose ``planes`` are (B, 3, C, H, W).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from lrm_rt.field import torch_ref
from lrm_rt.field.spec import TriplaneField
from lrm_rt.render import (OpenLRMRenderOptions, importance_depths, mip_ray_march, openlrm_ray_limits,
                           stratified_depths)

OUT_OF_BOX_SIGMA = OpenLRMRenderOptions(version="1.1").out_of_box_sigma


def pixel_rays(cams: torch.Tensor, pixels: torch.Tensor, res: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rays through chosen pixels: cams (M, 25) OpenLRM cameras, pixels (M, R) flat indices row * res + col
    -> origins, directions (M, R, 3): ``openlrm_rays(cams[m], res)`` at those pixels (to float rounding)."""
    c2w, k = cams[:, :16].reshape(-1, 4, 4), cams[:, 16:].reshape(-1, 3, 3)
    fx, fy, cx, cy, sk = (k[:, i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2), (0, 1)))
    x_cam = (pixels % res).to(cams.dtype) * (1.0 / res) + (0.5 / res)
    y_cam = torch.div(pixels, res, rounding_mode="floor").to(cams.dtype) * (1.0 / res) + (0.5 / res)
    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx
    y_lift = (y_cam - cy) / fy
    # OpenCV camera -> the stored OpenGL c2w: flip y and z, then rotate and translate
    cam_pts = torch.stack([x_lift, -y_lift, -torch.ones_like(x_lift)], -1)  # (M, R, 3)
    origin = c2w[:, None, :3, 3]
    world = cam_pts @ c2w[:, :3, :3].transpose(1, 2) + origin
    return origin.expand_as(world), F.normalize(world - origin, dim=-1)


def query_batch(field: TriplaneField, points: torch.Tensor) -> torch.Tensor:
    """Raw decoder output (B, N, 4) at world points (B, N, 3), each object reading its own planes."""
    b, n, _ = points.shape
    _, _, c, h, w = field.planes.shape
    coords = torch_ref._plane_coords(points.reshape(-1, 3), field.spec)  # (3, B*N, 2)
    coords = coords.reshape(3, b, n, 2).transpose(0, 1).reshape(b * 3, 1, n, 2)
    feats = F.grid_sample(field.planes.reshape(b * 3, c, h, w), coords, mode="bilinear", padding_mode="zeros",
                          align_corners=False)  # (B*3, C, 1, N)
    feats = feats.reshape(b, 3, c, n).permute(0, 3, 1, 2).reshape(b, n, 3 * c)  # plane-major, as sample_triplane
    return torch_ref.decode(field, feats)


def _samples(field: TriplaneField, o, d, depths, oob_sigma: float):
    """Colours (B, R, S, 3) and raw sigma (B, R, S) at depths (B, R, S); outside [-1, 1]^3 as the runtime's
    renderer: colour 0 and a huge negative sigma."""
    b, r, s = depths.shape
    pts = o[:, :, None, :] + depths[..., None] * d[:, :, None, :]
    raw = query_batch(field, pts.reshape(b, r * s, 3)).reshape(b, r, s, 4)
    inbox = ((pts >= -1.0) & (pts <= 1.0)).all(-1)
    sigma = torch.where(inbox, raw[..., 0], torch.full_like(raw[..., 0], oob_sigma))
    colors = torch.where(inbox[..., None], torch_ref.activate_color(raw[..., 1:], field.spec), 0.0)
    return colors, sigma


def render_batch(field: TriplaneField, o: torch.Tensor, d: torch.Tensor, n_coarse: int, n_fine: int,
                 generator: Optional[torch.Generator] = None, u_coarse: Optional[torch.Tensor] = None,
                 u_fine: Optional[torch.Tensor] = None, oob_sigma: float = OUT_OF_BOX_SIGMA):
    """OpenLRM importance rendering (v1.1, white background) of rays o, d (B, R, 3) through batched field:
    (rgb (B, R, 3), opacity (B, R), depth (B, R)). Jitter u_coarse (B, R, n_coarse) / u_fine (B, R, n_fine) is
    drawn from ``generator`` unless given. Depth is clamped to each object's sample range, as
    ``render_openlrm`` clamps it over one call (an empty ray's depth is the far end)."""
    b, r, _ = o.shape
    dev = o.device
    if u_coarse is None:
        u_coarse = torch.rand((b, r, n_coarse), generator=generator, device=dev)
    if u_fine is None:
        u_fine = torch.rand((b, r, n_fine), generator=generator, device=dev)
    start, end = openlrm_ray_limits(o, d)  # per object, as render_openlrm over one call
    z_coarse = stratified_depths(start.reshape(-1), end.reshape(-1), n_coarse, u_coarse.reshape(-1, n_coarse))
    c_coarse, s_coarse = _samples(field, o, d, z_coarse.reshape(b, r, n_coarse), oob_sigma)
    _, _, w_coarse = mip_ray_march(c_coarse.reshape(b * r, n_coarse, 3), s_coarse.reshape(b * r, n_coarse),
                                   z_coarse, field)
    z_fine = importance_depths(z_coarse, w_coarse, u_fine.reshape(-1, n_fine))
    c_fine, s_fine = _samples(field, o, d, z_fine.reshape(b, r, n_fine), oob_sigma)

    z_all, order = torch.sort(torch.cat([z_coarse, z_fine], -1), dim=-1)
    n = n_coarse + n_fine
    c_all = torch.cat([c_coarse.reshape(b * r, n_coarse, 3), c_fine.reshape(b * r, n_fine, 3)], 1)
    c_all = c_all.gather(1, order[..., None].expand(-1, -1, 3))
    s_all = torch.cat([s_coarse.reshape(b * r, n_coarse), s_fine.reshape(b * r, n_fine)], 1).gather(1, order)
    rgb, depth, w = mip_ray_march(c_all, s_all, z_all, field)
    opacity = w.sum(-1)
    rgb = rgb + (1 - opacity[:, None])
    z = z_all.detach().reshape(b, r * n)
    lo, hi = z.amin(-1, keepdim=True), z.amax(-1, keepdim=True)
    depth = torch.nan_to_num(depth.reshape(b, r), nan=float("inf")).clamp(lo, hi)
    return rgb.reshape(b, r, 3), opacity.reshape(b, r), depth
