"""Checkpoint layouts and the errors a wrong or damaged checkpoint must produce."""
import json
import shutil

import pytest
import torch

from lrm_rt.checkpoint import load_model, read_checkpoint_dir
from lrm_rt.errors import CheckpointError, ConfigError


@pytest.fixture
def ckpts(fixtures_dir):
    return fixtures_dir / "checkpoints"


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_triposr_reads_vit_config_from_checkpoint_dir(ckpts):
    cfg, _ = read_checkpoint_dir(ckpts / "triposr-tiny")
    assert cfg.encoder.hidden_size == 48 and cfg.encoder.image_size == 112  # ./vit_config.json, not ViT-B/16
    assert cfg.input_size == 256 and cfg.mc_threshold == 25.0


def test_openlrm_v10_reads_kwargs_from_model_pth(ckpts):
    cfg, sd = read_checkpoint_dir(ckpts / "openlrm-tiny-1.0")
    assert cfg.version == "1.0" and cfg.input_size == 224 and cfg.encoder.hidden_size == 48
    assert "transformer.deconv.weight" in sd


def test_openlrm_v11_infer_yaml(ckpts):
    cfg, _ = read_checkpoint_dir(ckpts / "openlrm-tiny-1.1")
    assert cfg.mc_resolution == 64 and cfg.mc_threshold == 3.0 and cfg.input_size == 224


def test_missing_and_mismatched_tensors_listed(ckpts, tmp_path):
    d = _copy(ckpts / "triposr-tiny", tmp_path)
    sd = torch.load(d / "model.ckpt", weights_only=True)
    del sd["backbone.proj_in.weight"]
    sd["decoder.layers.0.weight"] = torch.zeros(3, 3)
    sd["extra.thing"] = torch.zeros(1)
    torch.save(sd, d / "model.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "backbone.proj_in.weight" in msg and "extra.thing" in msg and "decoder.layers.0.weight" in msg
    assert "\n" not in msg


def test_truncated_checkpoint(ckpts, tmp_path):
    for name, fname in [("triposr-tiny", "model.ckpt"), ("openlrm-tiny-1.1", "model.safetensors"),
                        ("openlrm-tiny-1.0", "model.pth")]:
        d = _copy(ckpts / name, tmp_path / name)
        data = (d / fname).read_bytes()
        (d / fname).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load_model(str(d))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no model config"):
        load_model(str(tmp_path))


def test_unknown_model_name():
    with pytest.raises(ConfigError, match=r"unknown model .*\(lrm-tiny, openlrm-"):  # the shipped model listed first
        load_model("no-such-model")


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="(cannot download|huggingface_hub)"):
        load_model("someorg/some-lrm-model-that-is-not-cached")


def test_pickle_with_code_is_refused(ckpts, tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""
    d = _copy(ckpts / "triposr-tiny", tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"x": Evil()}, d / "model.ckpt")
    # the message names what the pickle wanted, not torch's "re-run with weights_only=False" boilerplate
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*refused by weights_only=True.*GLOBAL"):
        load_model(str(d))


def test_fused_and_separate_cross_attention_are_interchangeable(ckpts, tmp_path):
    """Tiny v1.1 has kdim != dim (separate q/k/v); a packed in_proj_weight holding the same numbers loads too."""
    from safetensors.torch import load_file, save_file

    d = _copy(ckpts / "openlrm-tiny-1.1", tmp_path)
    sd = load_file(d / "model.safetensors")
    ref = load_model(str(ckpts / "openlrm-tiny-1.1")).network.state_dict()
    # Only possible to pack when q/k/v have the same shape: emulate a base-like re-save on the self-attn side
    # by splitting the packed self-attention into q/k/v (the reverse direction).
    key = "transformer.layers.0.self_attn.in_proj_weight"
    q, k, v = sd.pop(key).chunk(3)
    base = key[: -len("in_proj_weight")]
    sd.update({base + "q_proj_weight": q, base + "k_proj_weight": k, base + "v_proj_weight": v})
    save_file(sd, d / "model.safetensors")
    net = load_model(str(d)).network
    assert torch.equal(net.state_dict()[key], ref[key])


