"""UV texture baking: unwrap the mesh (xatlas), then colour every texel by querying the field at the surface
point it maps to, through the same field backend that coloured the vertices.

A vertex-coloured marching-cubes mesh carries one colour per vertex, so its colour detail is capped by the grid
resolution; a baked texture carries the field's colour at texture resolution instead, and is what most mesh
tools expect (GLB / OBJ with a base-colour image).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from .errors import ConfigError, LrmError
from .field.base import FieldBackend
from .field.spec import TriplaneField
from .mesh import Mesh
from .ragged import chunks, expand

MIN_SIZE, MAX_SIZE = 64, 8192
# texels between charts in xatlas's atlas, so bilinear filtering does not mix two charts; xatlas sizes that atlas
# itself (about 1.2x SIZE for lrm-tiny's meshes), so after scaling to SIZE the gap is ~1.6 texels
CHART_PADDING = 2
EDGE_MARGIN = 0.75  # texels outside a triangle still coloured from its nearest point (chart borders)
_MAX_CANDIDATES = 4_000_000  # (face, texel) pairs tested at once
_QUERY_CHUNK = 1 << 20
# xatlas's chart search grows faster than the face count: 33k faces 1.5 s, 138k 14 s, 280k 50 s on 2 cores
UNWRAP_WARN_FACES = 100_000

log = logging.getLogger(__name__)


def check_texture_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"texture size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def require_xatlas() -> None:
    if importlib.util.find_spec("xatlas") is None:  # found, not imported: the unwrapping runs in a child process
        raise LrmError("texture baking needs xatlas: pip install xatlas (or the project's [texture] extra)")


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed for a size x size texture: (vertex map into the input vertices, faces, uv in [0, 1]).

    Runs in a child process (lrm_rt._uv_unwrap): xatlas crashes on some meshes, and that must be an error here,
    not the end of the caller's process."""
    require_xatlas()
    with tempfile.TemporaryDirectory(prefix="lrm_rt_uv_") as tmp:
        src, dst = Path(tmp) / "mesh.npz", Path(tmp) / "uv.npz"
        np.savez(src, vertices=np.ascontiguousarray(vertices, np.float32),
                 faces=np.ascontiguousarray(faces, np.uint32))
        package_root = str(Path(__file__).resolve().parents[1])  # importable even when not installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        res = subprocess.run([sys.executable, "-m", "lrm_rt._uv_unwrap", str(src), str(dst), str(size),
                              str(CHART_PADDING)], capture_output=True, text=True, env=env)
        if res.returncode != 0 or not dst.is_file():
            how = f"crashed (signal {-res.returncode})" if res.returncode < 0 else f"failed (exit {res.returncode})"
            last = (res.stderr.strip().splitlines() or [""])[-1]
            raise LrmError(f"UV unwrapping (xatlas) {how} on this mesh ({len(faces)} faces)"
                           f"{': ' + last if last else ''}; try --faces to simplify it first, or vertex colours "
                           "(no --texture)")
        with np.load(dst) as z:
            vmap, uv_faces, uv = z["vmap"].astype(np.int64), z["faces"].astype(np.int64), z["uv"].astype(np.float64)
    if not len(uv) or not np.isfinite(uv).all():  # xatlas made no chart (it divides by an empty atlas's size)
        raise LrmError(f"UV unwrapping (xatlas) made no usable charts for this mesh ({len(faces)} faces, too small "
                       "or degenerate); use vertex colours (no --texture)")
    return vmap, uv_faces, uv


def rasterise(uv: np.ndarray, faces: np.ndarray, size: int, backend: str = "auto"):
    """Texels covered by the faces in UV space (texel (r, c) has its centre at uv ((c + .5) / size, (r + .5) / size),
    row 0 at the top, as glTF samples). Returns (texel index r * size + c, ascending; face; barycentric weights
    (n, 3)); a texel within EDGE_MARGIN of several faces goes to the one it lies deepest inside (ties: the lower
    face). backend (kernels.use_native): the CPU build of cuda/uv_raster.cu or the numpy reference."""
    from .kernels import use_native

    lo, hi, coef = _raster_setup(uv, faces, size)
    if use_native(backend) and len(faces) <= np.iinfo(np.int32).max:
        return _rasterise_native(lo, hi, coef, size)
    return _rasterise_numpy(lo, hi, coef, size)


