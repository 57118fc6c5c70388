"""The shipped lrm-tiny model (lrm_rt/models_data/lrm-tiny) and the evaluation metrics (lrm_rt.eval)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from lrm_rt import eval as E
from lrm_rt import models_dir
from lrm_rt.checkpoint import load_model, read_checkpoint_dir
from lrm_rt.models.network import LRMNetwork

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = models_dir() / "lrm-tiny"


@pytest.fixture(scope="module")
def tiny():
    return load_model("lrm-tiny")


def test_published_layout_and_limits():
    for name in ("config.json", "model.safetensors", "infer.yaml", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 50 * 2 ** 20
    cfg, sd = read_checkpoint_dir(MODEL_DIR)
    assert (cfg.family, cfg.version, cfg.input_size) == ("openlrm", "1.1", 128)
    # exactly the keys and shapes of the architecture: nothing extra, nothing missing
    expected = LRMNetwork(cfg).state_dict()
    assert set(sd) == set(expected)
    assert all(sd[k].shape == expected[k].shape for k in sd)


def test_loads_strictly_with_sane_size(tiny):
    n = sum(p.numel() for p in tiny.network.parameters())
    assert 2e6 <= n <= 20e6
    assert tiny.source == "built-in lrm-tiny"
    assert tiny.config.mc_threshold > 0


def test_reconstruct_example_gives_mesh_in_box(tiny):
    from lrm_rt.pipeline import Reconstructor

    torch.manual_seed(0)
    rec = Reconstructor(tiny)
    res = rec.reconstruct(str(REPO / "examples" / "chair.png"), mc_resolution=64)
    m = res.mesh
    assert m.num_faces > 100
    assert np.all(np.abs(m.vertices) <= 1.0 + 1e-5)
    assert m.vertex_colors is not None and np.all((m.vertex_colors >= -0.01) & (m.vertex_colors <= 1.01))


def _sphere(center=(0, 0, 0), radius=0.5):
    s = trimesh.creation.icosphere(3, radius=radius)
    s.apply_translation(center)
    return np.asarray(s.vertices, np.float64), np.asarray(s.faces, np.int64)


def test_mesh_metrics_trivial_cases():
    a = _sphere()
    same = E.mesh_metrics(a, a, n_points=4000, iou_points=4000)
    # the two sides are sampled with different seeds: the Chamfer distance of a mesh to itself is the sampling
    # floor, not 0 (the same seed would pick matching points on meshes triangulated alike)
    assert same.fscore == pytest.approx(1.0) and 0.005 < same.chamfer < 0.02
    assert same.volume_iou == pytest.approx(1.0)
    far = E.mesh_metrics(_sphere((3, 0, 0)), a, n_points=4000, iou_points=4000)
    assert far.fscore < 0.01 and far.volume_iou == 0.0 and far.chamfer > 1.0
    # a slightly larger sphere: close but not identical
    near = E.mesh_metrics(_sphere(radius=0.51), a, n_points=4000, iou_points=20000, normalize="none")
    assert near.fscore > 0.99 and 0.005 < near.chamfer < 0.02 and 0.9 < near.volume_iou < 0.97
    empty = E.mesh_metrics((np.zeros((0, 3)), np.zeros((0, 3), np.int64)), a, n_points=1000)
    assert empty.fscore == 0.0


def test_inside_matches_analytic_solids_and_trimesh():
    box = trimesh.creation.box((0.8, 0.5, 0.3))  # axis-aligned faces and edges: the grazing-ray worst case
    torus = trimesh.creation.torus(0.5, 0.15)
    torus.apply_translation((0.3, 0.0, 0.2))
    parts = [(np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)) for m in (box, torus)]
    box, torus = parts
    pts = np.random.default_rng(0).uniform(-1, 1, (20000, 3))
    pts[:5000] = np.round(pts[:5000] * 10) / 10  # on the box's edge lines and face planes, extended
    in_box = np.all(np.abs(pts) < (0.4, 0.25, 0.15), 1)
    q = pts - (0.3, 0.0, 0.2)
    in_torus = (np.hypot(q[:, 0], q[:, 1]) - 0.5) ** 2 + q[:, 2] ** 2 < 0.15 ** 2
    assert E.is_closed(*box) and E.is_closed(*torus)
    got_box = E.inside([box], pts)
    # points exactly on the box's faces are either; everywhere else the answer is exact
    on_face = np.any(np.isclose(np.abs(pts), (0.4, 0.25, 0.15)), 1)
    np.testing.assert_array_equal(got_box[~on_face], in_box[~on_face])
    # the torus is a polygon approximation: compare away from its surface
    off = np.abs(np.sqrt((np.hypot(q[:, 0], q[:, 1]) - 0.5) ** 2 + q[:, 2] ** 2) - 0.15) > 0.01
    np.testing.assert_array_equal(E.inside([torus], pts)[off], in_torus[off])
    union = E.inside(parts, pts)
    np.testing.assert_array_equal(union[~on_face & off], (in_box | in_torus)[~on_face & off])
    ref = trimesh.Trimesh(*torus, process=False).contains(pts)
    assert (E.inside([torus], pts) == ref).mean() > 0.9995


def test_inside_open_mesh_and_split_seams():
    v, f = _sphere()
    pts = np.random.default_rng(1).uniform(-0.6, 0.6, (5000, 3))
    truth = np.linalg.norm(pts, axis=1) < 0.5
    far = np.abs(np.linalg.norm(pts, axis=1) - 0.5) > 0.02
    # a hole (the cap above z = 0.3 removed): rays through it get the wrong parity; the majority of three
    # orthogonal directions is right more often than any one of them
    holed = (v, f[v[f].mean(1)[:, 2] < 0.3])
    assert not E.is_closed(*holed)
    single = [((E._crossings((v @ r)[holed[1]], pts @ r) % 2 == 1) == truth).mean() for r in E._RAY_FRAMES]
    majority = (E.inside([holed], pts) == truth).mean()
    assert majority > max(single) and majority > 0.98 and min(single) < 0.9
    # UV seams split vertices in files: still closed once welded by position, so still exact
    split = (v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3))
    assert E.is_closed(*split)
    np.testing.assert_array_equal(E.inside([split], pts)[far], truth[far])
    assert not E.inside([(v, f)], np.zeros((0, 3))).size


def test_image_metrics_sanity():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3))
    assert E.ssim(img, img) == pytest.approx(1.0)
    assert E.psnr(img, img) == float("inf")
    assert E.psnr(img, np.clip(img + 0.1, 0, 1)) > E.psnr(img, np.clip(img + 0.2, 0, 1))
    assert E.psnr(np.zeros((8, 8)), np.full((8, 8), 0.1)) == pytest.approx(20.0)
    assert E.ssim(img, rng.random((32, 32, 3))) < 0.1
    assert E.ssim(img, img * 0.9) < 1.0
    mask = np.zeros((16, 16))
    mask[:8] = 1
    assert E.silhouette_iou(mask, mask) == 1.0
    assert E.silhouette_iou(mask, 1 - mask) == 0.0


def test_cli_eval(tmp_path, capsys):
    import json

    from lrm_rt.cli import main

    v, f = _sphere()
    trimesh.Trimesh(v, f).export(tmp_path / "a.ply")
    assert main(["eval", str(tmp_path / "a.ply"), str(tmp_path / "a.ply"), "--points", "2000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fscore"] == pytest.approx(1.0, abs=0.01)  # 2000 independent samples a side: a few gaps > tau
    assert main(["eval", str(tmp_path / "a.ply"), str(REPO / "examples" / "chair.png")]) == 2


def _source_view_silhouettes(tiny, size=48):
    """For each example image: its foreground mask and the model's opacity seen from the input camera."""
    from PIL import Image

    from lrm_rt.pipeline import Reconstructor
    from lrm_rt.render import OpenLRMRenderOptions, openlrm_rays, render_openlrm, source_view_camera

    rec = Reconstructor(tiny)
    rays_o, rays_d = openlrm_rays(source_view_camera(), size)
    opts = OpenLRMRenderOptions(n_coarse=32, n_fine=32)
    masks, renders = [], []
    for name in ("chair.png", "hamburger.png", "mailbox.png", "catstatue_rgba.png"):
        pre = rec.preprocess(str(REPO / "examples" / name))
        alpha = Image.fromarray(pre.framed_rgba[..., 3]).resize((size, size), Image.BILINEAR)
        masks.append(np.asarray(alpha) > 127)
        planes, _ = rec.triplane(pre)
        with torch.no_grad():
            out = render_openlrm(tiny.network.triplane_field(planes), rays_o, rays_d, options=opts)
        renders.append(out.weight.reshape(size, size).numpy() > 0.5)
    return masks, renders


