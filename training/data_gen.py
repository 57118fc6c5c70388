"""Synthetic multi-view dataset for lrm-tiny, ray cast on the CPU with Embree (through trimesh).

Objects: procedural unions of spheres / boxes / cylinders / capsules / tori with solid, striped or
checkered colours, plus the textured meshes of shared/data/meshes (some held out for evaluation).
Every object is normalised into the OpenLRM world box [-1, 1]^3 (z up) and rendered

* once from OpenLRM's canonical source camera (0, -2, 0) looking +y at ``--input-render`` px, then
  composited on white and bicubic-resized to the encoder size by the runtime's own preprocessing
  code, so training inputs are exactly what inference feeds the network;
* from ``--views`` cameras (the source one first, then random orbit ones) at ``--res`` px as RGBA
  supervision for the differentiable renderer, with each pixel's ray-hit distance (``depths``).

The rays come from ``lrm_rt.render.openlrm_rays``, so every ground-truth pixel is the same ray the
model's renderer traces. Colours: albedo x a fixed world-space light (view independent, as the
field's colour is).

    python training/data_gen.py            # training/data/{train,val_shapes,val_meshes,tune}.npz + gt/ meshes
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrm_rt.eval import inside as points_inside  # noqa: E402
from model_def import INFER  # noqa: E402
from lrm_rt.preprocess import composite_resize_bicubic  # noqa: E402
from lrm_rt.render import (build_cameras, default_intrinsics, look_at_origin, openlrm_rays,  # noqa: E402
                           source_view_camera)

# ../shared beside the checkout, or LRM_RT_SHARED (as the tests): a GPU machine gets a copy elsewhere
MESH_DIR = Path(os.environ.get("LRM_RT_SHARED", ROOT.parent / "shared")) / "data" / "meshes"
DATA_DIR = Path(__file__).resolve().parent / "data"
# Held out of training entirely; they measure generalisation to real textured assets.
HELDOUT_MESHES = ("spot", "gltf_boombox")
MESH_FILES = {
    "gltf_avocado": "Avocado.gltf", "gltf_boombox": "BoomBox.gltf", "gltf_suzanne": "Suzanne.gltf",
    "gltf_waterbottle": "WaterBottle.gltf", "kaolin_armchair": "armchair.gltf", "kaolin_pizza": "pizza.obj",
    "spot": "spot_triangulated.obj",
}
LIGHT = np.array([0.35, -0.6, 0.72]) / np.linalg.norm([0.35, -0.6, 0.72])
Y_UP_TO_Z_UP = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)


# ------------------------------------------------------------------------------------------ objects

class Part:
    """One closed mesh with a colour rule: fn(points (N,3), face_ids (N,)) -> albedo (N,3) in [0,1]."""

    def __init__(self, mesh: trimesh.Trimesh, color_fn):
        self.mesh = mesh
        self.color_fn = color_fn


def _rand_color(rng) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.25, 1.0), rng.uniform(0.35, 1.0)))


def _pattern(rng):
    """Solid, stripes or checkers of two random colours, in world coordinates of the normalised object."""
    c1, c2 = _rand_color(rng), _rand_color(rng)
    kind = rng.choice(["solid", "solid", "stripes", "checkers"])
    period = rng.uniform(0.15, 0.45)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    if kind == "solid":
        return lambda p, f: np.broadcast_to(c1, p.shape).copy()
    if kind == "stripes":
        return lambda p, f: np.where(((p @ axis) // period % 2 == 0)[:, None], c1, c2)
    return lambda p, f: np.where((np.floor(p / period).sum(1) % 2 == 0)[:, None], c1, c2)


def _primitive(rng) -> trimesh.Trimesh:
    kind = rng.choice(["sphere", "box", "cylinder", "capsule", "torus"])
    if kind == "sphere":
        m = trimesh.creation.icosphere(3, radius=1.0)
        m.apply_scale(rng.uniform(0.5, 1.0, size=3) if rng.random() < 0.4 else rng.uniform(0.5, 1.0))
    elif kind == "box":
        m = trimesh.creation.box(extents=rng.uniform(0.6, 1.8, size=3))
    elif kind == "cylinder":
        m = trimesh.creation.cylinder(radius=rng.uniform(0.3, 0.9), height=rng.uniform(0.5, 2.0), sections=40)
    elif kind == "capsule":
        m = trimesh.creation.capsule(height=rng.uniform(0.4, 1.4), radius=rng.uniform(0.25, 0.6), count=[24, 24])
    else:
        r_major = rng.uniform(0.5, 0.9)
        m = trimesh.creation.torus(major_radius=r_major, minor_radius=rng.uniform(0.15, 0.45) * r_major,
                                   major_sections=48, minor_sections=20)
    return m


def _random_rotation(rng, upright: bool) -> np.ndarray:
    """Uniform rotation, or (upright) a spin about z with a small tilt -- photos show objects upright."""
    if not upright:
        q = rng.normal(size=4)
        return trimesh.transformations.quaternion_matrix(q / np.linalg.norm(q))[:3, :3]
    rz = trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * math.pi), [0, 0, 1])[:3, :3]
    rx = trimesh.transformations.rotation_matrix(rng.normal(0, 0.15), [1, 0, 0])[:3, :3]
    return rz @ rx


def normalise_parts(parts, rng, extent_range=(0.6, 0.85)):
    """Centre the union's bounding box; scale its largest half-extent to a random size, but keep the
    half-diagonal <= 1 so no corner leaves the box or the source camera's frame (distance 2, f = 0.75).
    Objects then fill most of the input image, as photos framed for OpenLRM do."""
    verts = np.concatenate([p.mesh.vertices for p in parts])
    lo, hi = verts.min(0), verts.max(0)
    half = 0.5 * (hi - lo)
    scale = min(rng.uniform(*extent_range) / half.max(), 1.0 / np.linalg.norm(half))
    for p in parts:
        p.mesh.apply_translation(-(lo + hi) / 2)
        p.mesh.apply_scale(scale)
    return parts


def procedural_object(rng):
    parts = []
    for i in range(int(rng.choice([1, 1, 2, 2, 3]))):
        m = _primitive(rng)
        m.apply_transform(_rotation4(_random_rotation(rng, upright=False)))
        if i:
            m.apply_translation(rng.normal(0, 0.45, size=3))
        parts.append(Part(m, _pattern(rng)))
    return normalise_parts(parts, rng)


def _rotation4(r: np.ndarray) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = r
    return t


_TEX_CACHE: dict = {}


def _texture_fn(geom: trimesh.Trimesh):
    """Albedo from the geometry's base-colour texture (barycentric UV, nearest texel) or its flat colour."""
    vis = geom.visual
    mat = getattr(vis, "material", None)
    img = None
    factor = np.ones(3)
    if mat is not None:
        img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
        f = getattr(mat, "baseColorFactor", None)
        if f is not None:
            factor = np.asarray(f[:3], np.float64) / (255.0 if np.max(f) > 1 else 1.0)
        elif getattr(mat, "diffuse", None) is not None and img is None:
            factor = np.asarray(mat.diffuse[:3], np.float64) / 255.0
    uv = getattr(vis, "uv", None)
    if img is None or uv is None:
        return lambda p, f, bary=None: np.broadcast_to(factor, p.shape).copy()
    # decoded once per asset and kept as uint8: instances share it (float copies exhaust memory)
    tex = _TEX_CACHE.setdefault(id(img), np.asarray(img.convert("RGB"), np.uint8))
    h, w = tex.shape[:2]
    faces = geom.faces

    def fn(p, f, bary):
        tri_uv = uv[faces[f]]  # (N, 3, 2)
        u = (tri_uv * bary[..., None]).sum(1) % 1.0
        x = np.clip((u[:, 0] * w).astype(int), 0, w - 1)
        y = np.clip(((1 - u[:, 1]) * h).astype(int), 0, h - 1)
        return tex[y, x] / 255.0 * factor

    return fn


