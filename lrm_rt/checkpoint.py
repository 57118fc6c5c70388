"""Find and load checkpoints in the layouts the models were published in, offline first.

``load_model(spec)`` accepts a model directory (TripoSR ``config.yaml`` + ``model.ckpt``; OpenLRM v1.1
``config.json`` + ``model.safetensors``/``pytorch_model.bin``; OpenLRM v1.0 ``model.pth``), a known model
name, or a Hugging Face repo id (resolved through huggingface_hub when the network is there). Loading is
strict: every tensor is used and every shape checked, and a mismatch is one error that lists them.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .config import (HF_REPOS, IMAGENET_MEAN, IMAGENET_STD, NAMED_CONFIGS, ModelConfig, named_config, openlrm_config,
                     triposr_config)
from .errors import CheckpointError, ConfigError, ResourceError, is_out_of_memory
from .models.dinov2 import strip_dinov2_extra_keys
from .models.network import LRMNetwork
from .models.vit import DINO_VITB16, ViTConfig, remap_hf_vit_keys

StateDict = Dict[str, torch.Tensor]


@dataclass
class LoadedModel:
    config: ModelConfig
    network: LRMNetwork
    source: str  # where the weights came from (directory, or "random(seed)")


# ---------------------------------------------------------------------------------------------------
# files

def load_error_text(exc: BaseException) -> str:
    """One line for a failed checkpoint load. torch's refusal of a pickle that is more than weights opens with
    boilerplate (and terminal colour codes); the line that names what the pickle wanted is the one to show."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    named = [ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "GLOBAL" in ln]
    if named:
        return (f"refused by weights_only=True (the pickle holds more than tensors, never run): {named[0]}"[:400])
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else f"{type(exc).__name__} (truncated or not a checkpoint file)"