def _raster_setup(uv: np.ndarray, faces: np.ndarray, size: int):
    """Per face: its texel box lo, hi (F, 2) as (x, y), grown by EDGE_MARGIN and clipped to the texture (hi < lo
    for a degenerate face), and float32 coefficients (F, 12) = gx[3], gy[3], g0[3], ds[3]: vertex k's weight at
    box-local texel (x, y) is w_k = gx_k * x + gy_k * y + g0_k (the signed area of the sub-triangle opposite it
    over the face's), and w_k * ds_k the signed distance to the edge opposite vertex k, in texels."""
    p = uv[faces] * size - 0.5  # (F, 3, 2) in texel-centre coordinates
    lo = np.clip(np.floor(p.min(1) - EDGE_MARGIN), 0, size - 1).astype(np.int64)
    hi = np.clip(np.ceil(p.max(1) + EDGE_MARGIN), 0, size - 1).astype(np.int64)
    p -= lo[:, None, :]  # each face in its own box's coordinates: small numbers, so float32 is exact enough
    a, b, c = p[:, 0], p[:, 1], p[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    ok = np.abs(area) > 1e-12
    area = np.where(ok, area, 1.0)
    u, v = np.stack([b, c, a], 1), np.stack([c, a, b], 1)  # the edge opposite each vertex, (F, 3, 2)
    d = v - u
    gx, gy = -d[..., 1] / area[:, None], d[..., 0] / area[:, None]
    g0 = (d[..., 1] * u[..., 0] - d[..., 0] * u[..., 1]) / area[:, None]
    dist_scale = np.abs(area)[:, None] / np.maximum(np.linalg.norm(d, axis=2), 1e-12)
    coef = np.concatenate([gx, gy, g0, dist_scale], 1).astype(np.float32)
    hi[~ok, 1] = lo[~ok, 1] - 1
    return lo, hi, coef


def _rasterise_native(lo: np.ndarray, hi: np.ndarray, coef: np.ndarray, size: int):
    import ctypes

    from .kernels import native_entry

    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn = native_entry("lrm_uv_rasterise", [i64, vp, vp, vp, i64, ctypes.c_float, vp, vp, vp])
    lo, hi, coef = (np.ascontiguousarray(x) for x in (lo, hi, coef))
    best = np.zeros(size * size, np.uint64)
    face = np.empty(size * size, np.int32)
    weight = np.empty((size * size, 3), np.float32)
    st = fn(len(coef), coef.ctypes.data, lo.ctypes.data, hi.ctypes.data, size, EDGE_MARGIN, best.ctypes.data,
            face.ctypes.data, weight.ctypes.data)
    if st != 0:
        raise LrmError(f"lrm_uv_rasterise failed with status {st}")
    del best
    texel = np.flatnonzero(face >= 0)
    return texel, face[texel].astype(np.int64), weight[texel]


def _rasterise_numpy(lo: np.ndarray, hi: np.ndarray, coef: np.ndarray, size: int):
    """The reference: per face and texel row, the span of columns within EDGE_MARGIN of all three edges
    (w * ds >= -margin for each, a bound on x per edge), so only texels that are kept get enumerated."""
    gx, gy, g0, dist_scale = coef[:, 0:3], coef[:, 3:6], coef[:, 6:9], coef[:, 9:12]
    nrows = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    rf, ry = expand(nrows)
    ry = ry.astype(np.float32)
    need = -EDGE_MARGIN / dist_scale[rf] - gy[rf] * ry[:, None] - g0[rf]  # gx * x >= need, per edge
    slope = gx[rf]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = need / slope
    lower = np.where(slope > 0, bound, np.where((slope == 0) & (need > 0), np.inf, -np.inf)).max(1)
    upper = np.where(slope < 0, bound, np.inf).min(1)
    x0 = np.ceil(np.clip(lower, 0, size)).astype(np.int64)  # clipped first: an empty row has inf bounds
    x1 = np.floor(np.clip(upper, -1, (hi[rf, 0] - lo[rf, 0]).astype(np.float32))).astype(np.int64)
    count = np.maximum(x1 - x0 + 1, 0)
    texels, face_of, weights, depth = [], [], [], []
    for sl in chunks(count, _MAX_CANDIDATES):
        span, local = expand(count[sl])
        if not len(span):
            continue
        span += sl.start
        f = rf[span]
        x = x0[span] + local
        y = ry[span].astype(np.int64)
        w = gx[f] * x[:, None].astype(np.float32) + gy[f] * y[:, None].astype(np.float32) + g0[f]
        dist = (w * dist_scale[f]).min(1)  # signed distance to the nearest edge, in texels
        keep = dist >= -EDGE_MARGIN
        w = np.clip(w[keep], 0.0, None)
        f = f[keep]
        texels.append((lo[f, 1] + y[keep]) * size + lo[f, 0] + x[keep])
        face_of.append(f)
        weights.append(w / w.sum(1, keepdims=True))
        depth.append(dist[keep])
    if not texels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32)
    texel, face, weight, dist = (np.concatenate(x) for x in (texels, face_of, weights, depth))
    order = np.lexsort((-dist, texel))
    first = np.ones(len(order), bool)
    first[1:] = texel[order][1:] != texel[order][:-1]
    pick = order[first]
    return texel[pick], face[pick], weight[pick]


