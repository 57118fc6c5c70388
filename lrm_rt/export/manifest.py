"""The export directory's ``manifest.json``: what a runtime needs besides the graphs, and its checks.

An export directory holds ``encoder.onnx``, ``transformer.onnx`` (optionally ``*.fp16.onnx`` and
TensorRT engines), ``decoder.safetensors`` (the NeRF MLP the field kernels evaluate) and this
manifest. The manifest carries the full ``ModelConfig`` (``config_to_dict`` / ``config_from_dict``
round-trip it exactly), so a backend never needs the original checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..config import ModelConfig, check_config, check_encoder_values
from ..errors import CheckpointError, ConfigError
from ..models.dinov2 import Dinov2Config
from ..models.vit import ViTConfig

MANIFEST_NAME = "manifest.json"
DECODER_NAME = "decoder.safetensors"
FORMAT = "lrm_rt-export"
# Bump when a reader of the old layout would misread the new one (not for added optional keys).
FORMAT_VERSION = 1

_ENCODER_TYPES = {"vit": ViTConfig, "dinov2": Dinov2Config}


# ---------------------------------------------------------------------------------------------------
# ModelConfig <-> plain dict

def config_to_dict(cfg: ModelConfig) -> Dict[str, Any]:
    """JSON-safe dict of every ModelConfig field; the encoder gets a ``type`` tag (vit / dinov2)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "encoder":
            kind = next(k for k, t in _ENCODER_TYPES.items() if isinstance(value, t))
            value = {"type": kind, **dataclasses.asdict(value)}
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _dataclass_from(cls, data: Mapping[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING)
    if unknown or missing:
        raise ConfigError(f"{where}: " + "; ".join(
            ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else [])))
    return cls(**dict(data))


def config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Inverse of ``config_to_dict`` (strict: unknown or missing keys are an error)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("encoder"), Mapping):
        raise ConfigError("model config dict has no 'encoder' mapping")
    enc = dict(data["encoder"])
    kind = enc.pop("type", None)
    if kind not in _ENCODER_TYPES:
        raise ConfigError(f"model config: unknown encoder type {kind!r} (vit, dinov2)")
    check_encoder_values(_ENCODER_TYPES[kind], enc, "model config: encoder")
    encoder = _dataclass_from(_ENCODER_TYPES[kind], enc, f"{kind} encoder config")
    fields = dict(data)
    fields["encoder"] = encoder
    for key in ("image_mean", "image_std"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    return check_config(_dataclass_from(ModelConfig, fields, "model config"))


# ---------------------------------------------------------------------------------------------------
# hashes

def sha256_file(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes: identifies weights whatever file layout they came in."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Weight files of the published layouts, in the order ``read_checkpoint_dir`` prefers them.
CHECKPOINT_FILES = ("model.ckpt", "model.pth", "model.safetensors", "pytorch_model.bin")


def checkpoint_file_hashes(directory: Optional[Union[str, Path]]) -> List[Dict[str, str]]:
    if directory is None or not Path(directory).is_dir():
        return []
    d = Path(directory)
    return [{"file": n, "sha256": sha256_file(d / n)} for n in CHECKPOINT_FILES if (d / n).is_file()]


# ---------------------------------------------------------------------------------------------------
# reading and checking

def is_export_dir(path: Union[str, Path]) -> bool:
    """A directory written by ``lrm-rt export`` (or one that lost its manifest: then read_manifest says so)."""
    d = Path(path)
    return d.is_dir() and any((d / n).is_file() for n in (MANIFEST_NAME, "encoder.onnx", "transformer.onnx"))


def plane_order(cfg: ModelConfig) -> List[str]:
    """Axes (u, v) of the three planes as the field kernels index them."""
    return ["xy", "xz", cfg.field_spec.third_plane]


def triplane_shape(cfg: ModelConfig) -> Tuple[int, int, int, int]:
    return (3, cfg.triplane_dim, cfg.triplane_high_res, cfg.triplane_high_res)


def read_manifest(export_dir: Union[str, Path], require: Tuple[str, ...] = ("encoder", "transformer")) -> Dict[str, Any]:
    """Load and sanity-check ``manifest.json``; every problem is one CheckpointError naming the fix."""
    d = Path(export_dir)
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{d} is not an lrm-rt export directory (no {MANIFEST_NAME}); "
                              "create one with: lrm-rt export --model M --out DIR")
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lrm-rt export manifest (format {FORMAT!r} expected)")
    if man.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has export format version {man.get('format_version')!r}, this lrm_rt "
                              f"reads version {FORMAT_VERSION}: re-export with this lrm_rt (lrm-rt export)")
    try:
        cfg = config_from_dict(man["config"])
    except (KeyError, TypeError, ValueError, ArithmeticError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid model config ({exc})") from None
    if (cfg.family, cfg.version) != (man.get("family"), man.get("version")):
        raise CheckpointError(f"{path}: manifest says {man.get('family')} {man.get('version')} but its config is "
                              f"{cfg.family} {cfg.version}; the directory is inconsistent, re-export it")
    for key in ("decoder", "graphs"):
        if not isinstance(man.get(key, {}), dict):
            raise CheckpointError(f"{path}: {key} must be a mapping, got {man[key]!r}; re-export with lrm-rt export")
    files = [_file_name(path, man.get("decoder", {}).get("file", DECODER_NAME), "decoder.file")]
    for g in require:
        info = man.get("graphs", {}).get(g)
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: no '{g}' graph listed; re-export with lrm-rt export")
        files.append(_file_name(path, info.get("file"), f"graphs.{g}.file"))
        if info.get("external_data"):
            files.append(_file_name(path, info["external_data"], f"graphs.{g}.external_data"))
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"export directory {d} is incomplete: missing {', '.join(missing)}; "
                              "re-export with lrm-rt export")
    man["_config"] = cfg
    return man


