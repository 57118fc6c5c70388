"""The mesh writers (lrm_rt.mesh: GLB, OBJ, PLY): what trimesh reads back, the container rules of glTF 2.0, and the
smooth normals every format carries."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import trimesh

from lrm_rt.mesh import Mesh, export_mesh, glb_bytes, mesh_normals, obj_bytes, ply_bytes, to_trimesh

from conftest import glb_attribute


def _mesh(colors: bool) -> Mesh:
    box = trimesh.creation.icosphere(subdivisions=3)
    rng = np.random.default_rng(0)
    return Mesh(vertices=(box.vertices * [0.5, 0.7, 0.9] + [0.1, -0.2, 0.05]).astype(np.float32),
                faces=box.faces.astype(np.int64),
                vertex_colors=rng.random((len(box.vertices), 3)).astype(np.float32) if colors else None)


def _chunks(data: bytes):
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, total) == (b"glTF", 2, len(data))
    jlen, jtype = struct.unpack_from("<I4s", data, 12)
    assert jtype == b"JSON" and jlen % 4 == 0
    doc = json.loads(data[20:20 + jlen])
    blen, btype = struct.unpack_from("<I4s", data, 20 + jlen)
    assert btype == b"BIN\0" and blen % 4 == 0 and 28 + jlen + blen == len(data)
    return doc, data[28 + jlen:]


@pytest.mark.parametrize("orientation", ["native", "y_up"])
@pytest.mark.parametrize("colors", [True, False])
def test_trimesh_reads_back_the_same_mesh(colors, orientation):
    mesh = _mesh(colors)
    ref = to_trimesh(mesh, orientation)
    back = trimesh.load(io.BytesIO(glb_bytes(mesh, orientation)), file_type="glb", force="mesh", process=False)
    np.testing.assert_array_equal(back.vertices, ref.vertices)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    if colors:
        np.testing.assert_array_equal(back.visual.vertex_colors, ref.visual.vertex_colors)
    assert back.is_watertight


@pytest.mark.parametrize("colors", [True, False])
def test_container_follows_gltf(colors):
    mesh = _mesh(colors)
    doc, binary = _chunks(glb_bytes(mesh, "y_up"))
    assert doc["asset"]["version"] == "2.0"
    assert doc["buffers"] == [{"byteLength": len(binary)}]
    prim = doc["meshes"][0]["primitives"][0]
    assert set(prim["attributes"]) == ({"POSITION", "NORMAL", "COLOR_0"} if colors else {"POSITION", "NORMAL"})
    for acc in doc["accessors"]:
        view = doc["bufferViews"][acc["bufferView"]]
        assert view["byteOffset"] % 4 == 0 and view["byteOffset"] + view["byteLength"] <= len(binary)
    pos_acc = doc["accessors"][prim["attributes"]["POSITION"]]
    view = doc["bufferViews"][pos_acc["bufferView"]]
    pos = np.frombuffer(binary, "<f4", pos_acc["count"] * 3, view["byteOffset"]).reshape(-1, 3)
    assert pos_acc["min"] == pos.min(axis=0).tolist() and pos_acc["max"] == pos.max(axis=0).tolist()
    idx_acc = doc["accessors"][prim["indices"]]
    assert idx_acc["componentType"] == 5125 and idx_acc["count"] == mesh.faces.size


@pytest.mark.parametrize("orientation", ["native", "y_up"])
def test_normals_are_unit_outward_and_rotate_with_the_mesh(orientation):
    """Without normals viewers shade every face flat (a marching-cubes mesh looks faceted); with them, smooth.
    Area-weighted vertex normals (within 3 degrees of trimesh's), rotated like the vertices."""
    mesh = _mesh(True)
    data = glb_bytes(mesh, orientation)
    _chunks(data)  # the container rules
    normals = glb_attribute(data, "NORMAL")
    assert normals.shape == (len(mesh.vertices), 3)
    ref = to_trimesh(mesh, orientation)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)
    assert np.einsum("ij,ij->i", normals, ref.vertex_normals).min() > 0.999  # trimesh weights faces a little otherwise
    centre = ref.vertices.mean(axis=0)
    assert (np.einsum("ij,ij->i", normals, ref.vertices - centre) > 0).all()  # an ellipsoid: all point outward