def dilate(rgb: np.ndarray, filled: np.ndarray, steps: int) -> np.ndarray:
    """Grow the charts by `steps` texels (mean of filled 4-neighbours), so mipmaps and bilinear lookups at chart
    borders read chart colours; the rest gets the mean colour instead of black. (Left in numpy: a kernel for
    the steps took 0.06 s against numpy's 0.3 s at 2048^2, but the arrays around it cost as much again.)"""
    h, w = filled.shape
    acc = np.zeros((h + 2, w + 2, 4), np.float32)  # rgb * filled, filled; a zero border for the shifted sums
    acc[1:-1, 1:-1, :3] = rgb * filled[..., None]
    acc[1:-1, 1:-1, 3] = filled
    for _ in range(steps):
        near = acc[:-2, 1:-1] + acc[2:, 1:-1] + acc[1:-1, :-2] + acc[1:-1, 2:]
        grow = (acc[1:-1, 1:-1, 3] == 0) & (near[..., 3] > 0)
        acc[1:-1, 1:-1][grow] = np.concatenate([near[grow, :3] / near[grow, 3:], np.ones((grow.sum(), 1))], 1)
    out, have = acc[1:-1, 1:-1, :3], acc[1:-1, 1:-1, 3] > 0
    if have.any():
        out[~have] = out[have].mean(0)
    return out


def bake_texture(mesh: Mesh, field_: TriplaneField, backend: FieldBackend, size: int = 1024) -> Mesh:
    """The mesh re-indexed along its UV seams, with per-vertex uv and a size x size RGB texture of the field's
    colour on the surface (vertex colours dropped: glTF would multiply them into the texture)."""
    size = check_texture_size(size)
    if mesh.num_faces == 0:
        raise LrmError("the mesh is empty: nothing to texture")
    if mesh.num_faces > UNWRAP_WARN_FACES:
        log.warning("UV unwrapping %d faces can take a minute or more; simplify first (--faces / target_faces, "
                    "e.g. 50000)", mesh.num_faces)
    t0 = time.perf_counter()
    vmap, faces, uv = unwrap(mesh.vertices, mesh.faces, size)
    vertices = mesh.vertices[vmap]
    t1 = time.perf_counter()
    texel, face, w = rasterise(uv, faces, size)
    if not len(texel):
        raise LrmError(f"the UV charts cover no texel of a {size}^2 texture; use a larger --texture or vertex colours")
    points = np.einsum("nk,nkd->nd", w, vertices[faces[face]])
    rgb = np.zeros((size * size, 3), np.float32)
    for s in range(0, len(points), _QUERY_CHUNK):
        _, colour = backend.query(field_, torch.from_numpy(points[s:s + _QUERY_CHUNK]))
        rgb[texel[s:s + _QUERY_CHUNK]] = colour.detach().cpu().float().numpy()
    filled = np.zeros(size * size, bool)
    filled[texel] = True
    rgb = dilate(rgb.reshape(size, size, 3), filled.reshape(size, size), 2 * CHART_PADDING)
    texture = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    timings = dict(mesh.timings, uv_unwrap=t1 - t0, texture_bake=time.perf_counter() - t1)
    return Mesh(vertices, faces, None, timings, uv=uv.astype(np.float32), texture=texture)
