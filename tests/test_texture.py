"""UV texture baking (lrm_rt.texture) and mesh simplification (lrm_rt.mesh.simplify): the texture holds the field's
colour where the mesh's uv maps it, the writers carry it into GLB / OBJ, and every failure is a one-line error."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from lrm_rt import texture as T
from lrm_rt.cli import main
from lrm_rt.errors import ConfigError, LrmError
from lrm_rt.eval import bounds_a_volume, is_closed
from lrm_rt.mesh import Mesh, export_mesh, glb_bytes, mesh_files, simplify
from lrm_rt.pipeline import Reconstructor

from conftest import glb_attribute, glb_parts

CHAIR = str(Path(__file__).resolve().parents[1] / "examples" / "chair.png")


@pytest.fixture(scope="module")
def tiny():
    """lrm-tiny on its chair example: a reconstructor, the image's field and its 64³ mesh."""
    rec = Reconstructor("lrm-tiny")
    res = rec.reconstruct(CHAIR, mc_resolution=64)
    return rec, rec.network.triplane_field(res.triplane), res.mesh


def _bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """glTF's lookup: texel (r, c) centred at uv ((c + .5) / W, (r + .5) / H), clamped at the border."""
    h, w = texture.shape[:2]
    x, y = uv[:, 0] * w - 0.5, uv[:, 1] * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    t = texture.astype(np.float64) / 255.0

    def at(r, c):
        return t[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy) + at(y0 + 1, x0) * (1 - fx) * fy
            + at(y0 + 1, x0 + 1) * fx * fy)


RASTERISERS = pytest.mark.parametrize("raster", ["native", "reference"])