def test_weights_of_another_model_are_one_checkpoint_error(ckpts, tmp_path):
    """The tiny fixture's weights (separate q/k/v of different widths) under lrm-tiny's config (packed cross-attention):
    the strict check's list, not a torch.cat error from trying to pack them."""
    from lrm_rt import models_dir

    d = _copy(ckpts / "openlrm-tiny-1.1", tmp_path)
    shutil.copy(models_dir() / "lrm-tiny" / "config.json", d / "config.json")
    (d / "infer.yaml").unlink()
    with pytest.raises(CheckpointError, match="does not match its config: .*unexpected: transformer.layers.0.cross"):
        load_model(str(d))


def _set_config(d, layout, key, value):
    """Change one hyper-parameter in the config file of a copied checkpoint directory."""
    import json

    import yaml

    if layout == "openlrm-tiny-1.1":
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    elif layout == "openlrm-tiny-1.0":
        obj = torch.load(d / "model.pth", weights_only=True)
        obj["kwargs"]["model"][key] = value
        torch.save(obj, d / "model.pth")
    else:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        section, name = key.split(".")
        cfg[section][name] = value
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("layout, key, value, pattern", [
    ("openlrm-tiny-1.1", "transformer_heads", 0, r"config.json of openlrm-tiny-1.1: transformer_heads .* got 0"),
    ("openlrm-tiny-1.1", "triplane_dim", -16, r"config.json .*triplane_dim .* got -16"),
    ("openlrm-tiny-1.1", "transformer_heads", 5, r"transformer_dim 48 is not divisible by transformer_heads 5"),
    ("openlrm-tiny-1.1", "triplane_low_res", 0, r"triplane_low_res .* got 0"),
    ("openlrm-tiny-1.0", "transformer_heads", 0, r"model.pth kwargs .*transformer_heads .* got 0"),
    ("openlrm-tiny-1.0", "transformer_dim", -48, r"transformer_dim .* got -48"),
    ("triposr-tiny", "backbone.num_attention_heads", 0, r"config.yaml .*backbone.num_attention_heads .* got 0"),
    ("triposr-tiny", "tokenizer.plane_size", -8, r"tokenizer.plane_size .* got -8"),
    ("triposr-tiny", "tokenizer.num_channels", 48, r"num_channels 48 must be a multiple of 32"),
    ("triposr-tiny", "post_processor.out_channels", 0, r"post_processor.out_channels .* got 0"),
    ("triposr-tiny", "decoder.in_channels", 25, r"decoder.in_channels 25 must be 3 x post_processor.out_channels"),
    ("triposr-tiny", "backbone.num_layers", 10 ** 9, r"backbone.num_layers must be an integer in \[1, 65536\]"),
    ("triposr-tiny", "backbone.num_layers", True, r"backbone.num_layers .* got True"),
    ("openlrm-tiny-1.1", "transformer_dim", 1 << 20, r"transformer_dim must be an integer in \[1, 65536\]"),
    ("triposr-tiny", "renderer.density_bias", 0.0, r"renderer.density_bias 0.0 .* not supported"),
    ("triposr-tiny", "renderer.color_activation", "exp", r"color_activation 'exp' are not supported"),
])
def test_bad_architecture_sizes_are_config_errors(ckpts, tmp_path, layout, key, value, pattern):
    """Zero / negative / indivisible sizes: a ConfigError naming the file and field, not a crash in torch."""
    d = _copy(ckpts / layout, tmp_path)
    _set_config(d, layout, key, value)
    with pytest.raises(ConfigError, match=pattern):
        load_model(str(d))


