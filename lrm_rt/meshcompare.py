"""Mesh comparison helpers shared by the parity tests and the benchmarks.

Two marching-cubes implementations on the same grid produce the same vertices (one per crossed grid
edge) but may split quads differently, so meshes are compared by geometry, not index by index:
Chamfer / Hausdorff distances between vertex sets, bounding box, surface area, signed volume, face
count and topology (boundary / non-manifold edges). All sums are done in float64.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import numpy as np


def _v64(vertices: Any) -> np.ndarray:
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected (N, 3) points, got {v.shape}")
    return v


def _f64(faces: Any) -> np.ndarray:
    f = np.asarray(faces).astype(np.int64, copy=False)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"expected (F, 3) faces, got {f.shape}")
    return f


@dataclass(frozen=True)
class Chamfer:
    """Nearest-neighbour distances between two point sets, in both directions."""

    a_to_b_mean: float
    b_to_a_mean: float
    a_to_b_max: float
    b_to_a_max: float

    @property
    def mean(self) -> float:
        """Symmetric Chamfer distance: the average of both directions' mean distances."""
        return 0.5 * (self.a_to_b_mean + self.b_to_a_mean)

    @property
    def max(self) -> float:
        """Hausdorff distance: the worst nearest-neighbour distance in either direction."""
        return max(self.a_to_b_max, self.b_to_a_max)


def chamfer(a: Any, b: Any) -> Chamfer:
    """Chamfer/Hausdorff between point sets a (N, 3) and b (M, 3), nearest neighbours by cKDTree."""
    from scipy.spatial import cKDTree

    pa, pb = _v64(a), _v64(b)
    if len(pa) == 0 or len(pb) == 0:
        if len(pa) == len(pb):
            return Chamfer(0.0, 0.0, 0.0, 0.0)
        return Chamfer(np.inf, np.inf, np.inf, np.inf)
    dab = cKDTree(pb).query(pa, k=1)[0]
    dba = cKDTree(pa).query(pb, k=1)[0]
    return Chamfer(float(dab.mean()), float(dba.mean()), float(dab.max()), float(dba.max()))


def bbox(vertices: Any) -> Tuple[np.ndarray, np.ndarray]:
    """(min (3,), max (3,)) of the vertices; NaN for an empty mesh."""
    v = _v64(vertices)
    if len(v) == 0:
        return np.full(3, np.nan), np.full(3, np.nan)
    return v.min(axis=0), v.max(axis=0)


def _cross(vertices: Any, faces: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    v, f = _v64(vertices), _f64(faces)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return a, b, c


def surface_area(vertices: Any, faces: Any) -> float:
    a, b, c = _cross(vertices, faces)
    return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())


def signed_volume(vertices: Any, faces: Any) -> float:
    """Volume enclosed by the triangles (divergence theorem); > 0 for outward winding of a closed mesh.

    Computed relative to the vertices' centroid so that large coordinates do not cancel badly.
    """
    v = _v64(vertices)
    if len(v) == 0:
        return 0.0
    a, b, c = _cross(v - v.mean(axis=0), faces)
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


@dataclass(frozen=True)
class EdgeTopology:
    num_edges: int  # distinct undirected edges
    boundary_edges: int  # used by exactly one face
    nonmanifold_edges: int  # used by more than two faces
    inconsistent_edges: int  # two faces traverse the edge in the same direction (flipped winding)
    degenerate_faces: int  # faces repeating a vertex index

    @property
    def watertight(self) -> bool:
        """Closed 2-manifold with consistent winding: every edge shared by exactly 2 faces, opposite ways."""
        return self.boundary_edges == 0 and self.nonmanifold_edges == 0 and self.inconsistent_edges == 0


def edge_topology(faces: Any) -> EdgeTopology:
    f = _f64(faces)
    degenerate = int(((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])).sum())
    if len(f) == 0:
        return EdgeTopology(0, 0, 0, 0, 0)
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    lo, hi = directed.min(axis=1), directed.max(axis=1)
    forward = directed[:, 0] < directed[:, 1]
    key = np.stack([lo, hi], axis=1)
    uniq, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    n_forward = np.bincount(inverse, weights=forward, minlength=len(uniq)).astype(np.int64)
    two = counts == 2
    return EdgeTopology(
        num_edges=int(len(uniq)),
        boundary_edges=int((counts == 1).sum()),
        nonmanifold_edges=int((counts > 2).sum()),
        inconsistent_edges=int((two & (n_forward != 1)).sum()),
        degenerate_faces=degenerate,
    )


def boundary_edge_count(faces: Any) -> int:
    return edge_topology(faces).boundary_edges


def euler_characteristic(vertices: Any, faces: Any) -> int:
    """V - E + F over the vertices the faces use (2 for a sphere, 0 for a torus)."""
    f = _f64(faces)
    used = len(np.unique(f)) if len(f) else 0
    return int(used - edge_topology(f).num_edges + len(f))


def face_count_diff(faces_a: Any, faces_b: Any) -> int:
    """len(a) - len(b)."""
    return int(len(np.asarray(faces_a)) - len(np.asarray(faces_b)))


def compare_meshes(va: Any, fa: Any, vb: Any, fb: Any) -> Dict[str, Any]:
    """One summary of mesh a against reference b (plain Python values, ready for JSON reports)."""
    ch = chamfer(va, vb)
    (amin, amax), (bmin, bmax) = bbox(va), bbox(vb)
    area_a, area_b = surface_area(va, fa), surface_area(vb, fb)
    return {
        "num_vertices": [int(len(np.asarray(va))), int(len(np.asarray(vb)))],
        "num_faces": [int(len(np.asarray(fa))), int(len(np.asarray(fb)))],
        "face_count_diff": face_count_diff(fa, fb),
        "chamfer_mean": ch.mean,
        "hausdorff": ch.max,
        "bbox_max_abs_diff": float(np.max(np.abs(np.concatenate([amin - bmin, amax - bmax])))),
        "area": [area_a, area_b],
        "area_rel_diff": abs(area_a - area_b) / max(abs(area_b), 1e-300),
        "signed_volume": [signed_volume(va, fa), signed_volume(vb, fb)],
        "topology": [asdict(edge_topology(fa)), asdict(edge_topology(fb))],
    }