@RASTERISERS
def test_rasterise_covers_each_texel_once_with_exact_weights(raster):
    # two triangles tiling the whole uv square: every texel exactly once, weights interpolate its centre
    uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    size = 37
    texel, face, w = T.rasterise(uv, faces, size, raster)
    assert np.array_equal(np.sort(texel), np.arange(size * size))
    centre = np.stack([texel % size + 0.5, texel // size + 0.5], 1) / size
    np.testing.assert_allclose(np.einsum("nk,nkd->nd", w, uv[faces[face]]), centre, atol=1e-6)
    # a texel on the diagonal goes to one face only; a small triangle covers the texels near it, not beyond
    small = np.array([[0.2, 0.2], [0.5, 0.2], [0.2, 0.5]])
    texel, _, w = T.rasterise(small, np.array([[0, 1, 2]]), 100, raster)
    r, c = texel // 100, texel % 100
    assert (w >= 0).all() and np.allclose(w.sum(1), 1)
    assert r.min() >= 19 and c.min() >= 19 and (r + c).max() <= 70  # the hypotenuse x + y = 0.7, plus the margin


def _cross2(u, v):
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


@RASTERISERS
def test_rasterise_matches_brute_force(raster):
    # every texel against every face: kept when within EDGE_MARGIN of all three edge lines of one (and inside its
    # box grown by the margin, which cuts the spikes the grown lines make at a sliver's sharp corners), given to
    # the face it is deepest in
    rng = np.random.default_rng(3)
    size, n = 48, 40
    uv = rng.uniform(-0.05, 1.05, (3 * n, 2))  # some corners outside the texture
    uv[3:] = uv[3:].reshape(-1, 3, 2).mean(1, keepdims=True).repeat(3, 1).reshape(-1, 2) + \
        rng.normal(0, 0.06, (3 * n - 3, 2))  # small triangles, like a chart's
    faces = np.arange(3 * n).reshape(n, 3)
    texel, face, w = T.rasterise(uv, faces, size, raster)
    q = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2) + 0.5  # (x, y) texel centres
    p = uv[faces] * size  # (F, 3, 2)
    dist = np.full((size * size, n), -np.inf)
    for i in range(n):
        a, b, c = p[i]
        area = _cross2(b - a, c - a)
        if abs(area) < 1e-9:
            continue
        edges = [(b, c), (c, a), (a, b)]
        dist[:, i] = np.min([_cross2(v - u, q - u) * np.sign(area) / np.linalg.norm(v - u) for u, v in edges], 0)
        box_lo, box_hi = np.floor(p[i].min(0) - 0.5 - T.EDGE_MARGIN), np.ceil(p[i].max(0) - 0.5 + T.EDGE_MARGIN)
        dist[~np.all((q - 0.5 >= box_lo) & (q - 0.5 <= box_hi), 1), i] = -np.inf
    best = dist.max(1)
    want = np.flatnonzero(best >= -T.EDGE_MARGIN)
    sure = np.abs(best - (-T.EDGE_MARGIN)) > 1e-4  # float32 in the rasteriser: ignore texels on the margin
    assert set(texel[np.isin(texel, want[sure[want]])].tolist()) == set(want[sure[want]].tolist())
    assert not np.isin(texel, np.flatnonzero((best < -T.EDGE_MARGIN) & sure)).any()
    deep = np.sort(dist, 1)
    clear = deep[texel, -1] - deep[texel, -2] > 1e-4  # no near-tie between two faces
    np.testing.assert_array_equal(face[clear], dist[texel[clear]].argmax(1))


def test_native_rasteriser_equals_the_numpy_reference(tiny):
    # cuda/uv_raster.cu (CPU build) rounds every step as numpy does: same texels, faces and weights, bit for bit,
    # on a real atlas and on overlapping, touching and degenerate faces (ties go to the lower face)
    _, _, mesh = tiny
    vmap, faces, uv = T.unwrap(mesh.vertices, mesh.faces, 256)
    rng = np.random.default_rng(5)
    soup = rng.uniform(0.1, 0.9, (300, 2))
    soup[3:6] = soup[0:3]  # the same triangle twice: a tie on every texel
    soup[6:9] = [[0.2, 0.2], [0.4, 0.4], [0.6, 0.6]]  # zero area
    cases = [(uv, faces, 256), (uv, faces, 97), (soup, np.arange(300).reshape(100, 3), 64)]
    for pts, tris, size in cases:
        ref = T.rasterise(pts, tris, size, "reference")
        out = T.rasterise(pts, tris, size, "native")
        assert len(ref[0]) > 0
        for a, b in zip(ref, out):
            np.testing.assert_array_equal(a, b)
    texel, face, _ = T.rasterise(*cases[2][:2], 64, "native")
    assert not np.isin(face, [1, 2]).any()  # the copy and the degenerate face never win


def test_baked_texture_holds_the_field_colour(tiny, caplog, monkeypatch):
    rec, fld, mesh = tiny
    baked = T.bake_texture(mesh, fld, rec.field, 512)
    assert not caplog.records
    monkeypatch.setattr(T, "UNWRAP_WARN_FACES", mesh.num_faces - 1)  # a dense mesh: say unwrapping is slow
    T.bake_texture(mesh, fld, rec.field, 64)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "--faces" in caplog.text
    assert baked.texture.shape == (512, 512, 3) and baked.vertex_colors is None
    assert baked.uv.shape == (baked.num_vertices, 2) and baked.num_faces == mesh.num_faces
    assert 0 <= baked.uv.min() and baked.uv.max() <= 1
    # same surface: every face keeps its corners, only split along uv seams
    np.testing.assert_array_equal(np.sort(baked.vertices[baked.faces].reshape(-1, 9), 0),
                                  np.sort(mesh.vertices[mesh.faces].reshape(-1, 9), 0))
    rng = np.random.default_rng(0)
    f = rng.integers(0, baked.num_faces, 5000)
    w = rng.dirichlet((1, 1, 1), 5000)
    points = np.einsum("nk,nkd->nd", w, baked.vertices[baked.faces[f]]).astype(np.float32)
    looked_up = _bilinear(baked.texture, np.einsum("nk,nkd->nd", w, baked.uv[baked.faces[f]]))
    _, truth = rec.field.query(fld, torch.from_numpy(points))
    err = np.abs(looked_up - truth.numpy()).max(1)
    # 8-bit rounding is 0.002; a texture one texel off gives mean 0.004, p99 0.014
    assert err.mean() < 0.003 and np.quantile(err, 0.99) < 0.01, (err.mean(), np.quantile(err, 0.99))


def test_textured_glb_and_obj(tiny, tmp_path):
    rec, fld, mesh = tiny
    baked = T.bake_texture(mesh, fld, rec.field, 128)
    data = glb_bytes(baked, "y_up")
    doc, _ = glb_parts(data)
    prim = doc["meshes"][0]["primitives"][0]
    assert set(prim["attributes"]) == {"POSITION", "NORMAL", "TEXCOORD_0"}  # no COLOR_0: glTF would multiply it
    assert doc["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"] == {"index": 0}
    assert doc["images"][0]["mimeType"] == "image/png"
    for view in doc["bufferViews"]:
        assert view["byteOffset"] % 4 == 0
    back = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh", process=False)
    np.testing.assert_array_equal(back.faces, baked.faces)
    np.testing.assert_allclose(back.visual.uv[:, 0], baked.uv[:, 0], atol=1e-6)
    np.testing.assert_allclose(back.visual.uv[:, 1], 1 - baked.uv[:, 1], atol=1e-6)  # trimesh keeps OpenGL's v
    np.testing.assert_array_equal(np.asarray(back.visual.material.baseColorTexture)[..., :3], baked.texture)

    path = export_mesh(baked, tmp_path / "chair.obj")
    files = mesh_files(baked, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files) == \
        ["chair.mtl", "chair.obj", "chair_texture.png"]
    obj = trimesh.load(path, force="mesh", process=False)
    assert len(obj.faces) == baked.num_faces
    text = path.read_text()  # smooth normals shared across the UV seams, as in the GLB: "f a/a/a"
    vn = np.array([[float(x) for x in ln.split()[1:]] for ln in text.splitlines() if ln.startswith("vn ")])
    np.testing.assert_allclose(vn, glb_attribute(glb_bytes(baked), "NORMAL"), atol=1e-6)
    assert all(len(set(t.split("/"))) == 1 for ln in text.splitlines() if ln.startswith("f ") for t in ln.split()[1:])
    np.testing.assert_array_equal(np.asarray(obj.visual.material.image)[..., :3], baked.texture)
    with pytest.raises(ConfigError, match="textured mesh is written as glb or obj"):
        export_mesh(baked, tmp_path / "chair.ply")


def test_unwrap_crash_and_missing_packages_are_errors(tiny, monkeypatch, tmp_path, capsys):
    _, _, mesh = tiny
    monkeypatch.setattr(T.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, -11, "", ""))
    with pytest.raises(LrmError, match=r"xatlas\) crashed \(signal 11\).*--faces"):
        T.unwrap(mesh.vertices, mesh.faces, 256)
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)  # neither package installed
    with pytest.raises(LrmError, match="pip install xatlas"):
        T.unwrap(mesh.vertices, mesh.faces, 256)
    with pytest.raises(LrmError, match="pip install fast-simplification"):
        simplify(mesh, 100)
    for option in (["--texture"], ["--faces", "100"]):  # refused before the model loads
        rc = main(["reconstruct", CHAIR, "--model", "no-such-model", "--out", str(tmp_path), "--quiet", *option])
        assert rc == 2 and "pip install" in capsys.readouterr().err