def test_missing_infer_settings_of_a_non_release_size_warn(caplog):
    """A v1.1 model of no release width (lrm-tiny's 192) without its infer.yaml runs on generic settings:
    say so, since its mesh threshold and input size are then guesses."""
    from lrm_rt.config import openlrm_config

    import json

    from lrm_rt import models_dir

    kwargs = json.loads((models_dir() / "lrm-tiny" / "config.json").read_text())
    with caplog.at_level("WARNING", logger="lrm_rt.config"):
        openlrm_config(kwargs, "1.1", "lrm-tiny-copy")
    assert "lrm-tiny-copy has no infer.yaml" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lrm_rt.config"):
        openlrm_config(kwargs, "1.1", "lrm-tiny", infer={"source_size": 128})
    assert caplog.text == ""


def test_openlrm_v10_normalisation_is_its_encoders(ckpts, tmp_path):
    """v1.0 normalises with its encoder's image processor: facebook/dino-vitb16's maps [0, 1] to [-1, 1] (mean =
    std = 0.5; every v1.0 release), a locally configured ViT takes a preprocessor_config.json beside the checkpoint,
    else ImageNet statistics (the tiny test checkpoint's)."""
    import json

    from lrm_rt.config import named_config

    for name in ("openlrm-small-obj-1.0", "openlrm-base-obj-1.0", "openlrm-large-obj-1.0"):
        cfg = named_config(name)
        assert (cfg.image_mean, cfg.image_std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), name
    cfg, _ = read_checkpoint_dir(ckpts / "openlrm-tiny-1.0")
    assert (cfg.image_mean, cfg.image_std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    d = tmp_path / "v10"
    shutil.copytree(ckpts / "openlrm-tiny-1.0", d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.3] * 3}))
    cfg, _ = read_checkpoint_dir(d)
    assert (cfg.image_mean, cfg.image_std) == ((0.4, 0.5, 0.6), (0.3, 0.3, 0.3))
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5], "image_std": [0.3] * 3}))
    with pytest.raises(CheckpointError, match="3 values each"):
        read_checkpoint_dir(d)


@pytest.mark.parametrize("layout, key, value", [
    ("openlrm-tiny-1.0", "kwargs", ["not", "a", "mapping"]),
    ("triposr-tiny", "renderer", None),
    ("triposr-tiny", "image_tokenizer", "a string"),
])
def test_malformed_configs_are_one_checkpoint_error(ckpts, tmp_path, layout, key, value):
    """A section of the wrong type (a list, a null, a string) is a CheckpointError naming the directory, not an
    AttributeError from the line that reads it."""
    import yaml

    d = _copy(ckpts / layout, tmp_path)
    if layout == "openlrm-tiny-1.0":
        obj = torch.load(d / "model.pth", weights_only=True)
        obj[key] = value
        torch.save(obj, d / "model.pth")
    else:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg[key] = value
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=f"{d.name}: malformed model config or checkpoint contents"):
        load_model(str(d))


@pytest.mark.parametrize("key, value, pattern", [
    ("mesh_thres", "abc", "infer.yaml of .*: mesh_thres must be a finite number, got 'abc'"),
    ("source_cam_dist", -2.0, "source_cam_dist must be a finite positive number, got -2.0"),
    ("source_cam_dist", float("inf"), "source_cam_dist must be a finite positive number, got inf"),
    ("source_cam_dist", 0.5, r"infer.yaml of .*: source_cam_dist must be a distance in \(1, 100\], got 0.5"),
    ("source_size", 20000, r"infer.yaml of .*: source_size must be an integer in \[14, 1024\], got 20000"),
    ("foreground_ratio", 5, r"infer.yaml of .*: foreground_ratio must be a number in \[0.05, 1\] or absent, got 5"),
    ("render_size", 0, r"infer.yaml of .*: render_size must be an integer in \[1, 65536\], got 0"),
    ("render_size", 4, r"infer.yaml of .*: render_size must be an integer in \[8, 4096\], got 4"),
])
def test_bad_infer_settings_name_infer_yaml(ckpts, tmp_path, key, value, pattern):
    import yaml

    d = _copy(ckpts / "openlrm-tiny-1.1", tmp_path)
    infer = yaml.safe_load((d / "infer.yaml").read_text()) if (d / "infer.yaml").is_file() else {}
    infer[key] = value
    (d / "infer.yaml").write_text(yaml.safe_dump(infer))
    with pytest.raises(ConfigError, match=pattern):
        load_model(str(d))


