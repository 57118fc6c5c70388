"""Density grid -> marching cubes -> world-space mesh with vertex colours -> GLB / OBJ / PLY.

Output frame: by default the model's native frame, the same one the reference code writes: z up, the
object in [-r, r]^3 (TripoSR r = 0.87, OpenLRM r = 1). ``orientation="y_up"`` rotates it by -90°
about x into glTF's y-up convention (x, y, z) -> (x, z, -y), identically for every family.
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch

from .errors import ConfigError, LrmError
from .files import chmod_as_open
from .field.base import FieldBackend
from .field.spec import TriplaneField, check_finite_planes

MeshFormat = Literal["glb", "obj", "ply"]
Orientation = Literal["native", "y_up"]
FORMATS = ("glb", "obj", "ply")
TEXTURED_FORMATS = ("glb", "obj")  # PLY has no standard texture reference


@dataclass
class Mesh:
    vertices: np.ndarray  # (V, 3) float32, world units
    faces: np.ndarray  # (F, 3) int64, outward (counter-clockwise seen from outside)
    vertex_colors: Optional[np.ndarray] = None  # (V, 3) float32 in [0, 1]
    timings: Dict[str, float] = field(default_factory=dict)
    uv: Optional[np.ndarray] = None  # (V, 2) float32, texel (r, c) centred at ((c + .5) / W, (r + .5) / H)
    texture: Optional[np.ndarray] = None  # (H, W, 3) uint8 base colour, row 0 at the top (lrm_rt.texture)
    empty_reason: str = ""  # why marching cubes found no surface, when it found none (extract_mesh)

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])


def grid_to_world(vertices: np.ndarray, resolution: int, radius: float) -> np.ndarray:
    """Grid index units -> world: both families use linspace(-r, r, R) grids with endpoints."""
    return (vertices / (resolution - 1) * (2.0 * radius) - radius).astype(np.float32)


def extract_mesh(field_: TriplaneField, backend: FieldBackend, resolution: int, threshold: float,
                 vertex_colors: bool = True, mc_backend: str = "auto") -> Mesh:
    """Evaluate the density grid, run marching cubes at ``threshold`` and colour the vertices."""
    from .mc import marching_cubes

    if resolution < 2:
        raise ConfigError(f"marching-cubes resolution must be >= 2, got {resolution}")
    check_finite_planes(field_.planes)
    t = {}
    t0 = time.perf_counter()
    grid = backend.density_grid(field_, resolution, level=threshold)
    t["density_grid"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verts, faces = marching_cubes(grid, threshold, backend=mc_backend)
    t["marching_cubes"] = time.perf_counter() - t0
    verts = grid_to_world(np.asarray(verts, dtype=np.float64), resolution, field_.spec.radius)
    mesh = Mesh(verts, np.asarray(faces, dtype=np.int64), None, t)
    if mesh.num_faces == 0:
        mesh.empty_reason = empty_mesh_reason(grid, threshold)
    return colour_vertices(mesh, field_, backend) if vertex_colors else mesh


def empty_mesh_reason(grid, threshold: float) -> str:
    """Why a grid has no surface at ``threshold``: which way to move the level (the CLI's --mc-threshold)."""
    hi, lo = float(grid.max()), float(grid.min())
    if hi < threshold:
        return (f"the density stays below the level {threshold:g} everywhere (highest {hi:.4g}): lower the "
                f"marching-cubes threshold")
    if lo >= threshold:
        return (f"the density is above the level {threshold:g} everywhere in the box (lowest {lo:.4g}): raise "
                f"the marching-cubes threshold")
    return f"no surface at the level {threshold:g}"


def empty_mesh_error(mesh: Mesh) -> LrmError:
    return LrmError(f"the mesh is empty: {mesh.empty_reason or 'no surface at this threshold'}")


def colour_vertices(mesh: Mesh, field_: TriplaneField, backend: FieldBackend) -> Mesh:
    """The field's colour at every vertex (in place; returns the mesh)."""
    if mesh.num_vertices:
        t0 = time.perf_counter()
        _, rgb = backend.query(field_, torch.from_numpy(mesh.vertices))
        mesh.vertex_colors = rgb.detach().cpu().float().numpy()
        mesh.timings["vertex_colors"] = time.perf_counter() - t0
    return mesh


# fast-simplification keeps its mesh in global state and releases the GIL: two threads simplifying at once
# get each other's meshes (seen: 27 of 40 results swapped), so one simplification runs at a time.
_SIMPLIFY_LOCK = threading.Lock()


def require_simplifier() -> None:
    if importlib.util.find_spec("fast_simplification") is None:
        raise LrmError("mesh simplification needs fast-simplification: pip install fast-simplification "
                       "(or the project's [texture] extra)")


def simplify(mesh: Mesh, target_faces: int) -> Mesh:
    """Quadric-error decimation to about ``target_faces`` faces (fast-simplification); the result has no colours
    (query them again at its vertices: ``colour_vertices``). A mesh already that small is returned as is."""
    if isinstance(target_faces, bool) or not isinstance(target_faces, (int, np.integer)) or target_faces < 4:
        raise ConfigError(f"target face count must be an integer >= 4, got {target_faces!r}")
    if mesh.num_faces <= target_faces:
        return mesh
    require_simplifier()
    import fast_simplification

    t0 = time.perf_counter()
    with _SIMPLIFY_LOCK:
        verts, faces = fast_simplification.simplify(mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32),
                                                    target_count=int(target_faces))
    verts, faces = _drop_unused_vertices(np.asarray(verts, np.float32), _cancel_double_faces(faces))
    timings = dict(mesh.timings, simplify=time.perf_counter() - t0)
    return Mesh(verts, faces, None, timings)