class TexturedPart(Part):
    """A textured asset: several geometries (each with its texture) concatenated for ray casting."""

    def __init__(self, geoms):
        self.geoms = geoms
        mesh = trimesh.util.concatenate([trimesh.Trimesh(g.vertices, g.faces, process=False) for g in geoms])
        self.offsets = np.cumsum([0] + [len(g.faces) for g in geoms])
        self.fns = [_texture_fn(g) for g in geoms]  # only faces/UVs/textures are read from geoms
        super().__init__(mesh, None)

    def colors(self, points, faces, bary):
        out = np.zeros((len(points), 3))
        gid = np.searchsorted(self.offsets, faces, side="right") - 1
        for i, fn in enumerate(self.fns):
            sel = gid == i
            if sel.any():
                out[sel] = fn(points[sel], faces[sel] - self.offsets[i], bary[sel])
        return out


def load_asset(name: str):
    scene = trimesh.load(MESH_DIR / name / MESH_FILES[name])
    geoms = scene.dump() if isinstance(scene, trimesh.Scene) else [scene]
    geoms = [g for g in geoms if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if name == "spot":  # its OBJ has UVs but no .mtl: apply the shipped texture ourselves
        from PIL import Image

        g = geoms[0]
        g.visual = trimesh.visual.TextureVisuals(uv=g.visual.uv, image=Image.open(MESH_DIR / "spot" / "spot_texture.png"))
    return geoms


def mesh_object(geoms, rng, upright_spin: bool = True):
    rot = _random_rotation(rng, upright=True) if upright_spin else np.eye(3)
    part = TexturedPart(geoms)  # shares the assets' geometry and textures; only its ray mesh moves
    part.mesh.apply_transform(_rotation4(rot @ Y_UP_TO_Z_UP))
    normalise_parts([part], rng)
    return [part]


# ------------------------------------------------------------------------------------------ rendering

def orbit_cameras25(rng, n: int, distance: float = 2.0) -> torch.Tensor:
    az = rng.uniform(0, 2 * math.pi, n)
    el = np.radians(rng.uniform(-20, 55, n))
    pos = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1) * distance
    return build_cameras(look_at_origin(torch.tensor(pos, dtype=torch.float32)), default_intrinsics())