def read_state_dict(path: Path) -> StateDict:
    """Tensors of a safetensors or torch pickle file; pickles are loaded with ``weights_only=True``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt files raise many different types
        raise CheckpointError(f"cannot read checkpoint {path}: {load_error_text(exc)}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return tensor_dict(obj, str(path))


# Weights are read as float32; other dtypes would be cast silently (int32 weights made an empty mesh).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor_dict(obj: Any, where: str) -> StateDict:
    """``obj`` as a state dict: names to dense floating-point tensors with data, else one CheckpointError."""
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CheckpointError(f"{where} does not hold a state dict of tensors (names to tensors)")
    odd = [f"{k} ({v.dtype}, {v.layout}, {v.device.type})" for k, v in obj.items()
           if v.dtype not in WEIGHT_DTYPES or v.layout != torch.strided or v.device.type != "cpu"]
    if odd:
        raise CheckpointError(f"{where}: {len(odd)} tensors are not dense floating-point weights: {', '.join(odd[:3])}"
                              + (" ..." if len(odd) > 3 else ""))
    return dict(obj)


_INTERP = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _resolve_interpolations(node: Any, root: Mapping[str, Any]) -> Any:
    """Resolve OmegaConf-style ``${a.b}`` references (TripoSR's config.yaml uses them)."""
    if isinstance(node, dict):
        return {k: _resolve_interpolations(v, root) for k, v in node.items()}
    if isinstance(node, str):
        m = _INTERP.fullmatch(node.strip())
        if m:
            value: Any = root
            for part in m.group(1).split("."):
                if not isinstance(value, Mapping) or part not in value:
                    raise ConfigError(f"config reference ${{{m.group(1)}}} does not resolve")
                value = value[part]
            return _resolve_interpolations(value, root)
    return node


def read_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a YAML mapping")
    return _resolve_interpolations(data, data)


def read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _vit_config(name: str, directory: Path) -> ViTConfig:
    """The DINO ViT config a checkpoint names: the published hub id, or ``./file.json`` in the directory."""
    if name in ("facebook/dino-vitb16", "dino-vitb16"):
        return DINO_VITB16
    candidate = directory / name if name.startswith("./") else Path(name)
    if candidate.is_dir():
        candidate = candidate / "config.json"
    if candidate.is_file():
        return ViTConfig.from_hf_json(read_json(candidate))
    raise CheckpointError(f"unknown image encoder {name!r}: not facebook/dino-vitb16 and no such config file "
                          f"in {directory}")


def _v10_image_norm(encoder_name: str, directory: Path):
    """OpenLRM v1.0's (mean, std): its encoder's image processor. facebook/dino-vitb16: None (the config's default,
    0.5 / 0.5); a ViT configured by a local file: a ``preprocessor_config.json`` in the model directory, else ImageNet
    statistics, the normalisation DINO was trained with (and the one the tiny test checkpoint was made with)."""
    if encoder_name in ("facebook/dino-vitb16", "dino-vitb16"):
        return None
    proc = directory / "preprocessor_config.json"
    if not proc.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    data = read_json(proc)
    try:
        mean, std = tuple(float(v) for v in data["image_mean"]), tuple(float(v) for v in data["image_std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{proc}: no usable image_mean / image_std ({exc})") from None
    if len(mean) != 3 or len(std) != 3 or not all(v > 0 for v in std):
        raise CheckpointError(f"{proc}: image_mean / image_std must be 3 values each (std > 0)")
    return mean, std


# ---------------------------------------------------------------------------------------------------
# layouts

def _first_existing(directory: Path, *names: str) -> Optional[Path]:
    for n in names:
        if (directory / n).is_file():
            return directory / n
    return None


def read_checkpoint_dir(directory: Path) -> Tuple[ModelConfig, StateDict]:
    """Config and raw state dict of a model directory in one of the published layouts."""
    try:
        return _read_checkpoint_dir(directory)
    except MALFORMED as exc:  # a value of the wrong type or size deep in a config: name the directory, not the line
        raise CheckpointError(f"{directory}: malformed model config or checkpoint contents "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


# What a config of the wrong shape raises in the code that reads it (a list where a mapping belongs, a null, a zero
# size, a self-referencing ${...}); LrmError subclasses pass through.
MALFORMED = (AttributeError, TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, RecursionError)


def _read_checkpoint_dir(directory: Path) -> Tuple[ModelConfig, StateDict]:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    name = d.name
    if (d / "config.yaml").is_file():  # TripoSR
        cfg_yaml = read_yaml(d / "config.yaml")
        vit_name = cfg_yaml.get("image_tokenizer", {}).get("pretrained_model_name_or_path", "facebook/dino-vitb16")
        cfg = triposr_config(cfg_yaml, name, _vit_config(str(vit_name), d))
        weights = _first_existing(d, "model.safetensors", "model.ckpt")  # no pickle when both are there
        if weights is None:
            raise CheckpointError(f"{d}: TripoSR config.yaml found but no model.ckpt or model.safetensors")
        return cfg, read_state_dict(weights)
    if (d / "model.pth").is_file():  # OpenLRM v1.0: config and weights in one pickle
        try:
            obj = torch.load(str(d / "model.pth"), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {d / 'model.pth'}: {load_error_text(exc)}") from None
        if not isinstance(obj, Mapping) or "weights" not in obj or "kwargs" not in obj:
            raise CheckpointError(f"{d / 'model.pth'} is not an OpenLRM v1.0 checkpoint (no 'weights'/'kwargs')")
        kwargs = obj["kwargs"]
        model_kw = kwargs.get("model", {})
        enc_name = str(model_kw.get("encoder_model_name", "facebook/dino-vitb16"))
        vit = _vit_config(enc_name, d)
        cfg = openlrm_config(model_kw, "1.0", name, infer=kwargs.get("infer"), vit=vit,
                             image_norm=_v10_image_norm(enc_name, d))
        return cfg, tensor_dict(obj["weights"], f"{d / 'model.pth'} weights")
    if (d / "config.json").is_file():
        cfg_json = read_json(d / "config.json")
        if "transformer_dim" not in cfg_json:
            raise CheckpointError(f"{d / 'config.json'} holds no model settings (an OpenLRM v1.0 repo needs model.pth)")
        infer = read_yaml(d / "infer.yaml") if (d / "infer.yaml").is_file() else None
        cfg = openlrm_config(cfg_json, "1.1", name, infer=infer)
        weights = _first_existing(d, "model.safetensors", "pytorch_model.bin")
        if weights is None:
            raise CheckpointError(f"{d}: config.json found but no model.safetensors or pytorch_model.bin")
        return cfg, read_state_dict(weights)
    raise CheckpointError(f"{d} has no model config (expected config.yaml, model.pth or config.json)")


# ---------------------------------------------------------------------------------------------------
# names -> published keys

def _split_packed_attention(sd: StateDict, expected: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert between nn.MultiheadAttention's packed ``in_proj_weight`` and separate q/k/v weights.

    The releases store cross-attention packed only when its key dim equals the width; a checkpoint
    re-saved by other code may use the other form, which holds the same numbers.
    """
    out = dict(sd)
    for key in list(sd):
        if key.endswith(".in_proj_weight") and key not in expected:
            base = key[: -len("in_proj_weight")]
            if base + "q_proj_weight" in expected:
                q, k, v = out.pop(key).chunk(3, dim=0)
                out.update({base + "q_proj_weight": q, base + "k_proj_weight": k, base + "v_proj_weight": v})
        if key.endswith(".q_proj_weight") and key not in expected:
            base = key[: -len("q_proj_weight")]
            parts = [sd.get(base + n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
            # q/k/v of different widths cannot be one packed matrix: left as they are, the strict check names them
            same = all(p is not None and p.shape[1:] == parts[0].shape[1:] for p in parts)
            if base + "in_proj_weight" in expected and same:
                out[base + "in_proj_weight"] = torch.cat(
                    [out.pop(base + "q_proj_weight"), out.pop(base + "k_proj_weight"), out.pop(base + "v_proj_weight")])
    return out


def normalise_state_dict(sd: StateDict, cfg: ModelConfig, expected: Mapping[str, torch.Tensor]) -> StateDict:
    """Map the name variants we accept onto the published names of ``cfg``."""
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if cfg.family == "triposr":
        sd = remap_hf_vit_keys(sd, prefix="image_tokenizer.model.")
    elif cfg.version == "1.0":
        sd = remap_hf_vit_keys(sd, prefix="encoder.model.")
    else:
        sd = strip_dinov2_extra_keys(sd, prefix="encoder.model.")
    return _split_packed_attention(sd, expected)


def _fmt(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
              for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_fmt(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} wrong shape: {'; '.join(shapes[:4])}" + (" ..." if len(shapes) > 4 else ""))
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + " | ".join(problems))


def build_network(cfg: ModelConfig, sd: Optional[StateDict], where: str = "checkpoint") -> LRMNetwork:
    """Instantiate the network and load ``sd`` strictly (``None`` leaves the random initialisation)."""
    try:
        net = LRMNetwork(cfg)
    except MALFORMED as exc:  # sizes no network can have (a zero head count, ...)
        raise CheckpointError(f"{where}: its config describes no buildable network ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise ResourceError(f"{where}: out of memory building the network its config describes (transformer "
                            f"{cfg.transformer_layers} layers x {cfg.transformer_dim} wide): check the config's "
                            "sizes") from None
    if sd is not None:
        expected = net.state_dict()
        sd = normalise_state_dict(sd, cfg, expected)
        check_state_dict(sd, expected, where)
        net.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return net.eval()


def random_network(cfg: ModelConfig, seed: int = 0) -> LRMNetwork:
    """Seeded random weights of the right shapes (benchmarks of checkpoints we cannot download)."""
    gen = torch.Generator().manual_seed(seed)
    net = LRMNetwork(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)
    return net.eval()


# The weight file the loader would read, by preference: repos that ship two formats of the same weights (OpenLRM
# v1.1: model.safetensors and pytorch_model.bin) need only one downloaded.
HUB_WEIGHT_PREFERENCE = ("model.safetensors", "model.ckpt", "model.pth", "pytorch_model.bin")


def _hub_weight_patterns(repo_id: str) -> List[str]:
    """The one weight file of ``repo_id`` to fetch; every weight pattern when the listing fails (offline, with the
    files in the local cache)."""
    try:
        from huggingface_hub import list_repo_files

        files = set(list_repo_files(repo_id))
    except Exception:  # noqa: BLE001 (no network: let snapshot_download use the cache)
        files = set()
    chosen = next((n for n in HUB_WEIGHT_PREFERENCE if n in files), None)
    return [chosen] if chosen else ["*.ckpt", "*.pth", "*.safetensors", "*.bin"]


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is a Hugging Face repo id, but huggingface_hub is not installed "
                              "(pip install huggingface_hub) -- or pass a local model directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.yaml", *_hub_weight_patterns(repo_id)]))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face hub ({first}); without network "
                              "access pass a local model directory with --model DIR") from None


def load_model(spec: str, *, random_weights: bool = False, seed: int = 0) -> LoadedModel:
    """Resolve ``spec`` (directory, built-in name, known release name or HF repo id) and load it."""
    from . import models_dir, shipped_models  # built-in models shipped with the package

    path = Path(spec).expanduser()
    if path.is_dir():
        cfg, sd = read_checkpoint_dir(path)
        return LoadedModel(cfg, build_network(cfg, sd, str(path)), str(path))
    builtin = models_dir() / spec
    if builtin.is_dir():
        cfg, sd = read_checkpoint_dir(builtin)
        return LoadedModel(cfg, build_network(cfg, sd, spec), f"built-in {spec}")
    if spec in NAMED_CONFIGS:
        cfg = named_config(spec)
        if random_weights:
            return LoadedModel(cfg, random_network(cfg, seed), f"random(seed={seed})")
        directory = _hub_snapshot(HF_REPOS[spec])
        cfg2, sd = read_checkpoint_dir(directory)
        return LoadedModel(cfg2.replace(name=spec), build_network(cfg2, sd, spec), HF_REPOS[spec])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        directory = _hub_snapshot(spec)
        cfg, sd = read_checkpoint_dir(directory)
        return LoadedModel(cfg, build_network(cfg, sd, spec), spec)
    if path.exists():
        raise CheckpointError(f"{spec} is a file; --model takes a model directory, a model name or a repo id")
    raise ConfigError(f"unknown model {spec!r}: not a directory, not a known name "
                      f"({', '.join(shipped_models() + sorted(NAMED_CONFIGS))}) and not a Hugging Face repo id")