def _cancel_double_faces(faces: np.ndarray) -> np.ndarray:
    """Decimation leaves a few triangles twice over the same three vertices, facing opposite ways: a
    zero-thickness membrane whose edges each get four faces. Opposite copies cancel in pairs; same-facing
    copies collapse to one."""
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    first = np.argmin(faces, axis=1)  # rotate each face to start at its smallest index: (m, b, c)
    rot = faces[np.arange(len(faces))[:, None], (first[:, None] + np.arange(3)) % 3]
    facing = np.where(rot[:, 1] < rot[:, 2], 1, -1)
    _, group, count = np.unique(np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    if (count == 1).all():
        return faces
    net = np.zeros(len(count), np.int64)
    np.add.at(net, group, facing)
    order = np.argsort(group, kind="stable")
    is_first = np.ones(len(faces), bool)  # keep one face per group, turned the way the net count says
    is_first[order[1:]] = group[order[1:]] != group[order[:-1]]
    keep = is_first & (net[group] != 0)
    out = rot[keep]
    flip = net[group[keep]] * facing[keep] < 0
    out[flip] = out[flip][:, [0, 2, 1]]
    return out


def _drop_unused_vertices(verts: np.ndarray, faces: np.ndarray):
    used, faces = np.unique(faces, return_inverse=True)
    return verts[used], faces.reshape(-1, 3).astype(np.int64)


def oriented_vertices(vertices: np.ndarray, orientation: Orientation) -> np.ndarray:
    if orientation == "native":
        return vertices
    if orientation == "y_up":
        return np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1)
    raise ConfigError(f"unknown orientation {orientation!r} (native or y_up)")


def native_vertices(vertices: np.ndarray, orientation: Orientation) -> np.ndarray:
    """The inverse of ``oriented_vertices``: a mesh written with ``orientation`` back in the native frame."""
    if orientation == "y_up":
        return np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)
    return oriented_vertices(vertices, orientation)


def to_trimesh(mesh: Mesh, orientation: Orientation = "native"):
    import trimesh

    return trimesh.Trimesh(vertices=oriented_vertices(mesh.vertices, orientation), faces=mesh.faces,
                           vertex_colors=_vertex_rgba(mesh), process=False)