def cast(parts, cam25: torch.Tensor, res: int) -> Tuple[np.ndarray, np.ndarray]:
    """RGBA float image (res, res, 4) of the parts' union seen along the renderer's own rays, and the
    hit distance along each (unit) ray (res, res), 0 where the ray misses."""
    o, d = openlrm_rays(cam25, res)
    o = o.reshape(-1, 3).double().numpy()
    d = d.reshape(-1, 3).double().numpy()
    best_t = np.full(len(o), np.inf)
    rgb = np.ones((len(o), 3))
    for part in parts:
        tri, ray, loc = part.mesh.ray.intersects_id(o, d, multiple_hits=False, return_locations=True)
        if len(ray) == 0:
            continue
        t = ((loc - o[ray]) * d[ray]).sum(1)
        closer = t < best_t[ray]
        tri, ray, loc, t = tri[closer], ray[closer], loc[closer], t[closer]
        best_t[ray] = t
        n = part.mesh.face_normals[tri]
        n = np.where(((n * d[ray]).sum(1) > 0)[:, None], -n, n)  # light the side the ray sees
        shade = 0.45 + 0.55 * np.clip(n @ LIGHT, 0, 1)
        if isinstance(part, TexturedPart):
            bary = trimesh.triangles.points_to_barycentric(part.mesh.triangles[tri], loc)
            albedo = part.colors(loc, tri, np.clip(bary, 0, 1))
        else:
            albedo = part.color_fn(loc, tri)
        rgb[ray] = albedo * shade[:, None]
    alpha = np.isfinite(best_t).astype(np.float64)
    depth = np.where(np.isfinite(best_t), best_t, 0.0)
    return np.concatenate([rgb, alpha[:, None]], 1).reshape(res, res, 4), depth.reshape(res, res)