def test_small_faces_get_charts_like_the_rest(tiny):
    """xatlas drops faces under a fixed area epsilon: marching cubes' slivers (0.5 % of the faces) got uv (0, 0)
    and a texel of the fill colour, and a tiny mesh got no chart at all (uv NaN, a black texture, exit 0). The
    mesh is scaled before unwrapping, so every face has a chart of its own area."""
    _, _, mesh = tiny
    for scale in (1.0, 1e-5):  # the chair's mesh as it is, and shrunk to faces of ~1e-13
        vmap, faces, uv = T.unwrap(mesh.vertices * scale, mesh.faces, 256)
        assert np.isfinite(uv).all() and len(vmap) >= len(mesh.vertices)
        a = uv[faces]
        uv_area = np.abs((a[:, 1, 0] - a[:, 0, 0]) * (a[:, 2, 1] - a[:, 0, 1])
                         - (a[:, 1, 1] - a[:, 0, 1]) * (a[:, 2, 0] - a[:, 0, 0]))
        assert (uv_area < 1e-14).sum() == 0


def test_seam_copies_of_a_vertex_share_its_normal(tiny):
    """A textured mesh is split along its UV seams; the copies of a vertex get the normal of the whole surface
    around it, or each seam would show as a shading crease."""
    from lrm_rt.mesh import vertex_normals

    rec, fld, mesh = tiny
    baked = T.bake_texture(mesh, fld, rec.field, 128)
    normals = glb_attribute(glb_bytes(baked), "NORMAL")
    assert len(baked.vertices) > len(mesh.vertices)  # there are seams
    # the unsplit mesh's normal at each copy's position
    _, inverse = np.unique(mesh.vertices.astype(np.float32), axis=0, return_inverse=True)
    first = {}
    for i, k in enumerate(inverse.reshape(-1)):
        first.setdefault(k, i)
    whole = vertex_normals(mesh.vertices, mesh.faces)
    lookup = {tuple(mesh.vertices[i].astype(np.float32)): whole[i] for i in first.values()}
    expected = np.array([lookup[tuple(v)] for v in baked.vertices.astype(np.float32)])
    np.testing.assert_allclose(normals, expected, atol=1e-5)