def _vertex_rgba(mesh: Mesh) -> Optional[np.ndarray]:
    if mesh.vertex_colors is None:
        return None
    rgb = np.clip(np.rint(mesh.vertex_colors * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals per vertex: the area-weighted mean of its faces' normals, (0, 0, 1) where they cancel."""
    # component arrays throughout: gathers and the cross product written out run ~4x faster than on (N, 3) rows
    vt = np.ascontiguousarray(np.asarray(vertices, np.float32).T)
    ft = np.ascontiguousarray(np.asarray(faces).T)
    (ax, ay, az), (bx, by, bz), (cx, cy, cz) = ([vt[i][ft[k]] for i in range(3)] for k in range(3))
    ux, uy, uz, wx, wy, wz = bx - ax, by - ay, bz - az, cx - ax, cy - ay, cz - az
    fn = (uy * wz - uz * wy, uz * wx - ux * wz, ux * wy - uy * wx)  # length = twice the area: area weighting
    idx = ft.reshape(-1)  # corner-major, as np.tile repeats the face values below
    nx, ny, nz = (np.bincount(idx, np.tile(c, 3), minlength=vt.shape[1]) for c in fn)
    length = np.sqrt(nx * nx + ny * ny + nz * nz)
    inv = 1.0 / np.maximum(length, 1e-300)
    out = np.empty((vt.shape[1], 3), np.float32)
    out[:, 0], out[:, 1], out[:, 2] = nx * inv, ny * inv, nz * inv
    out[np.flatnonzero(~(length > 0))] = (0.0, 0.0, 1.0)  # also NaN (a NaN vertex), as the C library writes
    return out


def mesh_normals(mesh: Mesh, orientation: Orientation = "native") -> np.ndarray:
    """Smooth vertex normals as written to every format (without them viewers shade each face flat). A textured
    mesh is split along its UV seams: the copies of a vertex share one normal, or the seams would shade visibly."""
    # computed in the output frame (the rotation is exact), so a vertex without faces gets (0, 0, 1) there, as in C
    verts = np.ascontiguousarray(oriented_vertices(mesh.vertices, orientation), np.float32)
    if mesh.texture is None:
        return vertex_normals(verts, mesh.faces)
    welded, weld = np.unique(verts.view(np.dtype((np.void, 12))).ravel(), return_inverse=True)
    weld = weld.reshape(-1)
    return vertex_normals(welded.view(np.float32).reshape(-1, 3), weld[mesh.faces])[weld]


def glb_bytes(mesh: Mesh, orientation: Orientation = "native") -> bytes:
    """glTF 2.0 binary: one indexed triangle primitive, POSITION, NORMAL (smooth shading: without normals viewers
    shade every face flat) and either COLOR_0 as RGBA8 or TEXCOORD_0 with the texture as an embedded PNG (base
    colour of an unlit-looking material: metallic 0, roughness 1).

    Written directly from the arrays: trimesh's exporter spent ~30 ms on a 280k-face mesh, a fifth of a
    whole GPU reconstruction. Blocks are padded to multiples of 4 bytes, as the GLB layout requires.
    """
    pos = np.ascontiguousarray(oriented_vertices(mesh.vertices, orientation), dtype="<f4")
    idx = np.ascontiguousarray(mesh.faces, dtype="<u4")
    textured = mesh.texture is not None
    rgba = None if textured else _vertex_rgba(mesh)
    cols = np.ascontiguousarray(pos.T)  # min/max over axis 0 of an (N, 3) array is ~40x slower than over rows
    blocks = [(idx.tobytes(), {"componentType": 5125, "type": "SCALAR", "count": idx.size}, 34963),
              (pos.tobytes(), {"componentType": 5126, "type": "VEC3", "count": len(pos),
                               "min": cols.min(axis=1).tolist(), "max": cols.max(axis=1).tolist()}, 34962)]
    normals = np.ascontiguousarray(mesh_normals(mesh, orientation), dtype="<f4")
    blocks.append((normals.tobytes(), {"componentType": 5126, "type": "VEC3", "count": len(normals)}, 34962))
    attributes = {"POSITION": 1, "NORMAL": 2}
    if rgba is not None:
        blocks.append((rgba.tobytes(), {"componentType": 5121, "normalized": True, "type": "VEC4",
                                        "count": len(rgba)}, 34962))
        attributes["COLOR_0"] = 3
    if textured:
        uv = np.ascontiguousarray(mesh.uv, dtype="<f4")
        blocks.append((uv.tobytes(), {"componentType": 5126, "type": "VEC2", "count": len(uv)}, 34962))
        attributes["TEXCOORD_0"] = 3
        blocks.append((png_bytes(mesh.texture), None, None))
    views, accessors, chunks, offset = [], [], [], 0
    for i, (data, accessor, target) in enumerate(blocks):
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(data)}
        views.append({**view, "target": target} if target else view)  # the image's view has no target
        if accessor is not None:
            accessors.append({"bufferView": i, **accessor})
        chunks.append(data + b"\0" * (-len(data) % 4))
        offset += len(chunks[-1])
    primitive = {"attributes": attributes, "indices": 0, "mode": 4}
    doc = {"asset": {"version": "2.0", "generator": "lrm_rt"}, "scene": 0, "scenes": [{"nodes": [0]}],
           "nodes": [{"mesh": 0}], "meshes": [{"primitives": [primitive]}],
           "accessors": accessors, "bufferViews": views, "buffers": [{"byteLength": offset}]}
    if textured:
        primitive["material"] = 0
        doc["images"] = [{"bufferView": len(blocks) - 1, "mimeType": "image/png"}]
        # linear filtering with mipmaps, clamped: charts are padded, so neighbours never bleed across a seam
        doc["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        doc["textures"] = [{"sampler": 0, "source": 0}]
        doc["materials"] = [{"pbrMetallicRoughness": {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0,
                                                      "roughnessFactor": 1.0}, "doubleSided": False}]
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)  # the JSON chunk is padded with spaces, the BIN chunk with zeros
    total = 12 + 8 + len(text) + 8 + offset
    head = struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(text), b"JSON") + text
    return b"".join([head, struct.pack("<I4s", offset, b"BIN\0"), *chunks])


