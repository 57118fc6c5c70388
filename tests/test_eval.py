"""``lrm_rt.eval`` / ``lrm-rt eval`` on bad input: a one-line LrmError naming the file or value, never a
traceback or NaN metrics. (The metrics themselves are tested in test_lrm_tiny.py.)"""
import math

import numpy as np
import pytest
import trimesh

from lrm_rt import eval as E
from lrm_rt.cli import main
from lrm_rt.errors import ConfigError, ImageError, LrmError

SPHERE = (np.asarray(trimesh.creation.icosphere(2).vertices, np.float64),
          np.asarray(trimesh.creation.icosphere(2).faces, np.int64))
TRI = np.array([[0, 1, 2]])


def _write_bad(tmp_path, kind):
    files = {
        "text.obj": b"just some text, not a mesh\n",
        "nofaces.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\n",
        "empty.glb": b"",
        "doc.pdf": b"%PDF-1.4\n%junk\n",
        "badindex.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n",
        "nan.obj": b"v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n",
    }
    path = tmp_path / kind
    path.write_bytes(files[kind])
    return path


@pytest.mark.parametrize("kind", ["text.obj", "nofaces.obj", "empty.glb", "doc.pdf", "badindex.obj", "nan.obj"])
def test_unreadable_mesh_is_a_clear_error(tmp_path, kind, capsys):
    bad = _write_bad(tmp_path, kind)
    with pytest.raises(E.MeshError, match=kind) as exc:
        E.load_mesh(bad)
    assert "\n" not in str(exc.value)
    good = tmp_path / "good.ply"
    trimesh.Trimesh(*SPHERE).export(good)
    for args in ([str(bad), str(good)], [str(good), str(bad)]):
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and kind in err and "Traceback" not in err


def test_non_image_png_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "render.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="render.png"):
        E.load_image01(bad)
    assert main(["eval", str(bad), str(bad)]) == 2
    assert "render.png" in capsys.readouterr().err


def test_ssim_refuses_images_below_its_window():
    img = np.zeros((8, 32, 3))
    with pytest.raises(ImageError, match="11x11"):
        E.ssim(img, img)


@pytest.mark.parametrize("normalize", ["gt", "each", "none"])
def test_degenerate_reference_is_refused(normalize):
    point = (np.ones((3, 3)), TRI)  # every vertex equal: a zero-extent box, no surface
    with pytest.raises(E.MeshError, match="ground-truth"):
        E.mesh_metrics(SPHERE, point, n_points=500, iou_points=500, normalize=normalize)


def test_zero_area_reference_and_degenerate_prediction():
    line = (np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]]), TRI)  # a box of size 2 but no area
    with pytest.raises(E.MeshError, match="surface area"):
        E.mesh_metrics(SPHERE, line, n_points=500, iou_points=500)
    point = (np.ones((3, 3)), TRI)
    with pytest.raises(E.MeshError, match="predicted"):  # its own box cannot be normalised
        E.mesh_metrics(point, SPHERE, n_points=500, iou_points=500, normalize="each")
    # in the gt's frame it is just a bad result, scored like an empty prediction
    m = E.mesh_metrics(point, SPHERE, n_points=500, iou_points=500)
    assert (m.fscore, m.chamfer, m.volume_iou) == (0.0, math.inf, 0.0)


@pytest.mark.parametrize("tau", [0, -0.1, float("nan"), float("inf"), "0.05", None])
def test_bad_tau(tau):
    with pytest.raises(ConfigError, match="tau"):
        E.mesh_metrics(SPHERE, SPHERE, tau=tau, n_points=500, iou_points=500)


@pytest.mark.parametrize("n", [0, -5, 2.5, True, "100", E.MAX_POINTS + 1, 10 ** 9])
def test_bad_point_counts(n):
    with pytest.raises(ConfigError, match="n_points"):
        E.mesh_metrics(SPHERE, SPHERE, n_points=n, iou_points=500)
    with pytest.raises(ConfigError, match="iou_points"):
        E.mesh_metrics(SPHERE, SPHERE, n_points=500, iou_points=n)


def test_cli_bad_options_exit_2(tmp_path, capsys):
    good = tmp_path / "good.ply"
    trimesh.Trimesh(*SPHERE).export(good)
    for opt in (["--tau", "0"], ["--tau", "nan"], ["--points", "0"], ["--points", "1000000000"]):
        try:  # the parser may refuse the value itself (exit 2 via SystemExit), else mesh_metrics does
            rc = main(["eval", str(good), str(good), *opt])
        except SystemExit as exc:
            rc = exc.code
        assert rc == 2, opt
        err = capsys.readouterr().err
        assert "error: " in err and opt[0] in err and "Traceback" not in err
    assert issubclass(E.MeshError, LrmError)


