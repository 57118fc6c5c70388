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