def textured_obj(mesh: Mesh, mtl_name: str, png_name: str, orientation: Orientation = "native") -> Tuple[bytes, bytes]:
    """OBJ and MTL text of a textured mesh; vertices and uv share one index (the mesh is split along its seams)."""
    uv = np.stack([mesh.uv[:, 0], 1.0 - mesh.uv[:, 1]], axis=1)  # OBJ's v runs upwards
    text = (f"# written by lrm_rt\nmtllib {mtl_name}\nusemtl texture\n"
            + _rows("v %.9g %.9g %.9g\n", oriented_vertices(mesh.vertices, orientation))
            + _rows("vn %.6f %.6f %.6f\n", mesh_normals(mesh, orientation))
            + _rows("vt %.6f %.6f\n", uv)
            + _rows("f %d/%d/%d %d/%d/%d %d/%d/%d\n", np.repeat(mesh.faces + 1, 3, axis=1)))
    mtl = f"newmtl texture\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {png_name}\n"
    return text.encode(), mtl.encode()


def _rows(line: str, values: np.ndarray) -> str:
    """One formatted line per row (a single %-format over the whole array: ~10x faster than a loop of f-strings)."""
    values = np.asarray(values)
    values = values.astype(np.float64) if values.dtype.kind == "f" else values.astype(np.int64)
    return (line * len(values)) % tuple(values.ravel().tolist())


def obj_bytes(mesh: Mesh, orientation: Orientation = "native") -> bytes:
    """OBJ text: ``v x y z [r g b]`` (the common vertex-colour extension, colours in [0, 1]), ``vn`` smooth normals
    and ``f a//a b//b c//c`` faces (1-based)."""
    pos = oriented_vertices(mesh.vertices, orientation)
    if mesh.vertex_colors is None:
        verts = _rows("v %.9g %.9g %.9g\n", pos)
    else:  # clipped: OpenLRM's colours reach 1.001, and a channel above 1 makes readers take the row as 0..255
        rgb = np.clip(mesh.vertex_colors, 0.0, 1.0)
        verts = _rows("v %.9g %.9g %.9g %.6g %.6g %.6g\n", np.concatenate([pos, rgb], axis=1))
    faces = _rows("f %d//%d %d//%d %d//%d\n", np.repeat(mesh.faces + 1, 2, axis=1))
    return ("# written by lrm_rt\n" + verts + _rows("vn %.6f %.6f %.6f\n", mesh_normals(mesh, orientation))
            + faces).encode()


