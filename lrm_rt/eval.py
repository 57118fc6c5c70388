"""Reconstruction quality metrics: geometry against ground-truth meshes, images against ground-truth renders.

Geometry (both meshes brought into one normalised frame first, see ``normalisation``):
  * Chamfer distance: 0.5 * (mean NN distance pred->gt + mean NN distance gt->pred) over area-uniform
    surface samples (L2 distances, not squared; the two meshes are sampled with different seeds);
  * F-score at tau: harmonic mean of precision (pred samples within tau of gt) and recall (gt samples
    within tau of pred);
  * volume IoU: uniform points in the joint bounding box, classified inside/outside each shape.
Boxes (normalisation, volume samples) are taken over the vertices that faces use.
Images (float arrays in [0, 1], RGB composited on white): PSNR over the whole frame, background included;
SSIM (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, population covariances, valid region,
averaged over channels); silhouette IoU of alpha/opacity masks (> 0.5).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConfigError, ImageError, LrmError, check_int
from .ragged import chunks, expand

MeshLike = Tuple[np.ndarray, np.ndarray]  # (vertices (V, 3), faces (F, 3))
# Bound on surface / volume samples per mesh: 5e6 already take ~1.5 GB and tens of seconds (1e6: 0.3 GB).
MAX_POINTS = 5_000_000


class MeshError(LrmError):
    """A mesh file cannot be read, or holds nothing that can be measured."""


# ------------------------------------------------------------------------------------------ geometry

def load_mesh(path: Union[str, Path]) -> MeshLike:
    """Vertices and faces of any mesh file trimesh reads (scenes are flattened).

    Raises ``MeshError`` for a file trimesh cannot read (unknown format, corrupt or empty data) and for
    a mesh without faces (a point cloud, or text that merely has a mesh extension).
    """
    import trimesh

    try:
        obj = trimesh.load(str(path), force="mesh", process=False)
        v, f = np.asarray(obj.vertices, np.float64), np.asarray(obj.faces, np.int64)
    except Exception as exc:  # trimesh reports bad files as IndexError, ValueError, NotImplementedError, ...
        raise MeshError(f"cannot read mesh {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if f.ndim != 2 or len(f) == 0:
        raise MeshError(f"mesh {path} has no faces (not a mesh file, or a point cloud)")
    if not np.isfinite(v).all():
        raise MeshError(f"mesh {path} has non-finite (NaN / inf) vertex coordinates")
    return v, f


def used_vertices(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """The vertices some face uses: a stray vertex (PLY keeps them) must not set a box."""
    return np.asarray(vertices)[np.unique(np.asarray(faces, np.int64))] if len(faces) else np.zeros((0, 3))


def normalisation(vertices: np.ndarray, what: str = "mesh") -> Tuple[np.ndarray, float]:
    """(centre, scale) mapping ``vertices`` to a bounding box centred at 0 with largest side 1."""
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    if not extent > 0:  # a single point: no scale to divide by, every metric would be NaN / inf
        raise MeshError(f"the {what} is degenerate (all vertices at one point): it cannot be normalised")
    return (lo + hi) / 2, 1.0 / extent


def apply_normalisation(vertices: np.ndarray, norm: Tuple[np.ndarray, float]) -> np.ndarray:
    return (vertices - norm[0]) * norm[1]


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)] if len(faces) else np.zeros((0, 3, 3))
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points uniform over the surface area (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    tri = vertices[faces]
    area = face_areas(vertices, faces)
    if len(faces) == 0 or area.sum() <= 0:
        return np.zeros((0, 3))
    idx = rng.choice(len(faces), n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1  # fold the unit square onto the triangle
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tri[idx]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For every point of ``a``, the distance to the nearest point of ``b``."""
    if len(b) == 0:
        return np.full(len(a), np.inf)
    try:
        from scipy.spatial import cKDTree

        return cKDTree(b).query(a, k=1)[0]
    except ImportError:  # scipy is optional: chunked brute force in torch
        import torch

        tb = torch.from_numpy(b).float()
        return np.concatenate([torch.cdist(torch.from_numpy(a[i:i + 4096]).float(), tb).min(1).values.numpy()
                               for i in range(0, len(a), 4096)])


