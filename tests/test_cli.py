"""End to end through the command line: the fixture checkpoints in their published layouts -> the
reference's own meshes, and the errors bad input must give."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh

from lrm_rt.cli import main

CKPTS = ["triposr-tiny", "openlrm-tiny-1.1", "openlrm-tiny-1.0"]


def _nn_dist(a, b):
    from scipy.spatial import cKDTree

    return cKDTree(b).query(a)[0]


@pytest.mark.parametrize("name", CKPTS)
def test_reconstruct_matches_reference_mesh(name, fixtures_dir, tmp_path):
    d = fixtures_dir / "checkpoints" / name
    expected = json.loads((d / "expected.json").read_text())
    rc = main(["reconstruct", str(d / "input.png"), "--model", str(d), "--mc-resolution", "64",
               "--out", str(tmp_path), "--format", "ply", "--quiet", "--precision", "fp32"])
    assert rc == 0
    ours = trimesh.load(tmp_path / "input.ply", process=False)
    ref = trimesh.load(d / "expected_mesh_mc64.ply", process=False)
    # Face counts are library independent (fixtures README §9); OpenLRM v1.1 has grid values within
    # 2e-6 of the level at 64^3, so allow a few faces there.
    slack = 0 if name == "triposr-tiny" else 8
    assert abs(len(ours.faces) - expected["num_faces"]) <= slack
    # Vertices are the edge crossings: the same positions up to float rounding, whatever the MC table.
    assert _nn_dist(ours.vertices, ref.vertices).max() < 1e-4
    assert _nn_dist(ref.vertices, ours.vertices).max() < 1e-4
    np.testing.assert_allclose(ours.bounds, np.array([expected["bbox_min"], expected["bbox_max"]]), atol=1e-4)
    assert abs(ours.area - expected["surface_area"]) / expected["surface_area"] < 1e-3
    # Vertex colours at the nearest reference vertex: uint8 within rounding.
    from scipy.spatial import cKDTree

    idx = cKDTree(ref.vertices).query(ours.vertices)[1]
    diff = np.abs(ours.visual.vertex_colors[:, :3].astype(int) - ref.visual.vertex_colors[idx, :3].astype(int))
    assert diff.max() <= 1


def test_cli_mesh_formats_are_the_writers_formats():
    # the CLI spells them out to start without torch; a format added to one side only would be refused or untested
    from lrm_rt import cli, mesh

    assert cli.MESH_FORMATS == mesh.FORMATS


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_other_formats(fixtures_dir, tmp_path, fmt):
    import os

    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    old_umask = os.umask(0o022)
    try:
        rc = main(["reconstruct", str(d / "input.png"), "--model", str(d), "--mc-resolution", "32",
                   "--out", str(tmp_path), "--format", fmt, "--quiet", "--render-views", "1",
                   "--render-size", "16"])
    finally:
        os.umask(old_umask)
    assert rc == 0
    m = trimesh.load(tmp_path / f"input.{fmt}", force="mesh", process=False)
    assert len(m.faces) > 0
    assert (tmp_path / f"input.{fmt}").stat().st_mode & 0o044  # readable by others (not mkstemp's 0600)
    assert (tmp_path / "input_view000.png").is_file()


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lrm_rt.cli", *args], capture_output=True, text=True)


def test_bad_image_gives_one_line_error_and_writes_nothing(fixtures_dir, tmp_path):
    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    bad = tmp_path / "bad.png"
    bad.write_bytes((d / "input.png").read_bytes()[:500])
    out = tmp_path / "out"
    r = _run_cli("reconstruct", str(d / "input.png"), str(bad), "--model", str(d), "--out", str(out),
                 "--mc-resolution", "16")
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "bad.png" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("model,pattern", [("no-such-model", "unknown model"),
                                           ("{tmp}", "no model config")])
def test_bad_model_errors(fixtures_dir, tmp_path, model, pattern):
    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    r = _run_cli("reconstruct", str(d / "input.png"), "--model", model.format(tmp=tmp_path),
                 "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and pattern in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_info_runs():
    r = _run_cli("info")
    assert r.returncode == 0 and "torch" in r.stdout


def _main_rc(argv):
    """Exit status of main(argv), argparse's own errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("extra,pattern", [
    (["--threads", "-1"], "--threads"),
    (["--render-views", "1", "--render-size", "-5"], "--render-size"),
    (["--foreground-ratio", "1e-9"], "foreground_ratio"),
    (["--foreground-ratio", "nan"], "--foreground-ratio"),
    (["--device", "foo"], "unknown device"),
    (["--device", "meta"], "unknown device"),
    (["--mc-resolution", "1"], "--mc-resolution"),
    (["--mc-threshold", "nan"], "--mc-threshold"),
    (["--mc-threshold", "-1e3", "--mc-resolution", "1"], "--mc-resolution"),  # -1e3 is the threshold's value
    (["--render-size", "64"], "add --render-views N"),
    (["--texture", "examples/chair.png"], "put it after the images"),
    (["--texture", "32"], "--texture: must be in [64, 8192], got 32"),
    (["--out", ""], "--out"),
])
def test_bad_options_are_refused_with_one_line(fixtures_dir, tmp_path, capsys, extra, pattern):
    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    rc = _main_rc(["reconstruct", str(d / "input.png"), "--model", str(d), "--out", str(tmp_path / "o"),
                   "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and pattern in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_output_path_problems_fail_before_any_work(fixtures_dir, tmp_path, capsys, monkeypatch):
    from lrm_rt.pipeline import Reconstructor

    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    monkeypatch.setattr(Reconstructor, "reconstruct", lambda *a, **k: pytest.fail("reconstructed anyway"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(afile, "exists and is not a directory"), (afile / "sub", "cannot create output directory"),
             (tmp_path / "mesh.stl", "cannot write .stl files; mesh formats are .glb, .obj, .ply"),  # not a folder
             (tmp_path / "MESH.GLTF", "cannot write .gltf files"),
             (tmp_path / ("a" * 300), "cannot create output directory")]  # name too long: no raw OSError
    for out, pattern in cases:
        rc = main(["reconstruct", str(d / "input.png"), "--model", str(d), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and pattern in err and "Errno" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    (tmp_path / "v1.stl").mkdir()  # an existing folder is a folder, whatever its name
    monkeypatch.undo()
    assert main(["reconstruct", str(d / "input.png"), "--model", str(d), "--out", str(tmp_path / "v1.stl"),
                 "--mc-resolution", "16", "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "v1.stl").iterdir()] == ["input.glb"]


def test_out_may_name_the_mesh_file(fixtures_dir, tmp_path, capsys):
    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    args = ["--model", str(d), "--mc-resolution", "32", "--quiet"]
    assert main(["reconstruct", str(d / "input.png"), "--out", str(tmp_path / "m" / "mesh.obj"), *args]) == 0
    assert len(trimesh.load(tmp_path / "m" / "mesh.obj", force="mesh", process=False).faces) > 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["mesh.obj"]
    assert main(["reconstruct", str(d / "input.png"), "--out", str(tmp_path / "m" / "Mesh.PLY"), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["Mesh.PLY", "mesh.obj"]  # the name as given
    rc = main(["reconstruct", str(d / "input.png"), str(d / "input.png"), "--out", str(tmp_path / "x.glb"), *args])
    assert rc == 2 and "names one mesh file but 2 images" in capsys.readouterr().err


def test_folders_stand_for_their_images_and_only_model_inputs_are_held(fixtures_dir, tmp_path, capsys, monkeypatch):
    """A batch run over a folder: its image files in name order (other files skipped); every image is preprocessed
    before any reconstruction, keeping only the model inputs (the framed full-size copies of a large photo are
    ~100 MB each)."""
    import shutil

    from lrm_rt.pipeline import Reconstructor

    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("b.png", "a.PNG"):
        shutil.copy(d / "input.png", folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder named like an image is not one
    seen = []
    real = Reconstructor.reconstruct

    def spy(self, image, **kw):
        seen.append((image.framed_rgba, image.display_rgb))
        return real(self, image, **kw)
    monkeypatch.setattr(Reconstructor, "reconstruct", spy)
    args = ["--model", str(d), "--mc-resolution", "32", "--quiet", "--out", str(tmp_path / "out")]
    assert main(["reconstruct", str(folder), *args]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.glb", "b.glb"]
    assert seen == [(None, None), (None, None)]
    (tmp_path / "empty").mkdir()
    assert main(["reconstruct", str(tmp_path / "empty"), *args]) == 2
    assert "folder" in capsys.readouterr().err


def test_output_names_never_collide():
    from lrm_rt.cli import _unique_names

    assert _unique_names(["a/chair.png", "b/chair.png", "chair_2.png", "c/chair.jpg"]) == \
        ["chair", "chair_2", "chair_2_2", "chair_3"]


def test_allocation_failure_in_torch_reads_as_out_of_memory(fixtures_dir, tmp_path, capsys, monkeypatch):
    from lrm_rt.pipeline import Reconstructor

    def fail(*a, **k):  # what torch raises when malloc fails (RuntimeError, not MemoryError)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Reconstructor, "reconstruct", fail)
    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    rc = main(["reconstruct", str(d / "input.png"), "--model", str(d), "--out", str(tmp_path / "o" / "p"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: out of memory") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # the directories made for the run are gone again


def test_torch_field_backend_checks_grid_memory_first(fixtures_dir, tmp_path, capsys):
    # 4096^3 floats are 256 GiB: refused from the memory check, before torch tries to allocate them.
    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    rc = main(["reconstruct", str(d / "input.png"), "--model", str(d), "--out", str(tmp_path), "--quiet",
               "--field-backend", "torch", "--mc-resolution", "4096"])
    err = capsys.readouterr().err
    assert rc == 2 and "4096^3 density grid needs" in err, err


def test_python_api_validates_its_arguments(fixtures_dir, tmp_path):
    from PIL import Image

    from lrm_rt.errors import ConfigError
    from lrm_rt.pipeline import Reconstructor

    d = fixtures_dir / "checkpoints" / "triposr-tiny"
    with pytest.raises(ConfigError, match="threads"):
        Reconstructor(str(d), threads=0)
    with pytest.raises(ConfigError, match="unknown device"):
        Reconstructor(str(d), device="meta")
    with pytest.raises(ConfigError, match="model must be"):
        Reconstructor(None)
    rec = Reconstructor(str(d))
    for bad in ({"mc_resolution": 64.5}, {"mc_resolution": 0}, {"render_size": 0, "render_views": 1},
                {"render_views": -1}):
        with pytest.raises(ConfigError):
            rec.reconstruct(str(d / "input.png"), **bad)
    with pytest.raises(ConfigError, match="file path, a PIL image"):
        rec.preprocess(b"not an image")
    # A PIL image is accepted and means the same as its file.
    from_pil = rec.preprocess(Image.open(d / "input.png"))
    torch_equal = (from_pil.pixel_values == rec.preprocess(str(d / "input.png")).pixel_values).all()
    assert bool(torch_equal)
    res = rec.reconstruct(str(d / "input.png"), mc_resolution=16)
    with pytest.raises(ConfigError, match="plain file name"):
        rec.save(res, tmp_path, "../escape")
    assert not (tmp_path.parent / "escape.glb").exists()


@pytest.mark.parametrize("level,advice", [("1e9", "the density stays below the level 1e+09 everywhere (highest"),
                                          ("0", "the density is above the level 0 everywhere in the box (lowest")])
def test_empty_mesh_says_which_way_to_move_the_level(fixtures_dir, tmp_path, capsys, level, advice):
    d = fixtures_dir / "checkpoints" / "openlrm-tiny-1.1"
    for extra in ([], ["--texture", "64"], ["--faces", "100"]):
        rc = _main_rc(["reconstruct", str(d / "input.png"), "--model", str(d), f"--mc-threshold={level}",
                       "--mc-resolution", "16", "--out", str(tmp_path / "o"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and f"error: the mesh is empty: {advice}" in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o").exists()


def test_python_api_takes_rgb_and_grey_arrays_and_plain_names(fixtures_dir, tmp_path):
    """A numpy RGB or grey image works like the same PIL image; save(name="chair.glb", fmt="GLB") writes chair.glb;
    an empty mesh says why in the result's warnings, before save refuses it."""
    from PIL import Image

    from lrm_rt.pipeline import Reconstructor

    d = fixtures_dir / "checkpoints" / "openlrm-tiny-1.1"
    rec = Reconstructor(str(d))
    rgb = np.asarray(Image.open(d / "input.png").convert("RGB"))
    for arr, pil in ((rgb, Image.fromarray(rgb)), (rgb[..., 0], Image.fromarray(rgb[..., 0]))):
        a = rec.preprocess(arr).pixel_values
        assert torch.equal(a, rec.preprocess(pil).pixel_values)
    res = rec.reconstruct(rgb, mc_resolution=16)
    assert [p.name for p in rec.save(res, tmp_path, "chair.glb", fmt="GLB")] == ["chair.glb"]
    empty = rec.reconstruct(rgb, mc_resolution=16, mc_threshold=1e9)
    assert empty.mesh.num_faces == 0 and any("the mesh is empty: the density stays below" in w for w in empty.warnings)


def test_thread_counts_are_capped_at_the_processor_count():
    """--threads 600 under a memory limit ended the process from inside libgomp ("Thread creation failed") with
    no error line: torch gets at most one thread per processor, as the native kernels do."""
    import os

    import torch

    from lrm_rt.kernels import usable_cpus
    from lrm_rt.pipeline import set_torch_threads

    assert usable_cpus() == len(os.sched_getaffinity(0))  # the affinity mask (taskset, cpusets), not the machine
    before = torch.get_num_threads()
    try:
        set_torch_threads(600)
        assert torch.get_num_threads() == usable_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("option,value", [("--check-batch", "100000"), ("--max-batch", "0")])
def test_export_batch_sizes_are_bounded(fixtures_dir, tmp_path, capsys, option, value):
    """--check-batch 100000 ran the validation until the kernel's OOM killer ended it at 24 GB."""
    rc = _main_rc(["export", "--model", str(fixtures_dir / "checkpoints" / "triposr-tiny"), "--out",
                   str(tmp_path / "x"), option, value])
    err = capsys.readouterr().err
    assert rc == 2 and f"argument {option}: must be in [1," in err and not (tmp_path / "x").exists(), err


def test_python_api_refuses_values_of_the_wrong_kind(fixtures_dir, tmp_path):
    """Python callers get one ConfigError / ImageError naming the argument, as the CLI's users do: a list or string
    threshold (TypeError in marching cubes), a string ratio (TypeError in PreprocessConfig), vertex_colors="no"
    (counted as true), a render size with no views (ignored), save names that are not plain strings (TypeError,
    "embedded null byte"), a file name too long for the file system (a raw OSError)."""
    from lrm_rt.errors import ConfigError, ImageError
    from lrm_rt.pipeline import Reconstructor

    d = fixtures_dir / "checkpoints" / "openlrm-tiny-1.1"
    rec = Reconstructor(str(d))
    img = str(d / "input.png")
    for kwargs, pattern in [({"mc_threshold": [1.0]}, "mc_threshold must be a finite number"),
                            ({"mc_threshold": "3"}, "mc_threshold must be a finite number"),
                            ({"mc_threshold": 10**400}, "mc_threshold must be a finite number"),  # OverflowError
                            ({"foreground_ratio": "0.5"}, "foreground_ratio must be in"),
                            ({"vertex_colors": "no"}, "vertex_colors must be True or False"),
                            ({"render_size": 64}, "pass render_views=N")]:
        with pytest.raises(ConfigError, match=re.escape(pattern)):
            rec.reconstruct(img, mc_resolution=16, **kwargs)
    res = rec.reconstruct(img, mc_resolution=16)
    for name in (5, "x\0y", None):
        with pytest.raises(ConfigError, match="output name must be a plain file name"):
            rec.save(res, tmp_path, name)
    with pytest.raises(ImageError, match=r"cannot read image file \(.*\): a{100}\.\.\.a+\.png$") as exc:
        rec.reconstruct("a" * 5000 + ".png")
    assert len(str(exc.value)) < 300  # the OS message names the file too: only its reason is kept