def test_hub_download_fetches_one_weight_file(ckpts, tmp_path, monkeypatch):
    """An OpenLRM v1.1 repo ships model.safetensors and pytorch_model.bin: only the one the loader reads is fetched
    (every weight pattern when the listing fails, so an offline cache still serves); TripoSR prefers safetensors."""
    import sys
    import types

    d = _copy(ckpts / "openlrm-tiny-1.1", tmp_path)
    calls = []
    hub = types.ModuleType("huggingface_hub")
    hub.list_repo_files = lambda repo: ["config.json", "infer.yaml", "model.safetensors", "pytorch_model.bin"]
    hub.snapshot_download = lambda repo, allow_patterns: calls.append(allow_patterns) or str(d)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert load_model("someone/openlrm-like").config.version == "1.1"
    assert calls[-1] == ["*.json", "*.yaml", "model.safetensors"]

    def offline(repo):
        raise OSError("no network")

    hub.list_repo_files = offline
    load_model("someone/openlrm-like")
    assert calls[-1] == ["*.json", "*.yaml", "*.ckpt", "*.pth", "*.safetensors", "*.bin"]


def test_triposr_prefers_safetensors_to_the_pickle(ckpts, tmp_path):
    from safetensors.torch import save_file

    from lrm_rt.checkpoint import read_state_dict

    d = _copy(ckpts / "triposr-tiny", tmp_path)
    save_file({k: v.contiguous() for k, v in read_state_dict(d / "model.ckpt").items()}, str(d / "model.safetensors"))
    (d / "model.ckpt").write_bytes(b"not read")
    assert load_model(str(d)).config.family == "triposr"


@pytest.mark.parametrize("spr", [3, 7])
def test_too_few_samples_per_ray_are_refused_at_load(ckpts, tmp_path, spr):
    """OpenLRM's importance renderer needs 4 coarse + 4 fine samples: fewer failed inside max_pool1d / sample_pdf
    on the first rendered view."""
    d = _copy(ckpts / "openlrm-tiny-1.1", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rendering_samples_per_ray"] = spr
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"config.json of .*: rendering_samples_per_ray must be an integer in "
                                          rf"\[8, 1024\], got {spr}"):
        load_model(str(d))


@pytest.mark.parametrize("how", ["int32", "sparse", "meta", "int_key", "none_value"])
def test_weights_must_be_dense_float_tensors_under_names(ckpts, tmp_path, how):
    """Sparse or meta tensors escaped as load_state_dict's RuntimeError (a 50 KB traceback); int weights were cast
    to float silently (an empty mesh); a v1.0 model.pth whose weights map an int to a tensor, or a name to None,
    failed with AttributeError."""
    d = _copy(ckpts / "openlrm-tiny-1.0", tmp_path)
    obj = torch.load(d / "model.pth", weights_only=True)
    w = obj["weights"]
    k = sorted(w)[0]
    if how == "int32":
        w = {n: v.to(torch.int32) for n, v in w.items()}
    elif how == "sparse":
        w[k] = w[k].to_sparse()
    elif how == "meta":
        w[k] = w[k].to("meta")
    elif how == "int_key":
        w[5] = w.pop(k)
    else:
        w[k] = None
    obj["weights"] = w
    torch.save(obj, d / "model.pth")
    pattern = "not dense floating-point weights" if how in ("int32", "sparse", "meta") else "state dict of tensors"
    with pytest.raises(CheckpointError, match=f"model.pth weights.*{pattern}"):
        load_model(str(d))