def render_object(parts, rng, n_views: int, res: int, input_render: int, input_size: int):
    src = source_view_camera()[None]
    rgba_in, _ = cast(parts, src, input_render)
    u8 = np.clip(np.rint(rgba_in * 255), 0, 255).astype(np.uint8)
    u8[..., :3] = np.where(u8[..., 3:] > 0, u8[..., :3], 255)
    pixels = composite_resize_bicubic(u8, input_size, 1.0)[0]  # the runtime's OpenLRM preprocessing
    cams = torch.cat([src, orbit_cameras25(rng, n_views - 1)])
    views, depths = zip(*(cast(parts, c, res) for c in cams))
    return pixels.numpy(), np.stack(views), np.stack(depths), cams.numpy()


def save_gt(parts, path: Path):
    """Ground-truth geometry for evaluation: each part's vertices/faces (union = any part)."""
    arrays = {}
    for i, p in enumerate(parts):
        arrays[f"v{i}"] = np.asarray(p.mesh.vertices, np.float32)
        arrays[f"f{i}"] = np.asarray(p.mesh.faces, np.int32)
    np.savez_compressed(path, **arrays)


def occupancy_samples(parts, rng, n_near: int, n_uniform: int) -> Tuple[np.ndarray, np.ndarray]:
    """Points in the box and whether each lies inside the object (1), outside (0) or unknown (-1: a part that
    is not watertight, e.g. some textured assets). Most points sit near the surface, where the mesh is decided
    (noise 0.02 or 0.06, around tau = 0.05), the rest uniform in [-1, 1]^3 against floaters."""
    meshes = [p.mesh for p in parts]
    areas = np.array([m.area for m in meshes])
    counts = rng.multinomial(n_near, areas / areas.sum())
    surf = np.concatenate([trimesh.sample.sample_surface(m, int(c), seed=rng)[0] for m, c in zip(meshes, counts) if c])
    sigma = np.where(np.arange(n_near) % 2 == 0, 0.02, 0.06)[:, None]
    pts = np.concatenate([surf + rng.normal(size=surf.shape) * sigma, rng.uniform(-1, 1, (n_uniform, 3))])
    pts = np.clip(pts, -1, 1)
    if not all(m.is_watertight for m in meshes):
        return pts, np.full(len(pts), -1, np.int8)
    return pts, points_inside([(m.vertices, m.faces) for m in meshes], pts).astype(np.int8)  # union of parts