def test_image_eval_output_is_json_and_silhouette_needs_both_alphas(tmp_path, capsys):
    """Identical images: PSNR "inf" (JSON has no Infinity). An opaque render (the RGB novel views the CLI writes)
    has no silhouette: the IoU is left out and said so, not computed against an all-ones alpha. GIF and TIFF are
    images too."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((32, 32)) < 0.5, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "gt.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "view.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "view.tif")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "view.gif")
    assert main(["eval", str(tmp_path / "gt.png"), str(tmp_path / "gt.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["psnr"] == "inf" and out["silhouette_iou"] == 1.0 and out["ssim"] == pytest.approx(1.0)
    for view in ("view.png", "view.tif", "view.gif"):
        assert main(["eval", str(tmp_path / view), str(tmp_path / "gt.png")]) == 0
        captured = capsys.readouterr()
        out = json.loads(captured.out)
        assert "silhouette_iou" not in out and math.isfinite(out["psnr"]), (view, out)
        assert f"silhouette_iou left out: {tmp_path / view} has no alpha channel" in captured.err


def _icosphere(radius=1.0, centre=(0.0, 0.0, 0.0), subdiv=4):
    s = trimesh.creation.icosphere(subdiv, radius)
    return np.asarray(s.vertices, np.float64) + centre, np.asarray(s.faces, np.int64)


def test_parts_are_sampled_in_proportion_to_their_area():
    """A ground truth given as parts is sampled uniformly over the union: a small part gets its share of the
    samples by area, not an equal share (that once made a 2 % part weigh as much as the rest in recall)."""
    big, small = _icosphere(1.0), _icosphere(0.15, (1.6, 0.0, 0.0))
    joined = (np.concatenate([big[0], small[0]]), np.concatenate([big[1], small[1] + len(big[0])]))
    as_parts = E.mesh_metrics(big, [big, small], n_points=8000, iou_points=2000)
    as_one = E.mesh_metrics(big, joined, n_points=8000, iou_points=2000)
    assert as_parts.recall == pytest.approx(as_one.recall, abs=0.01) and as_parts.recall > 0.95
    assert as_parts.chamfer == pytest.approx(as_one.chamfer, rel=0.1)
    assert E._split_by_area([big, small, (np.zeros((0, 3)), np.zeros((0, 3), np.int64))], 1000) == [978, 22, 0]


def test_vertices_no_face_uses_do_not_set_the_boxes():
    v, f = _icosphere()
    stray = (np.concatenate([v, [[10.0, 10.0, 10.0]]]), f)
    ref = E.mesh_metrics((v * 1.05, f), (v, f), n_points=4000, iou_points=4000)
    for gt in [stray]:
        m = E.mesh_metrics((v * 1.05, f), gt, n_points=4000, iou_points=4000)
        assert (m.fscore, m.chamfer, m.volume_iou) == (ref.fscore, ref.chamfer, ref.volume_iou)
    m = E.mesh_metrics(stray, (v, f), n_points=4000, iou_points=4000)
    assert m.volume_iou > 0.9 and m.fscore == pytest.approx(1.0)


def test_non_finite_prediction_is_a_mesh_error():
    v, f = _icosphere(subdiv=2)
    bad = v.copy()
    bad[3] = np.nan
    for normalize in ("gt", "each", "none"):
        with pytest.raises(E.MeshError, match="predicted mesh has non-finite"):
            E.mesh_metrics((bad, f), (v, f), n_points=500, iou_points=500, normalize=normalize)


def test_a_vertex_too_far_to_measure_is_a_mesh_error():
    """A finite vertex at 1e300 overflows its faces' areas: sampling by area failed with numpy's "Probabilities
    contain NaN" (predicted) or called the mesh degenerate (ground truth)."""
    v, f = _icosphere(subdiv=2)
    far = v.copy()
    far[3] = (1e300, 0, 0)
    with pytest.raises(E.MeshError, match="predicted mesh has faces too large to measure"):
        E.mesh_metrics((far, f), (v, f), n_points=500, iou_points=500, normalize="gt")
    with pytest.raises(E.MeshError, match="ground-truth mesh has faces too large to measure"):
        E.mesh_metrics((v, f), (far, f), n_points=500, iou_points=500, normalize="none")


def test_image_metrics_refuse_integer_mismatched_or_nan_images():
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 3))
    with pytest.raises(ImageError, match="floats in \\[0, 1\\].*uint8"):
        E.image_metrics((img * 255).astype(np.uint8), img)
    with pytest.raises(ImageError, match="shapes differ"):
        E.psnr(img, img[..., :1])
    nan = img.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        E.ssim(img, nan)


def test_16_bit_grey_images_keep_their_values(tmp_path):
    from PIL import Image

    grey = np.full((16, 16), 0.4)
    Image.fromarray(np.round(grey * 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.round(grey * 255).astype(np.uint8)).save(tmp_path / "grey8.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")  # Pillow's convert() would clip these values to white
    rgb16, a16 = E.load_image01(tmp_path / "grey16.png")
    rgb8, _ = E.load_image01(tmp_path / "grey8.png")
    assert a16 is None and np.abs(rgb16 - 0.4).max() < 0.003
    assert E.psnr(rgb16, rgb8) > 45


def test_cli_orientation_options_bring_both_meshes_into_one_frame(tmp_path, capsys):
    """A mesh written with --orientation y_up against the same mesh in the native frame: without the option the
    frames differ (a low F-score, no error: no alignment is searched for); with it the meshes coincide."""
    import json

    from lrm_rt.mesh import native_vertices, oriented_vertices

    v, f = _icosphere(subdiv=3)
    v = v * [0.4, 0.7, 1.0]  # an ellipsoid: the frames differ visibly
    np.testing.assert_allclose(native_vertices(oriented_vertices(v, "y_up"), "y_up"), v)
    trimesh.Trimesh(v, f, process=False).export(tmp_path / "native.ply")
    trimesh.Trimesh(oriented_vertices(v, "y_up"), f, process=False).export(tmp_path / "yup.ply")
    common = ["--points", "4000"]
    assert main(["eval", str(tmp_path / "yup.ply"), str(tmp_path / "native.ply"), *common]) == 0
    apart = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "yup.ply"), str(tmp_path / "native.ply"), "--pred-orientation", "y_up",
                 *common]) == 0
    same = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tmp_path / "native.ply"), str(tmp_path / "yup.ply"), "--gt-orientation", "y_up",
                 *common]) == 0
    same_gt = json.loads(capsys.readouterr().out)
    assert apart["fscore"] < 0.7 and same["fscore"] == pytest.approx(1.0) and same_gt["fscore"] == pytest.approx(1.0)
    assert same["volume_iou"] > 0.97