def ply_bytes(mesh: Mesh, orientation: Orientation = "native") -> bytes:
    """Binary little-endian PLY: float x y z, float nx ny nz, uchar red green blue (with vertex colours) and
    triangles as ``list uchar int``."""
    fields = [(k, "<f4") for k in ("x", "y", "z", "nx", "ny", "nz")]
    rgb = _vertex_rgba(mesh)
    if rgb is not None:
        fields += [(k, "u1") for k in ("red", "green", "blue")]
    verts = np.empty(mesh.num_vertices, np.dtype(fields))
    for k, col in zip(("x", "y", "z"), oriented_vertices(mesh.vertices, orientation).T):
        verts[k] = col
    for k, col in zip(("nx", "ny", "nz"), mesh_normals(mesh, orientation).T):
        verts[k] = col
    if rgb is not None:
        for i, k in enumerate(("red", "green", "blue")):
            verts[k] = rgb[:, i]
    faces = np.empty(mesh.num_faces, np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
    faces["n"], faces["i"] = 3, mesh.faces
    props = "".join(f"property {'float' if t == '<f4' else 'uchar'} {k}\n" for k, t in fields)
    header = (f"ply\nformat binary_little_endian 1.0\ncomment written by lrm_rt\nelement vertex {mesh.num_vertices}\n"
              f"{props}element face {mesh.num_faces}\nproperty list uchar int vertex_indices\nend_header\n")
    return header.encode() + verts.tobytes() + faces.tobytes()


def _obj_sidecars(path: Path) -> Tuple[Path, Path]:
    # named after the mesh, so meshes written to one directory never share a material or texture file
    return path.with_suffix(".mtl"), path.parent / f"{path.stem}_texture.png"


def export_mesh(mesh: Mesh, path: Path, fmt: Optional[MeshFormat] = None,
                orientation: Orientation = "native") -> Path:
    """Write atomically (temp file + rename), so a failure never leaves a partial file behind. A textured mesh
    as OBJ also writes ``<stem>.mtl`` and ``<stem>_texture.png`` beside it (``mesh_files`` lists them all)."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()  # type: ignore[assignment]
    if fmt not in FORMATS:
        raise ConfigError(f"unknown mesh format {fmt!r} (choose from {', '.join(FORMATS)})")
    if mesh.num_faces == 0:
        raise empty_mesh_error(mesh)
    if mesh.texture is not None and fmt == "obj":
        mtl, png = _obj_sidecars(path)
        obj_text, mtl_text = textured_obj(mesh, mtl.name, png.name, orientation)
        write_atomic(png, png_bytes(mesh.texture))
        write_atomic(mtl, mtl_text)
        write_atomic(path, obj_text)  # last: once it exists, the files it names do too
        return path
    if mesh.texture is not None and fmt not in TEXTURED_FORMATS:
        raise ConfigError(f"a textured mesh is written as {' or '.join(TEXTURED_FORMATS)}, not {fmt}")
    write_atomic(path, mesh_bytes(mesh, fmt, orientation))
    return path


def mesh_bytes(mesh: Mesh, fmt: MeshFormat, orientation: Orientation = "native") -> bytes:
    """The mesh as one file's bytes (a textured mesh: GLB only, as OBJ it needs its .mtl and .png beside it)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown mesh format {fmt!r} (choose from {', '.join(FORMATS)})")
    if mesh.texture is not None and fmt != "glb":
        raise ConfigError(f"a textured mesh in one file is GLB, not {fmt}")
    return {"glb": glb_bytes, "obj": obj_bytes, "ply": ply_bytes}[fmt](mesh, orientation)


def mesh_files(mesh: Mesh, path: Path, fmt: Optional[MeshFormat] = None) -> List[Path]:
    """Every file ``export_mesh`` writes for this mesh at ``path``."""
    path = Path(path)
    if mesh.texture is not None and (fmt or path.suffix.lstrip(".").lower()) == "obj":
        return [path, *_obj_sidecars(path)]
    return [path]


def write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "a directory of that name exists")
        if path.exists() and not path.is_file():  # the rename below would replace a FIFO or device node
            raise OSError(0, "it exists and is not a regular file")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise LrmError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        chmod_as_open(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, permissions changed under us, ...
            raise LrmError(f"cannot write {path}: {e.strerror or e}") from None
        raise
