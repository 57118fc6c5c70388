"""lrm-rt export: ONNX graphs of the fixture checkpoints match PyTorch (and the reference tensors) in ONNX
Runtime on CPU, the export directory reconstructs the same mesh as the torch path, and broken export
directories give one clear error.

Tolerance 1e-4 max abs (fp32), as tests/test_network.py: the fixtures' fp32 rounding scale is ~1e-6.
"""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lrm_rt.checkpoint import load_model
from lrm_rt.cli import main
from lrm_rt.config import NAMED_CONFIGS
from lrm_rt.errors import BackendError, CheckpointError
from lrm_rt.export import config_from_dict, config_to_dict, export_model, read_manifest
from lrm_rt.onnx_backend import OnnxRuntimeNetworkBackend, make_session

CKPTS = ["triposr-tiny", "openlrm-tiny-1.1", "openlrm-tiny-1.0"]
TOL = 1e-4


@pytest.fixture(scope="module")
def exports(fixtures_dir, tmp_path_factory):
    """Each fixture checkpoint exported once through the CLI."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name in CKPTS:
        d = root / name
        assert main(["export", "--model", str(fixtures_dir / "checkpoints" / name), "--out", str(d), "--quiet"]) == 0
        out[name] = d
    return out


def _io(name, triposr_io, openlrm_io, openlrm_v10_io):
    if name == "triposr-tiny":
        return triposr_io["vit_pixel_values"], None, triposr_io
    if name == "openlrm-tiny-1.1":
        return openlrm_io["image"], openlrm_io["source_camera"], openlrm_io
    return openlrm_v10_io["vit_pixel_values"], openlrm_v10_io["source_camera"], openlrm_v10_io


@pytest.mark.parametrize("name", CKPTS)
def test_export_matches_pytorch_and_reference(name, exports, triposr_io, openlrm_io, openlrm_v10_io):
    d = exports[name]
    man = json.loads((d / "manifest.json").read_text())
    # Built-in validation (batch 2, seeded inputs) recorded in the manifest.
    for key in ("encoder_tokens", "triplane", "triplane_end_to_end"):
        r = man["validation"]["fp32"][key]
        assert r["passed"] and r["max_abs"] < TOL, (key, r)
    assert man["batch"] == {"dynamic": True, "validated_batch": 2}
    assert man["tools"]["opset"] == 17 and "dynamo=False" in man["tools"]["exporter"]
    # Independently: the graphs against the reference implementation's stored tensors.
    pixels, camera, io = _io(name, triposr_io, openlrm_io, openlrm_v10_io)
    tokens = make_session(d / "encoder.onnx", "cpu").run(None, {"pixels": pixels.numpy()})[0]
    assert np.abs(tokens - io["encoder_tokens"].numpy()).max() < TOL
    backend = OnnxRuntimeNetworkBackend(d, providers="cpu", threads=2)
    triplane, timings = backend.run(pixels, camera)
    assert triplane.dtype == torch.float32 and set(timings) == {"encoder", "transformer"}
    assert (triplane - io["triplane"]).abs().max().item() < TOL


@pytest.mark.parametrize("name", CKPTS)
def test_manifest_contents(name, exports, fixtures_dir):
    man = read_manifest(exports[name])
    loaded = load_model(str(fixtures_dir / "checkpoints" / name))
    assert man["_config"] == loaded.config
    assert man["source"]["checkpoint_sha256"] and not man["source"]["random_weights"]
    assert man["input"]["size"] == loaded.config.input_size
    assert man["triplane"]["shape"] == [3, loaded.config.triplane_dim] + [loaded.config.triplane_high_res] * 2
    assert (man["camera"] is None) == (loaded.config.family == "triposr")
    for tool in ("torch", "onnx", "onnxruntime", "exporter", "opset"):
        assert tool in man["tools"]
    # The decoder the kernels need is the network's, bit for bit.
    backend = OnnxRuntimeNetworkBackend(exports[name], providers="cpu")
    w, b = loaded.network.decoder_params()
    assert all(torch.equal(x, y) for x, y in zip(backend.weights + backend.biases, w + b))


@pytest.mark.parametrize("cfg", list(NAMED_CONFIGS.values()), ids=list(NAMED_CONFIGS))
def test_model_config_dict_round_trip(cfg):
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_model_config_dict_rejects_unknown_keys():
    from lrm_rt.errors import ConfigError

    d = config_to_dict(NAMED_CONFIGS["triposr"])
    d["encoder"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        config_from_dict(d)


def _mesh(path):
    import trimesh

    return trimesh.load(path, process=False)


def _chamfer_max(a, b):
    from scipy.spatial import cKDTree

    return max(cKDTree(b).query(a)[0].max(), cKDTree(a).query(b)[0].max())


@pytest.mark.parametrize("name", CKPTS)
def test_reconstruct_from_export_dir_matches_torch(name, exports, fixtures_dir, tmp_path):
    ckpt = fixtures_dir / "checkpoints" / name
    image = str(ckpt / "input.png")
    common = ["--mc-resolution", "64", "--format", "ply", "--quiet"]
    assert main(["reconstruct", image, "--model", str(ckpt), "--network-backend", "torch", "--precision", "fp32",
                 "--out", str(tmp_path / "torch"), *common]) == 0
    # No --network-backend: an export directory runs on ONNX Runtime.
    assert main(["reconstruct", image, "--model", str(exports[name]), "--out", str(tmp_path / "ort"), *common]) == 0
    ref, ours = _mesh(tmp_path / "torch" / "input.ply"), _mesh(tmp_path / "ort" / "input.ply")
    assert len(ours.faces) == len(ref.faces)
    assert _chamfer_max(ours.vertices, ref.vertices) < 1e-4


def test_dynamic_batch(exports, triposr_io):
    backend = OnnxRuntimeNetworkBackend(exports["openlrm-tiny-1.1"], providers="cpu")
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 3, 224, 224, generator=gen)
    batched, _ = backend.run(pixels)
    singles = torch.cat([backend.run(pixels[i:i + 1])[0] for i in range(3)])
    assert batched.shape == (3, 3, 8, 16, 16)
    assert (batched - singles).abs().max().item() < 1e-5
    with pytest.raises(BackendError, match="224"):
        backend.run(torch.zeros(1, 3, 112, 112))


def test_external_data_layout(fixtures_dir, tmp_path):
    """Graphs over the size threshold (2 GB in real use; forced here) keep weights in NAME.onnx.data."""
    loaded = load_model(str(fixtures_dir / "checkpoints" / "triposr-tiny"))
    man = export_model(loaded, tmp_path / "x", external_threshold=0, log=lambda m: None)
    for g in ("encoder", "transformer"):
        assert man["graphs"][g]["external_data"] == f"{g}.onnx.data"
        assert (tmp_path / "x" / f"{g}.onnx.data").stat().st_size > (tmp_path / "x" / f"{g}.onnx").stat().st_size
    assert man["validation"]["fp32"]["triplane"]["max_abs"] < TOL
    OnnxRuntimeNetworkBackend(tmp_path / "x", providers="cpu")
    (tmp_path / "x" / "transformer.onnx.data").unlink()
    with pytest.raises(CheckpointError, match="missing transformer.onnx.data"):
        OnnxRuntimeNetworkBackend(tmp_path / "x", providers="cpu")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lrm_rt.cli", *args], capture_output=True, text=True)


def _broken(exports, tmp_path, how):
    d = tmp_path / "broken"
    shutil.copytree(exports["openlrm-tiny-1.1"], d)
    man_path = d / "manifest.json"
    man = json.loads(man_path.read_text())
    if how == "missing_graph":
        (d / "transformer.onnx").unlink()
    elif how == "format_version":
        man["format_version"] = 99
    elif how == "other_model_version":
        # The manifest of the v1.0 export next to v1.1 graphs: shapes disagree.
        man = json.loads((exports["openlrm-tiny-1.0"] / "manifest.json").read_text())
    elif how == "inconsistent_version":
        man["version"] = "1.0"
    elif how == "no_manifest":
        man_path.unlink()
        return d
    elif how in ("swapped_encoder", "swapped_decoder"):  # a file copied in from another export
        name = "encoder.onnx" if how == "swapped_encoder" else "decoder.safetensors"
        shutil.copy(exports["openlrm-tiny-1.0"] / name, d / name)
    elif how == "null_graph_file":
        man["graphs"]["encoder"]["file"] = None
    elif how == "escaping_path":
        man["graphs"]["encoder"]["file"] = f"../{exports['openlrm-tiny-1.0'].name}/encoder.onnx"
    elif how == "edited_input_size":  # the config no longer matches the graphs it came with
        man["config"]["input_size"] = 112
    elif how == "edited_decoder_hidden":
        man["config"]["decoder_hidden"] += 1
    man_path.write_text(json.dumps(man))
    return d


@pytest.mark.parametrize("how,pattern", [
    ("missing_graph", "incomplete: missing transformer.onnx"),
    ("format_version", "format version 99"),
    ("other_model_version", "decoder.safetensors is not the file this export wrote"),
    ("inconsistent_version", "inconsistent"),
    ("no_manifest", "no manifest.json"),
    ("swapped_encoder", "encoder.onnx is not the file this export wrote"),
    ("swapped_decoder", "decoder.safetensors is not the file this export wrote"),
    ("null_graph_file", "graphs.encoder.file must name a file in the export directory, got None"),
    ("escaping_path", "graphs.encoder.file must name a file in the export directory"),
    ("edited_input_size", "the manifest's model config implies"),
    ("edited_decoder_hidden", "decoder widths [24, 64, 64, 64, 4] do not match the manifest's config [24, 65,"),
])
def test_bad_export_dir_errors(exports, tmp_path, fixtures_dir, how, pattern):
    d = _broken(exports, tmp_path, how)
    with pytest.raises(CheckpointError, match=re.escape(pattern)):
        OnnxRuntimeNetworkBackend(d, providers="cpu")
    # Through the CLI: one error line, no traceback, nothing written.
    r = _cli("reconstruct", str(fixtures_dir / "checkpoints" / "openlrm-tiny-1.1" / "input.png"), "--model", str(d),
             "--out", str(tmp_path / "out"), "--mc-resolution", "16")
    assert r.returncode != 0 and pattern in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,pattern", [
    ({"render_size": 0}, "render_size must be an integer in [8, 4096], got 0"),
    ({"render_size": -5}, "render_size must be an integer in [0, 65536], got -5"),
    ({"samples_per_ray": 0}, "samples_per_ray must be an integer in [8, 1024], got 0"),
    ({"samples_per_ray": 7}, "samples_per_ray must be an integer in [8, 1024], got 7"),
    ({"mc_threshold": "x"}, "mc_threshold must be a finite number, got 'x'"),
    ({"mc_resolution": "64"}, "mc_resolution must be an integer in [0, 65536], got '64'"),
    ({"input_size": 20000}, "input_size must be an integer in [14, 1024], got 20000"),
    ({"background": "x"}, "background must be a finite number, got 'x'"),
    ({"background": 7}, "background must be a grey level in [0, 1], got 7"),
    ({"foreground_ratio": "a"}, "foreground_ratio must be a number in [0.05, 1] or absent, got 'a'"),
    ({"source_cam_dist": 0}, "source_cam_dist must be a distance in (1, 100], got 0"),
    ({"image_mean": [1]}, "image_mean must be three finite numbers (one per RGB channel) or absent, got (1,)"),
    ({"image_std": [1, 1, 0]}, "image_std must be three finite positive numbers"),
    ({"transformer_layers": True}, "transformer_layers must be an integer"),
    ({"encoder": {"depth": "4"}}, "encoder.depth must be an integer"),
    ({"encoder": {"num_heads": 0}}, "encoder.num_heads must be an integer in [1, 65536], got 0"),
    ({"encoder": {"patch_size": 0}}, "encoder.patch_size must be an integer in [1, 65536], got 0"),
    ({"encoder": {"init_values": "x"}}, "encoder.init_values must be a float, got 'x'"),
    ({"foreground_ratio": True}, "foreground_ratio must be a number in [0.05, 1] or absent, got True"),
    ({"name": 5}, "name must be a string, got 5"),
    ({"graphs": [1]}, "graphs must be a mapping, got [1]"),
    ({"decoder": "x"}, "decoder must be a mapping, got 'x'"),
])
def test_manifest_values_are_checked(exports, tmp_path, edit, pattern):
    """Every value of an export's manifest is checked when it is read: a wrong type or range is one
    CheckpointError naming the key (they had failed deep in the renderer, or made a different mesh silently)."""
    d = tmp_path / "edited"
    shutil.copytree(exports["openlrm-tiny-1.1"], d)
    man = json.loads((d / "manifest.json").read_text())
    for key, value in edit.items():
        if key in ("graphs", "decoder"):
            man[key] = value
        elif key == "encoder":
            man["config"]["encoder"].update(value)
        else:
            man["config"][key] = value
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=re.escape(pattern)):
        read_manifest(d)


def test_backend_and_model_kind_must_agree(exports, fixtures_dir, tmp_path):
    img = str(fixtures_dir / "checkpoints" / "triposr-tiny" / "input.png")
    r = _cli("reconstruct", img, "--model", str(exports["triposr-tiny"]), "--network-backend", "torch",
             "--out", str(tmp_path))
    assert r.returncode != 0 and "export directory" in r.stderr and "Traceback" not in r.stderr
    r = _cli("reconstruct", img, "--model", str(fixtures_dir / "checkpoints" / "triposr-tiny"),
             "--network-backend", "onnxruntime", "--out", str(tmp_path))
    assert r.returncode != 0 and "lrm-rt export" in r.stderr and "Traceback" not in r.stderr


def test_validation_failure_is_an_error(fixtures_dir, tmp_path, monkeypatch):
    from lrm_rt.export import onnx_export

    monkeypatch.setattr(onnx_export, "FP32_TOL", 0.0)  # nothing is bit exact: validation must fail
    rc = main(["export", "--model", str(fixtures_dir / "checkpoints" / "triposr-tiny"), "--out", str(tmp_path / "x"),
               "--quiet"])
    assert rc != 0
    with pytest.raises(CheckpointError, match="not an lrm-rt export manifest"):
        read_manifest(tmp_path / "x")


def test_export_refuses_non_empty_foreign_dir(fixtures_dir, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("keep me")
    r = _cli("export", "--model", str(fixtures_dir / "checkpoints" / "triposr-tiny"), "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "not empty" in r.stderr
    assert (tmp_path / "x" / "notes.txt").read_text() == "keep me"


def test_tensorrt_export_without_tensorrt_is_a_clear_error(fixtures_dir, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    r = _cli("export", "--model", str(fixtures_dir / "checkpoints" / "triposr-tiny"), "--out", str(tmp_path / "x"),
             "--tensorrt", "--fp16")
    assert r.returncode != 0 and "TensorRT is not installed" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_full_size_export_random_weights(tmp_path):
    """A released architecture at full size (OpenLRM v1.1 small, random weights) exports and validates."""
    d = tmp_path / "small"
    assert main(["export", "--model", "openlrm-obj-small-1.1", "--random-weights", "--out", str(d),
                 "--check-batch", "1", "--quiet"]) == 0
    man = read_manifest(d)
    assert man["_config"] == NAMED_CONFIGS["openlrm-obj-small-1.1"]
    assert man["source"]["random_weights"] and man["source"]["checkpoint_sha256"] is None
    assert all(r["passed"] for r in man["validation"]["fp32"].values())
    triplane, _ = OnnxRuntimeNetworkBackend(d, providers="cpu").run(torch.rand(1, 3, 224, 224))
    assert triplane.shape == (1, 3, 32, 64, 64)


def test_decoder_file_mode_matches_the_other_files(exports):
    """safetensors creates its file 0600; the export gives it the mode of a plain open(): 0666 & ~umask."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for d in exports.values():
        modes = {f.name: f.stat().st_mode & 0o777 for f in d.iterdir() if f.is_file()}
        assert modes["decoder.safetensors"] == 0o666 & ~umask, modes
        assert len(set(modes.values())) == 1, modes