@pytest.mark.parametrize("orientation", ["native", "y_up"])
@pytest.mark.parametrize("colors", [True, False])
@pytest.mark.parametrize("fmt", ["obj", "ply"])
def test_obj_and_ply_read_back_with_the_glb_normals(fmt, colors, orientation):
    """OBJ and PLY carry the GLB's smooth normals (``vn`` with ``f a//a``; PLY nx ny nz), so viewers shade them
    smooth too; vertices, faces and colours read back as written."""
    mesh = _mesh(colors)
    data = (obj_bytes if fmt == "obj" else ply_bytes)(mesh, orientation)
    back = trimesh.load(io.BytesIO(data), file_type=fmt, process=False)
    ref = to_trimesh(mesh, orientation)
    np.testing.assert_allclose(back.vertices, ref.vertices, atol=1e-7)  # OBJ: 9 significant digits
    np.testing.assert_array_equal(back.faces, mesh.faces)
    if colors:  # OBJ holds the colours as floats, trimesh rounds them back to 8 bits
        assert np.abs(back.visual.vertex_colors.astype(int) - ref.visual.vertex_colors).max() <= (fmt == "obj")
    glb_normals = glb_attribute(glb_bytes(mesh, orientation), "NORMAL")
    if fmt == "ply":
        row = np.dtype([(k, "<f4") for k in ("x", "y", "z", "nx", "ny", "nz")] + [(k, "u1") for k in "rgb"[:3 * colors]])
        rows = np.frombuffer(data, row, len(mesh.vertices), data.index(b"end_header\n") + 11)
        normals = np.stack([rows["nx"], rows["ny"], rows["nz"]], axis=1)
        assert len(data) == data.index(b"end_header\n") + 11 + row.itemsize * len(rows) + 13 * mesh.num_faces
    else:
        lines = data.decode().splitlines()
        normals = np.array([[float(x) for x in ln.split()[1:]] for ln in lines if ln.startswith("vn ")])
        faces = [ln.split()[1:] for ln in lines if ln.startswith("f ")]
        assert all(a == b for face in faces for a, _, b in (t.partition("//") for t in face))
    np.testing.assert_allclose(normals, glb_normals, atol=1e-6)


def test_obj_colours_are_clipped_and_lone_vertices_get_the_c_library_normal():
    """OpenLRM's colours reach -0.001 and 1.001: a channel above 1 makes MeshLab read the row as 0..255 (a white
    vertex turned near black), so the OBJ holds them clipped. A vertex without faces (or a NaN one) gets (0, 0, 1)
    in the written frame, as the C library gives it."""
    mesh = _mesh(True)
    mesh.vertex_colors[0] = (1.001, 0.5, -0.001)
    mesh.vertices = np.concatenate([mesh.vertices, [[0.1, 0.2, 0.3], [np.nan, 0.0, 0.0]]]).astype(np.float32)
    mesh.vertex_colors = np.concatenate([mesh.vertex_colors, np.zeros((2, 3), np.float32)])
    first = next(ln for ln in obj_bytes(mesh).decode().splitlines() if ln.startswith("v "))
    assert [float(x) for x in first.split()[4:]] == [1.0, 0.5, 0.0]
    for orientation in ("native", "y_up"):
        np.testing.assert_array_equal(mesh_normals(mesh, orientation)[-2:], [[0, 0, 1], [0, 0, 1]])


def test_export_writes_the_glb(tmp_path):
    mesh = _mesh(True)
    path = export_mesh(mesh, tmp_path / "m.glb")
    assert path.read_bytes() == glb_bytes(mesh)


def test_export_refuses_special_files_and_names_the_path(tmp_path):
    import os

    from lrm_rt.errors import LrmError

    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.glb"
        os.mkfifo(fifo)
        with pytest.raises(LrmError, match="not a regular file"):
            export_mesh(_mesh(True), fifo)
        assert fifo.exists() and not fifo.is_file()  # left as it was, not replaced by the mesh
    (tmp_path / "adir.glb").mkdir()
    with pytest.raises(LrmError, match="cannot write .*adir.glb"):
        export_mesh(_mesh(True), tmp_path / "adir.glb")