def test_shape_follows_the_input_image(tiny):
    """The shipped model must reconstruct *its* input, not a mean shape: seen from the input camera, each
    example's predicted silhouette overlaps that example's foreground, and better than any other's."""
    masks, renders = _source_view_silhouettes(tiny)
    iou = np.array([[(r & m).sum() / max((r | m).sum(), 1) for m in masks] for r in renders])
    assert np.all(np.diag(iou) >= 0.6), iou.round(2)
    assert np.all(np.argmax(iou, axis=1) == np.arange(len(masks))), iou.round(2)


def test_inputs_are_framed_like_the_training_views(tiny):
    """lrm-tiny's infer.yaml carries the framing of its training views; real photos are recentred to it
    (a published OpenLRM config has no such key and keeps the image as framed)."""
    from lrm_rt.pipeline import Reconstructor, preprocess_config

    assert tiny.config.foreground_ratio == pytest.approx(0.5)
    assert preprocess_config(tiny.config).foreground_ratio == pytest.approx(0.5)
    pre = Reconstructor(tiny).preprocess(str(REPO / "examples" / "mailbox.png"))
    ys, xs = np.nonzero(pre.framed_rgba[..., 3] > 127)
    side = max(np.ptp(ys) + 1, np.ptp(xs) + 1) / pre.framed_rgba.shape[0]
    assert side == pytest.approx(0.5, abs=0.01)
    from lrm_rt.config import NAMED_CONFIGS

    published = NAMED_CONFIGS["openlrm-obj-small-1.1"]
    assert published.foreground_ratio is None and preprocess_config(published).foreground_ratio is None