def test_opset_above_the_exporter_range_is_refused_before_writing(fixtures_dir, tmp_path, capsys):
    from lrm_rt.errors import ConfigError
    from lrm_rt.export.onnx_export import max_opset

    hi = max_opset()
    assert hi is not None and hi >= 17  # the default opset must be exportable
    loaded = load_model(str(fixtures_dir / "checkpoints" / "triposr-tiny"))
    for opset in (hi + 1, 99):
        with pytest.raises(ConfigError, match=rf"--opset {opset} is not supported .*supported: 14\.\.{hi}"):
            export_model(loaded, tmp_path / "x", opset=opset, log=lambda m: None)
        assert not (tmp_path / "x").exists()
    assert main(["export", "--model", str(fixtures_dir / "checkpoints" / "triposr-tiny"), "--out",
                 str(tmp_path / "x"), "--opset", "99", "--quiet"]) == 2
    assert "error: --opset 99" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_opset_rejected_by_the_exporter_itself_is_a_config_error(fixtures_dir, tmp_path, monkeypatch):
    """Where torch's maximum cannot be read, the exporter's own RuntimeError becomes a ConfigError."""
    from lrm_rt.errors import ConfigError
    from lrm_rt.export import onnx_export

    monkeypatch.setattr(onnx_export, "max_opset", lambda: None)
    loaded = load_model(str(fixtures_dir / "checkpoints" / "triposr-tiny"))
    with pytest.raises(ConfigError, match=r"--opset 99 is not supported .*supported: >= 14"):
        export_model(loaded, tmp_path / "x", opset=99, log=lambda m: None)