def test_unusable_atlas_is_an_error_not_a_black_texture(tiny, monkeypatch):
    rec, fld, mesh = tiny
    real = T.unwrap
    monkeypatch.setattr(T, "unwrap", lambda v, f, size: (lambda m: (m[0], m[1], m[2] * 0 + 5.0))(real(v, f, size)))
    with pytest.raises(LrmError, match="cover no texel"):  # every uv outside the texture
        T.bake_texture(mesh, fld, rec.field, 64)

    def nan_atlas(args, **kw):  # what xatlas 0.0.11 returns when it makes no chart: uv divided by a 0 x 0 atlas
        np.savez(args[4], vmap=np.arange(3), faces=np.array([[0, 1, 2]]), uv=np.full((3, 2), np.nan))
        return subprocess.CompletedProcess(args, 0, "", "")
    monkeypatch.setattr(T, "unwrap", real)
    monkeypatch.setattr(T.subprocess, "run", nan_atlas)
    with pytest.raises(LrmError, match="no usable charts"):
        T.unwrap(mesh.vertices, mesh.faces, 64)


@pytest.mark.parametrize("size", [0, 63, 8193, 1.5, True])
def test_bad_texture_sizes(tiny, size):
    rec, fld, mesh = tiny
    with pytest.raises(ConfigError, match="texture size"):
        T.bake_texture(mesh, fld, rec.field, size)


def test_simplify_keeps_a_closed_surface_close_to_the_original(tiny):
    from scipy.spatial import cKDTree

    rec, fld, mesh = tiny
    small = simplify(mesh, 2000)
    assert 1800 <= small.num_faces <= 2000 and small.vertex_colors is None
    assert is_closed(mesh.vertices, mesh.faces) and bounds_a_volume(small.vertices, small.faces)
    # decimation may pinch a thin part (two sheets along one edge), but leaves no doubled faces
    assert len(np.unique(np.sort(small.faces, axis=1), axis=0)) == small.num_faces
    assert np.unique(small.faces).size == len(small.vertices)  # no vertex left unused
    d, _ = cKDTree(mesh.vertices).query(small.vertices)
    assert d.mean() < 0.01 and d.max() < 0.05  # world units; the object spans about 1
    assert simplify(mesh, 10 ** 9) is mesh
    with pytest.raises(ConfigError, match="target face count"):
        simplify(mesh, 3)