def chamfer_fscore(pred_pts: np.ndarray, gt_pts: np.ndarray, tau: float = 0.05) -> Dict[str, float]:
    if len(pred_pts) == 0:  # an empty prediction: nothing is precise, nothing is recalled
        return {"chamfer": float("inf"), "fscore": 0.0, "precision": 0.0, "recall": 0.0}
    d_pg = nearest_distances(pred_pts, gt_pts)
    d_gp = nearest_distances(gt_pts, pred_pts)
    precision, recall = float((d_pg < tau).mean()), float((d_gp < tau).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer": float(0.5 * (d_pg.mean() + d_gp.mean())), "fscore": f,
            "precision": precision, "recall": recall}


# Rays are cast along +z after these rotations: three orthogonal directions, none along an axis, so that no
# axis-aligned edge or vertex (a box, a grid-aligned marching-cubes surface) lies exactly on a query ray,
# and a hole seen from one direction is rarely in the way of the other two.
_BASIS = np.linalg.qr(np.random.default_rng(1234).standard_normal((3, 3)))[0]
_RAY_FRAMES = [_BASIS[:, [1, 2, 0]], _BASIS[:, [2, 0, 1]], _BASIS]
_MAX_PAIRS = 2_000_000  # (triangle, point) candidates tested at once: ~200 MB of temporaries