def test_aoti_device_is_checked_up_front(monkeypatch):
    from lrm_rt.errors import ConfigError
    from lrm_rt.export.aoti import check_aoti_device

    check_aoti_device("cpu")
    with pytest.raises(ConfigError, match="'tpu'"):
        check_aoti_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPU"):
        check_aoti_device("cuda")


def test_chmod_as_open_never_sets_the_umask(tmp_path, monkeypatch):
    """The mode is read from a probe file, not by setting the process umask (umask(0); umask(m) races with
    other threads' file creation, which would get mode 0666). No probe file is left behind."""
    import os

    from lrm_rt.files import chmod_as_open

    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_umask)
        chmod_as_open(f)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_onnxruntime_run_errors_are_one_line(exports):
    backend = OnnxRuntimeNetworkBackend(exports["openlrm-tiny-1.1"], providers="cpu")
    with pytest.raises(BackendError, match="ONNX Runtime failed running the encoder graph of") as exc:
        backend._run("encoder", {"pixels": np.zeros((1, 3, 5, 5), np.float32)})
    assert "\n" not in str(exc.value)


def test_reexport_removes_the_earlier_exports_optional_files(fixtures_dir, tmp_path):
    """An earlier export's fp16 graphs, AOTInductor package and TensorRT engines belong to its weights: a
    re-export into the directory removes them (the timing cache stays), so none can run next to the new graphs."""
    d = tmp_path / "x"
    ck = fixtures_dir / "checkpoints"
    assert main(["export", "--model", str(ck / "openlrm-tiny-1.1"), "--out", str(d), "--fp16", "--quiet"]) == 0
    (d / "network.pt2").write_bytes(b"old package")
    (d / "tensorrt").mkdir()
    for name in ("encoder.fp16.plan", "encoder.fp16.plan.json", "timing.cache"):
        (d / "tensorrt" / name).write_bytes(b"old")
    assert main(["export", "--model", str(ck / "openlrm-tiny-1.0"), "--out", str(d), "--quiet"]) == 0
    assert not list(d.glob("*.fp16.onnx")) and not (d / "network.pt2").exists()
    assert [p.name for p in (d / "tensorrt").iterdir()] == ["timing.cache"]
    assert OnnxRuntimeNetworkBackend(d, providers="cpu").config.version == "1.0"


def test_export_without_onnx_installed_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Without the [onnx] extra the export stops before loading the model or creating --out (it printed a
    ModuleNotFoundError traceback from deep inside and left an empty folder)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    out = tmp_path / "exp"
    assert main(["export", "--model", "lrm-tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lrm-rt export needs onnx and onnxruntime (onnx not installed)")
    assert "pip install" in err
    assert "Traceback" not in err and not out.exists()