def test_simplify_from_two_threads_keeps_each_mesh():
    """fast-simplification keeps global state without the GIL: two threads once got each other's meshes."""
    from concurrent.futures import ThreadPoolExecutor

    meshes = [Mesh(np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int64)) for m in
              (trimesh.creation.icosphere(5), trimesh.creation.capsule(1.0, 0.5, count=[96, 96]))]
    serial = [simplify(m, 2000) for m in meshes]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            for got, want in zip(pool.map(lambda m: simplify(m, 2000), meshes), serial):
                np.testing.assert_array_equal(got.vertices, want.vertices)
                np.testing.assert_array_equal(got.faces, want.faces)


def test_simplify_cancels_doubled_faces():
    from lrm_rt.mesh import _cancel_double_faces

    faces = np.array([[0, 1, 2], [1, 2, 3], [2, 1, 3],  # a membrane: opposite copies cancel
                      [4, 5, 6], [5, 6, 4],  # the same face twice: one stays
                      [7, 8, 9], [9, 8, 7], [8, 7, 9]])  # net one copy facing the majority's way
    np.testing.assert_array_equal(_cancel_double_faces(faces), [[0, 1, 2], [4, 5, 6], [7, 9, 8]])
    np.testing.assert_array_equal(_cancel_double_faces(faces[:2]), faces[:2])  # nothing doubled: unchanged


def test_bounds_a_volume():
    box = trimesh.creation.box()
    v, f = box.vertices, box.faces
    assert bounds_a_volume(v, f) and is_closed(v, f)
    assert not bounds_a_volume(v, f[1:])  # a hole
    assert not bounds_a_volume(v, np.vstack([f[:1, ::-1], f[1:]]))  # one face turned over
    # two boxes sharing one edge: pinched (not 2-manifold) but still the boundary of a volume
    other = trimesh.creation.box(transform=trimesh.transformations.translation_matrix([1, 1, 0]))
    both = trimesh.util.concatenate([box, other])
    assert bounds_a_volume(both.vertices, both.faces) and not is_closed(both.vertices, both.faces)


def test_pipeline_and_cli(tiny, tmp_path, capsys):
    rec, fld, _ = tiny
    res = rec.reconstruct(CHAIR, mc_resolution=64, target_faces=1500)
    m = res.mesh
    assert m.num_faces <= 1500 and m.vertex_colors is not None  # colours queried at the simplified vertices
    _, truth = rec.field.query(fld, torch.from_numpy(m.vertices))
    np.testing.assert_allclose(m.vertex_colors, truth.numpy(), atol=1e-6)
    assert {"simplify", "vertex_colors"} <= set(m.timings)

    out = tmp_path / "o"
    rc = main(["reconstruct", CHAIR, "--out", str(out), "--mc-resolution", "48", "--faces", "800",
               "--texture", "128", "--quiet"])
    assert rc == 0
    doc, _ = glb_parts((out / "chair.glb").read_bytes())
    assert "TEXCOORD_0" in doc["meshes"][0]["primitives"][0]["attributes"]
    assert doc["accessors"][doc["meshes"][0]["primitives"][0]["indices"]]["count"] <= 3 * 800
    rc = main(["reconstruct", CHAIR, "--out", str(tmp_path / "x.ply"), "--texture", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--texture writes glb or obj" in err and not (tmp_path / "x.ply").exists()
    for bad in (["--texture", "32"], ["--faces", "2"]):
        with pytest.raises(SystemExit):
            main(["reconstruct", CHAIR, "--out", str(tmp_path / "y"), *bad, "--quiet"])