def _crossings(tri: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """How many triangles each point's +z ray crosses. tri (F, 3, 3), pts (N, 3), both in the ray frame.

    Points are binned on a 2-D grid over their xy; each triangle is tested only against the points in the
    cells its xy bounding box covers (counted exactly with a summed-area table, so work is chunked).
    """
    n = len(pts)
    count = np.zeros(n, np.int64)
    lo, hi = pts[:, :2].min(0), pts[:, :2].max(0)
    g = max(1, int(math.sqrt(n / 2)))  # about two points per cell
    size = np.maximum((hi - lo) / g, 1e-12)
    pc = np.clip(((pts[:, :2] - lo) / size).astype(np.int64), 0, g - 1)
    order = np.argsort(pc[:, 0] * g + pc[:, 1], kind="stable")
    per_cell = np.bincount(pc[:, 0] * g + pc[:, 1], minlength=g * g)
    first = np.concatenate([[0], np.cumsum(per_cell)[:-1]])
    sat = np.zeros((g + 1, g + 1), np.int64)  # sat[i, j] = points in cells [0, i) x [0, j)
    sat[1:, 1:] = per_cell.reshape(g, g).cumsum(0).cumsum(1)

    tmin, tmax = tri[:, :, :2].min(1), tri[:, :, :2].max(1)
    keep = np.all((tmax >= lo) & (tmin <= hi), 1) & (tri[:, :, 2].max(1) >= pts[:, 2].min())
    tri, tmin, tmax = tri[keep], tmin[keep], tmax[keep]
    c0 = np.clip(((tmin - lo) / size).astype(np.int64), 0, g - 1)
    c1 = np.clip(((tmax - lo) / size).astype(np.int64), 0, g - 1)
    pairs = sat[c1[:, 0] + 1, c1[:, 1] + 1] - sat[c0[:, 0], c1[:, 1] + 1] - sat[c1[:, 0] + 1, c0[:, 1]] \
        + sat[c0[:, 0], c0[:, 1]]
    ncells = (c1[:, 0] - c0[:, 0] + 1) * (c1[:, 1] - c0[:, 1] + 1)
    for sl in chunks(pairs + ncells, _MAX_PAIRS):
        # (triangle, cell) pairs over each triangle's box of cells, then (triangle, point) pairs
        ny = c1[sl, 1] - c0[sl, 1] + 1
        t, local = expand(ncells[sl])
        cell = (c0[sl, 0][t] + local // ny[t]) * g + c0[sl, 1][t] + local % ny[t]
        pair, local = expand(per_cell[cell])
        t, cell = t[pair], cell[pair]
        p = order[first[cell] + local]
        a, b, c = (tri[sl, i][t] for i in range(3))
        q = pts[p]
        # signed areas of the point against each edge; inside when all share the triangle's sign
        e0 = (b[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (q[:, 0] - a[:, 0])
        e1 = (c[:, 0] - b[:, 0]) * (q[:, 1] - b[:, 1]) - (c[:, 1] - b[:, 1]) * (q[:, 0] - b[:, 0])
        e2 = (a[:, 0] - c[:, 0]) * (q[:, 1] - c[:, 1]) - (a[:, 1] - c[:, 1]) * (q[:, 0] - c[:, 0])
        area = e0 + e1 + e2
        hit = ((e0 > 0) & (e1 > 0) & (e2 > 0)) | ((e0 < 0) & (e1 < 0) & (e2 < 0))
        z = (e1 * a[:, 2] + e2 * b[:, 2] + e0 * c[:, 2]) / np.where(hit, area, 1.0)
        hit &= z > q[:, 2]
        count += np.bincount(p[hit], minlength=n)
    return count


def _welded_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces over vertices merged by position (UV seams split them in files)."""
    _, weld = np.unique(np.asarray(vertices), axis=0, return_inverse=True)
    return weld.reshape(-1)[np.asarray(faces, np.int64)]


def is_closed(vertices: np.ndarray, faces: np.ndarray) -> bool:
    """Every edge shared by exactly two faces, vertices welded by position."""
    f = _welded_faces(vertices, faces)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    return bool(len(faces)) and bool((uses == 2).all())


def bounds_a_volume(vertices: np.ndarray, faces: np.ndarray) -> bool:
    """Closed and consistently oriented, pinches allowed: every edge (vertices welded by position) is crossed
    as often one way as the other, so the surface has no boundary and no face turned against its neighbours,
    though two sheets may meet along an edge (four faces), as after decimating a thin part."""
    f = _welded_faces(vertices, faces)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    if not len(faces) or (e[:, 0] == e[:, 1]).any():
        return False
    sign = np.where(e[:, 0] < e[:, 1], 1, -1)
    _, edge = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True)
    balance = np.zeros(edge.max() + 1, np.int64)
    np.add.at(balance, edge.reshape(-1), sign)
    return bool((balance == 0).all())


def inside(meshes: Sequence[MeshLike], points: np.ndarray) -> np.ndarray:
    """Points inside any of the meshes (a union of closed parts is passed as its parts).

    Ray parity: a point is inside a closed mesh when a ray from it crosses the surface an odd number of
    times. For a mesh with holes "inside" is not well defined; the majority of three ray directions is taken,
    so one ray through a hole does not decide. Our own vectorised test: trimesh's contains() without embree
    holds ~1 MB per point and takes about a minute for 50,000 points against a 100k-face mesh.
    """
    points = np.asarray(points, np.float64)
    result = np.zeros(len(points), bool)
    if not len(points):
        return result
    for v, f in meshes:
        if len(f):
            v, f = np.asarray(v, np.float64), np.asarray(f, np.int64)
            frames = _RAY_FRAMES[:1] if is_closed(v, f) else _RAY_FRAMES
            votes = sum(_crossings((v @ r)[f], points @ r) % 2 for r in frames)
            result |= 2 * votes > len(frames)
    return result


def volume_iou(pred: Sequence[MeshLike], gt: Sequence[MeshLike], n: int = 50000, seed: int = 0) -> float:
    allv = np.concatenate([used_vertices(v, f) for v, f in list(pred) + list(gt) if len(f)])
    lo, hi = allv.min(0), allv.max(0)
    pts = lo + np.random.default_rng(seed).random((n, 3)) * (hi - lo)
    a, b = inside(pred, pts), inside(gt, pts)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@dataclass
class MeshMetrics:
    chamfer: float
    fscore: float
    precision: float
    recall: float
    volume_iou: float
    tau: float


def mesh_metrics(pred: Union[MeshLike, Sequence[MeshLike]], gt: Union[MeshLike, Sequence[MeshLike]],
                 tau: float = 0.05, n_points: int = 20000, normalize: str = "gt", iou_points: int = 50000,
                 seed: int = 0) -> MeshMetrics:
    """Compare meshes (each a (V, F) pair or a list of closed parts).

    normalize: "gt" maps *both* with the ground truth's unit-box normalisation (keeps the predicted
    pose and scale honest when the frame is shared, as for LRMs with a fixed source camera); "each"
    normalises every mesh by its own box (for predictions in an unknown frame); "none" keeps units.
    Raises ConfigError for bad options and MeshError for a ground truth without a surface to compare to.
    """
    pred_parts = [pred] if isinstance(pred, tuple) else list(pred)
    gt_parts = [gt] if isinstance(gt, tuple) else list(gt)

    def norm_of(parts, what):
        return normalisation(np.concatenate([used_vertices(v, f) for v, f in parts]), what)

    if normalize not in ("gt", "each", "none"):
        raise ConfigError(f"normalize must be gt, each or none, got {normalize!r}")
    try:
        tau_ok = math.isfinite(tau) and tau > 0
    except TypeError:
        tau_ok = False
    if not tau_ok:
        raise ConfigError(f"tau (--tau) must be a finite distance > 0, got {tau!r}")
    check_int("n_points (--points)", n_points, 1, MAX_POINTS)
    check_int("iou_points", iou_points, 1, MAX_POINTS)
    if not any(len(f) for _, f in gt_parts):
        raise MeshError("the ground-truth mesh has no faces")
    for parts, what in ((gt_parts, "ground-truth"), (pred_parts, "predicted")):
        if not all(np.isfinite(np.asarray(v, np.float64)).all() for v, _ in parts):
            raise MeshError(f"the {what} mesh has non-finite (NaN / inf) vertex coordinates")
    ng = norm_of(gt_parts, "ground-truth mesh") if normalize != "none" else (np.zeros(3), 1.0)
    npred = ng if normalize != "each" else (norm_of(pred_parts, "predicted mesh (normalised by its own box)")
                                            if any(len(f) for _, f in pred_parts) else ng)
    gt_parts = [(apply_normalisation(v, ng), f) for v, f in gt_parts]
    pred_parts = [(apply_normalisation(v, npred), f) for v, f in pred_parts]
    for parts, what in ((gt_parts, "ground-truth"), (pred_parts, "predicted")):
        # finite coordinates can still overflow an area (a vertex at 1e300): sampling by area would divide inf by inf
        with np.errstate(over="ignore", invalid="ignore"):
            too_large = not all(np.isfinite(face_areas(v, f)).all() for v, f in parts)
        if too_large:
            raise MeshError(f"the {what} mesh has faces too large to measure (coordinates up to "
                            f"{max(float(np.abs(v).max()) for v, _ in parts if len(v)):.3g} after normalisation)")

    def surface(parts, others_inside: bool, seed0: int):
        # Samples split between the parts by area, so the union is sampled uniformly; then the samples of one
        # part that lie inside another (hidden internal walls) are dropped.
        counts = _split_by_area(parts, n_points)
        pts = []
        for i, ((v, f), n) in enumerate(zip(parts, counts)):
            p = sample_surface(v, f, n, seed0 + i) if n else np.zeros((0, 3))
            if others_inside and len(parts) > 1 and len(p):
                p = p[~inside([q for j, q in enumerate(parts) if j != i], p)]
            pts.append(p)
        return np.concatenate(pts)

    gt_pts = surface(gt_parts, True, seed)
    if len(gt_pts) == 0:  # zero-area faces (e.g. all on a line): nothing to measure distances to
        raise MeshError("the ground-truth mesh has no surface area (all faces are degenerate)")
    # Other seeds for the prediction: the same seed would pick matching points on meshes triangulated alike.
    cf = chamfer_fscore(surface(pred_parts, False, seed + 10_000), gt_pts, tau)
    has_pred = any(len(f) for _, f in pred_parts)
    iou = volume_iou(pred_parts, gt_parts, iou_points, seed) if has_pred else 0.0
    return MeshMetrics(cf["chamfer"], cf["fscore"], cf["precision"], cf["recall"], iou, tau)


def _split_by_area(parts: Sequence[MeshLike], n: int) -> list:
    """``n`` samples split between the parts in proportion to their surface areas (largest remainders)."""
    areas = np.asarray([face_areas(v, f).sum() for v, f in parts])
    if not areas.sum() > 0:
        return [0] * len(parts)
    share = n * areas / areas.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[:n - counts.sum()]] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------------ images

def _unit_float_pair(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    """Two images of one shape as float64, refusing what would give a meaningless number: other shapes
    (numpy would broadcast them), integer arrays (0..255 where [0, 1] is meant), NaN."""
    out = []
    for name, x in (("predicted", pred), ("ground-truth", gt)):
        a = np.asarray(x)
        if not np.issubdtype(a.dtype, np.floating):
            raise ImageError(f"the {name} image must be floats in [0, 1], got {a.dtype} (divide 8-bit data by 255)")
        if not np.isfinite(a).all():
            raise ImageError(f"the {name} image holds NaN / inf values")
        out.append(a.astype(np.float64))
    if out[0].shape != out[1].shape:
        raise ImageError(f"image shapes differ: {out[0].shape} vs {out[1].shape}")
    return out[0], out[1]


def psnr(pred: np.ndarray, gt: np.ndarray, max_val: float = 1.0) -> float:
    x, y = _unit_float_pair(pred, gt)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(max_val ** 2 / mse)


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, size: int = 11) -> np.ndarray:
    """'valid' separable Gaussian filter over the first two axes."""
    r = np.arange(size) - size // 2
    k = np.exp(-r ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    h, w = x.shape[:2]
    y = sum(k[i] * x[i:h - size + 1 + i] for i in range(size))
    return sum(k[i] * y[:, i:w - size + 1 + i] for i in range(size))


def ssim(pred: np.ndarray, gt: np.ndarray, max_val: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004) of (H, W) or (H, W, C) images; needs H, W >= 11."""
    x, y = _unit_float_pair(pred, gt)
    if min(x.shape[:2]) < 11:  # the 11x11 window would leave nothing: the mean would be NaN
        raise ImageError(f"SSIM needs images of at least 11x11 pixels, got {x.shape[1]}x{x.shape[0]}")
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    vx = _gaussian_blur(x * x) - mx ** 2
    vy = _gaussian_blur(y * y) - my ** 2
    cxy = _gaussian_blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def silhouette_iou(pred_alpha: np.ndarray, gt_alpha: np.ndarray, threshold: float = 0.5) -> float:
    a, b = np.asarray(pred_alpha) > threshold, np.asarray(gt_alpha) > threshold
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def image_metrics(pred_rgb: np.ndarray, gt_rgb: np.ndarray, pred_alpha: Optional[np.ndarray] = None,
                  gt_alpha: Optional[np.ndarray] = None) -> Dict[str, float]:
    out = {"psnr": psnr(pred_rgb, gt_rgb), "ssim": ssim(pred_rgb, gt_rgb)}
    if pred_alpha is not None and gt_alpha is not None:
        out["silhouette_iou"] = silhouette_iou(pred_alpha, gt_alpha)
    return out


def load_image01(path: Union[str, Path]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """RGB composited on white and alpha, as floats in [0, 1]; alpha None for an image without one (an opaque
    render says nothing about the silhouette)."""
    from PIL import Image

    from .preprocess import to_rgba_array

    try:
        with Image.open(path) as im:
            has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            x = to_rgba_array(im, path).astype(np.float64) / 255.0  # 16-bit / float modes rescaled, not clipped
    except Exception as exc:  # not an image, truncated data, decompression bomb: one line, naming the file
        raise ImageError(f"cannot read image {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    a = x[..., 3:]
    return x[..., :3] * a + (1 - a), (a[..., 0] if has_alpha else None)


def metrics_dict(m: MeshMetrics) -> Dict[str, float]:
    return asdict(m)