def build_split(name, objects, args, rng, gt_dir=None):
    t0 = time.time()
    pix, views, depths, cams, labels, occ_pts, occ = [], [], [], [], [], [], []
    # its own stream per split, so adding occupancy samples leaves every object and view of a seed unchanged
    occ_rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
    n = 0
    for i, (label, parts) in enumerate(objects):
        n += 1
        p, v, d, c = render_object(parts, rng, args.views, args.res, args.input_render, args.input_size)
        pix.append(p.astype(np.float16))
        views.append(np.clip(np.rint(v * 255), 0, 255).astype(np.uint8))
        depths.append(d.astype(np.float16))
        cams.append(c.astype(np.float32))
        labels.append(label)
        if args.occupancy:
            pts, inside = occupancy_samples(parts, occ_rng, args.occupancy, args.occupancy // 2)
            occ_pts.append(pts.astype(np.float16))
            occ.append(inside)
        if gt_dir is not None:
            save_gt(parts, gt_dir / f"{name}_{i:04d}.npz")
    extra = {"occ_points": np.stack(occ_pts), "occ": np.stack(occ)} if args.occupancy else {}
    np.savez(DATA_DIR / f"{name}.npz", pixels=np.stack(pix), views=np.stack(views), depths=np.stack(depths),
             cams=np.stack(cams), labels=np.array(labels), **extra)
    # how it was made, beside it (one file per split: parallel runs writing one shared record would race)
    (DATA_DIR / f"{name}.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    print(f"{name}: {n} objects in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-shapes", type=int, default=1500)
    ap.add_argument("--n-val-shapes", type=int, default=40)
    ap.add_argument("--mesh-instances", type=int, default=60, help="random poses/scales per training mesh")
    ap.add_argument("--val-mesh-instances", type=int, default=3)
    ap.add_argument("--views", type=int, default=5, help="supervision views per object (source view included)")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--input-render", type=int, default=224)
    ap.add_argument("--input-size", type=int, default=INFER["source_size"],
                    help="input view size after the runtime's preprocessing (the model's source_size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--occupancy", type=int, default=1024,
                    help="near-surface points per object with inside/outside labels (plus half as many uniform "
                         "ones), for train.py's --occupancy-weight; 0: none")
    ap.add_argument("--splits", default="train,val,tune",
                    help="comma-separated subset of train,val,tune,tune_shapes (tune_shapes: --n-tune-shapes more "
                         "procedural objects of the training distribution, for comparing checkpoints)")
    ap.add_argument("--n-tune-shapes", type=int, default=60)
    ap.add_argument("--train-name", default="train", help="file name (under training/data/) of the training split")
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = set(args.splits.split(","))
    unknown = splits - {"train", "val", "tune", "tune_shapes"}
    if unknown:
        sys.exit(f"--splits: unknown {', '.join(sorted(unknown))} (train, val, tune, tune_shapes)")
    need = set(HELDOUT_MESHES) if "val" in splits else set()  # only what is used: a GPU machine gets a copy
    if splits & {"train", "tune"}:
        need |= {n for n in MESH_FILES if n not in HELDOUT_MESHES}
    absent = [n for n in sorted(need) if not (MESH_DIR / n / MESH_FILES[n]).is_file()]
    if absent:
        sys.exit(f"the meshes {', '.join(absent)} are not in {MESH_DIR}: put the shared data beside the checkout "
                 "(../shared) or set LRM_RT_SHARED")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    gt_dir = DATA_DIR / "gt"
    gt_dir.mkdir(exist_ok=True)
    assets = {n: load_asset(n) for n in MESH_FILES if n in need}

    rng = np.random.default_rng(args.seed)
    if "train" in splits:
        # generators: objects are built one at a time, rendered and dropped
        train = itertools.chain((("shape", procedural_object(rng)) for _ in range(args.n_shapes)),
                                ((n, mesh_object(assets[n], rng)) for n in MESH_FILES if n not in HELDOUT_MESHES
                                 for _ in range(args.mesh_instances)))
        build_split(args.train_name, train, args, rng)
    vrng = np.random.default_rng(args.seed + 1000)  # separate stream: held-out shapes never seen in training
    if "val" in splits:
        build_split("val_shapes", [("shape", procedural_object(vrng)) for _ in range(args.n_val_shapes)],
                    args, vrng, gt_dir)
        build_split("val_meshes", [(n, mesh_object(assets[n], vrng)) for n in HELDOUT_MESHES
                                   for _ in range(args.val_mesh_instances)], args, vrng, gt_dir)
    if "tune" in splits:
        # fresh objects of the *training* distribution, for choosing the mesh threshold without the val sets
        trng = np.random.default_rng(args.seed + 2000)
        tune = [("shape", procedural_object(trng)) for _ in range(12)]
        tune += [(n, mesh_object(assets[n], trng)) for n in MESH_FILES if n not in HELDOUT_MESHES]
        build_split("tune", tune, args, trng, gt_dir)
    if "tune_shapes" in splits:  # its own stream, disjoint from every split above
        srng = np.random.default_rng(args.seed + 3000)
        build_split("tune_shapes", [("shape", procedural_object(srng)) for _ in range(args.n_tune_shapes)],
                    args, srng, gt_dir)


if __name__ == "__main__":
    main()