def _file_name(manifest_path: Path, name: Any, key: str) -> str:
    """A file the manifest names: a plain name inside the export directory (never a path leading out of it)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{manifest_path}: {key} must name a file in the export directory, got {name!r}; "
                              "re-export with lrm-rt export")
    return name


def verified_file(export_dir: Union[str, Path], info: Mapping[str, Any], key: str = "file",
                  sha_key: str = "sha256") -> Path:
    """The file ``info[key]`` of an export directory, after checking its content against the sha256 the export
    recorded: a graph or weight file copied in from another export would otherwise run as this model."""
    d = Path(export_dir)
    name = _file_name(d / MANIFEST_NAME, info.get(key), key)
    path = d / name
    want = info.get(sha_key)
    if not isinstance(want, str):
        raise CheckpointError(f"{d / MANIFEST_NAME} records no {sha_key} for {name}; re-export with lrm-rt export")
    try:
        got = sha256_file(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if got != want:
        raise CheckpointError(f"{path} is not the file this export wrote (sha256 {got[:12]}... != recorded "
                              f"{want[:12]}...): the directory was changed after export; re-export with lrm-rt export")
    return path


def manifest_config(man: Mapping[str, Any]) -> ModelConfig:
    cfg = man.get("_config")
    return cfg if isinstance(cfg, ModelConfig) else config_from_dict(man["config"])


def write_manifest(export_dir: Union[str, Path], man: Mapping[str, Any]) -> Path:
    path = Path(export_dir) / MANIFEST_NAME
    clean = {k: v for k, v in man.items() if not k.startswith("_")}
    text = json.dumps(clean, indent=1)
    # Lists of numbers / strings on one line, so shapes and camera vectors stay readable.
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    path.write_text(text + "\n")
    return path


def load_decoder(export_dir: Union[str, Path], man: Mapping[str, Any]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The NeRF MLP (weights (out, in), biases) in layer order, float32, from ``decoder.safetensors``."""
    from safetensors.torch import load_file

    info = man.get("decoder", {})
    path = verified_file(export_dir, info)
    try:
        sd = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read decoder weights {path}: {exc}".splitlines()[0]) from None
    n = int(info.get("layers", 0))
    try:
        weights = [sd[f"layers.{i}.weight"].float().contiguous() for i in range(n)]
        biases = [sd[f"layers.{i}.bias"].float().contiguous() for i in range(n)]
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks decoder tensor {exc}; re-export with lrm-rt export") from None
    cfg = manifest_config(man)
    want = [cfg.decoder_in] + [cfg.decoder_hidden] * (cfg.decoder_linear_layers - 1) + [4]
    got = [weights[0].shape[1]] + [w.shape[0] for w in weights] if weights else []
    chained = all(w.dim() == 2 and b.shape == (w.shape[0],) for w, b in zip(weights, biases)) and \
        all(weights[i + 1].shape[1] == weights[i].shape[0] for i in range(len(weights) - 1))
    if n != cfg.decoder_linear_layers or not chained or got != want:
        raise CheckpointError(f"{path}: decoder widths {got} do not match the manifest's config {want}; re-export")
    return weights, biases
