"""Model configurations: one dataclass for every supported checkpoint, and the named releases.

A ``ModelConfig`` is built from the files a checkpoint ships with (TripoSR ``config.yaml``, OpenLRM
v1.1 ``config.json`` kwargs, OpenLRM v1.0 ``model.pth['kwargs']``) or taken from ``NAMED_CONFIGS``
(the released checkpoints, whose hyper-parameters are in the fixtures' manifests).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Tuple, Union

from .errors import ConfigError
from .field.spec import OPENLRM_FIELD, TRIPOSR_FIELD, FieldSpec
from .models.dinov2 import Dinov2Config, dinov2_config
from .models.vit import DINO_VITB16, ViTConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_VITB16_MEAN = (0.5, 0.5, 0.5)  # facebook/dino-vitb16's image processor (OpenLRM v1.0's normalisation)
DINO_VITB16_STD = (0.5, 0.5, 0.5)

EncoderConfig = Union[ViTConfig, Dinov2Config]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model and run it with its family's reference defaults."""

    name: str
    family: Literal["triposr", "openlrm"]
    version: Literal["triposr", "1.0", "1.1"]
    encoder: EncoderConfig
    input_size: int  # square side fed to the encoder
    image_mean: Optional[Tuple[float, float, float]]  # None: the encoder takes [0,1] RGB (OpenLRM v1.1)
    image_std: Optional[Tuple[float, float, float]]
    transformer_dim: int  # width of the triplane tokens (TripoSR: tokenizer channels)
    transformer_layers: int
    transformer_heads: int
    head_dim: int  # TripoSR sets it explicitly; OpenLRM: dim // heads
    encoder_feat_dim: int
    camera_embed_dim: int  # 0 for TripoSR (no camera input)
    triplane_low_res: int
    triplane_dim: int  # channels per plane after the upsampler
    decoder_in: int
    decoder_hidden: int
    decoder_linear_layers: int  # number of nn.Linear in the NeRF MLP
    samples_per_ray: int
    # Inference defaults of the family's reference code.
    mc_resolution: int
    mc_threshold: float
    render_size: int
    foreground_ratio: Optional[float]  # share of the frame the object is scaled to (TripoSR 0.85; OpenLRM releases: None)
    background: float  # grey level behind the object: TripoSR 0.5, OpenLRM 1.0 (white)
    source_cam_dist: float = 2.0

    @property
    def field_spec(self) -> FieldSpec:
        return TRIPOSR_FIELD if self.family == "triposr" else OPENLRM_FIELD

    @property
    def triplane_high_res(self) -> int:
        return 2 * self.triplane_low_res

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{where}: missing key {key!r}")
    return cfg[key]


# Far above every released model (16 layers, 1024 wide, 1025 tokens); a config beyond it would only allocate
# until memory runs out (a billion layers took 35 s and 5.5 GB before failing).
MAX_CONFIG_SIZE = 1 << 16


def _int(where: str, key: str, value: Any, minimum: int = 1, maximum: int = MAX_CONFIG_SIZE) -> int:
    """A size from a config file, checked here: zero, negative or absurd ones only fail later, deep in torch."""
    try:
        n = int(value)
        ok = not isinstance(value, bool) and n == float(value) and minimum <= n <= maximum
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{where}: {key} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return n


def _finite(where: str, key: str, value: Any, positive: bool = False) -> float:
    """A real number from a config file: finite (and > 0 with ``positive``), else a ConfigError naming it."""
    try:
        x = float(value)
        ok = not isinstance(value, bool) and math.isfinite(x) and (x > 0 or not positive)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfigError(f"{where}: {key} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return x


# Twice the largest release input (TripoSR's 512 px): the encoder's cost grows with the square of the side, and a
# config asking for 4096 px ran lrm-tiny's encoder for 2 minutes, 20000 px for 14 minutes and 11 GB before failing.
MAX_INPUT_SIZE = 1024
MAX_SAMPLES_PER_RAY = 1024
MAX_GRID = 4096  # marching-cubes resolution (the CLI's --mc-resolution bound, spelled out there)
MIN_RENDER_SIZE, MAX_RENDER_SIZE = 8, 4096  # novel views (--render-size)
# Smallest framing ratio accepted (the C library checks the same): the canvas is 1/ratio of the object.
MIN_FOREGROUND_RATIO = 0.05


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_encoder_values(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Types and ranges of an encoder config's values, checked before the dataclass is built: its own checks
    divide by them (a zero head count was a ZeroDivisionError, a string width a formatting error)."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        lo = 0 if f.name == "num_register_tokens" else 1
        ok = {"int": lambda: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= MAX_CONFIG_SIZE,
              "float": lambda: _is_number(v), "bool": lambda: isinstance(v, bool),
              "str": lambda: isinstance(v, str)}.get(f.type, lambda: True)()
        if not ok:
            what = f"an integer in [{lo}, {MAX_CONFIG_SIZE}]" if f.type == "int" else f"a {f.type}"
            raise ConfigError(f"{where}.{f.name} must be {what}, got {v!r}")


def check_config(cfg: ModelConfig, name_of: Callable[[str], str] = lambda f: f"model config: {f}") -> ModelConfig:
    """Every value a stage relies on, checked once where a config is read (a checkpoint's files, an export
    manifest): a wrong one is a ConfigError naming it (``name_of(field)`` says where it came from), not an error
    deep inside the network, the renderer or marching cubes, nor a silently wrong mesh."""
    def fail(field: str, what: str) -> None:
        raise ConfigError(f"{name_of(field)} must be {what}, got {getattr(cfg, field)!r}")

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CONFIG_SIZE):
            fail(f.name, f"an integer in [0, {MAX_CONFIG_SIZE}]")
        if f.type == "float" and not _is_number(v):
            fail(f.name, "a finite number")
        if f.type == "str" and not isinstance(v, str):
            fail(f.name, "a string")
    if cfg.family not in ("triposr", "openlrm") or (cfg.family == "triposr") != (cfg.version == "triposr"):
        raise ConfigError(f"{name_of('family')}: unknown family / version {cfg.family!r} / {cfg.version!r}")
    patch = getattr(cfg.encoder, "patch_size", 1)
    checks = [("input_size", patch, MAX_INPUT_SIZE), ("mc_resolution", 2, MAX_GRID),
              ("render_size", MIN_RENDER_SIZE, MAX_RENDER_SIZE),
              ("samples_per_ray", 8 if cfg.family == "openlrm" else 1, MAX_SAMPLES_PER_RAY),  # OpenLRM: 4 + 4 at least
              ("camera_embed_dim", 0 if cfg.family == "triposr" else 1, MAX_CONFIG_SIZE)]
    checks += [(f, 1, MAX_CONFIG_SIZE) for f in (
        "transformer_dim", "transformer_layers", "transformer_heads", "head_dim", "encoder_feat_dim",
        "triplane_low_res", "triplane_dim", "decoder_in", "decoder_hidden", "decoder_linear_layers")]
    for field, lo, hi in checks:
        if not lo <= getattr(cfg, field) <= hi:
            fail(field, f"an integer in [{lo}, {hi}]")
    if cfg.foreground_ratio is not None and not (_is_number(cfg.foreground_ratio)
                                                 and MIN_FOREGROUND_RATIO <= cfg.foreground_ratio <= 1):
        fail("foreground_ratio", f"a number in [{MIN_FOREGROUND_RATIO}, 1] or absent")
    if not 0 <= cfg.background <= 1:
        fail("background", "a grey level in [0, 1]")
    if not 1 < cfg.source_cam_dist <= 100:  # the object fills [-1, 1]^3: the camera must look at it from outside
        fail("source_cam_dist", "a distance in (1, 100]")
    for field, positive in (("image_mean", False), ("image_std", True)):
        v = getattr(cfg, field)
        if v is not None and not (isinstance(v, tuple) and len(v) == 3
                                  and all(_is_number(x) and (x > 0 or not positive) for x in v)):
            fail(field, f"three finite{' positive' if positive else ''} numbers (one per RGB channel) or absent")
    return cfg


def triposr_config(yaml_cfg: Mapping[str, Any], name: str = "triposr",
                   vit: Optional[ViTConfig] = None) -> ModelConfig:
    """From TripoSR's config.yaml (already parsed; ``${...}`` interpolations resolved or not)."""
    where = f"TripoSR config.yaml of {name}"
    try:
        tok = _require(yaml_cfg, "tokenizer", where)
        bb = _require(yaml_cfg, "backbone", where)
        post = _require(yaml_cfg, "post_processor", where)
        dec = _require(yaml_cfg, "decoder", where)
        ren = yaml_cfg.get("renderer", {})
        channels = _int(where, "tokenizer.num_channels", tok["num_channels"])
        if channels % 32:  # Transformer1D normalises the tokens with GroupNorm(32 groups)
            raise ConfigError(f"{where}: tokenizer.num_channels {channels} must be a multiple of 32")
        triplane_dim = _int(where, "post_processor.out_channels", post["out_channels"])
        decoder_in = _int(where, "decoder.in_channels", dec["in_channels"])
        if decoder_in != 3 * triplane_dim:  # the decoder reads the three planes' features concatenated
            raise ConfigError(f"{where}: decoder.in_channels {decoder_in} must be 3 x post_processor.out_channels "
                              f"= {3 * triplane_dim}")
        if float(ren.get("radius", 0.87)) != TRIPOSR_FIELD.radius:
            raise ConfigError(f"{where}: renderer.radius {ren.get('radius')} is not supported (only 0.87)")
        if ren.get("density_activation", "exp") != "exp" or dec.get("activation", "silu") != "silu":
            raise ConfigError(f"{where}: only exp density and SiLU decoders are supported")
        if ren.get("feature_reduction", "concat") != "concat":
            raise ConfigError(f"{where}: only feature_reduction 'concat' is supported")
        # the field kernels hard-code TripoSR's exp(raw - 1) density and sigmoid colour
        if ren.get("density_bias", -1.0) != -1.0 or ren.get("color_activation", "sigmoid") != "sigmoid":
            raise ConfigError(f"{where}: renderer.density_bias {ren.get('density_bias')!r} / color_activation "
                              f"{ren.get('color_activation')!r} are not supported (only -1.0 / sigmoid)")
        keys = {"input_size": "cond_image_size", "samples_per_ray": "renderer.num_samples_per_ray"}
        return check_config(ModelConfig(
            name=name, family="triposr", version="triposr",
            encoder=vit or DINO_VITB16,
            input_size=_int(where, "cond_image_size", yaml_cfg.get("cond_image_size", 512)),
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
            transformer_dim=channels,
            transformer_layers=_int(where, "backbone.num_layers", bb["num_layers"]),
            transformer_heads=_int(where, "backbone.num_attention_heads", bb["num_attention_heads"]),
            head_dim=_int(where, "backbone.attention_head_dim", bb["attention_head_dim"]),
            encoder_feat_dim=_int(where, "backbone.cross_attention_dim", bb.get("cross_attention_dim", 768)),
            camera_embed_dim=0,
            triplane_low_res=_int(where, "tokenizer.plane_size", tok["plane_size"]),
            triplane_dim=triplane_dim,
            decoder_in=decoder_in,
            decoder_hidden=_int(where, "decoder.n_neurons", dec["n_neurons"]),
            decoder_linear_layers=_int(where, "decoder.n_hidden_layers", dec["n_hidden_layers"], minimum=0) + 1,
            samples_per_ray=_int(where, "renderer.num_samples_per_ray", ren.get("num_samples_per_ray", 128)),
            mc_resolution=256, mc_threshold=25.0, render_size=256,
            foreground_ratio=0.85, background=0.5,
        ), lambda f: f"{where}: {keys.get(f, f)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid or missing value ({exc})") from None


# OpenLRM v1.1 inference yamls (configs/infer-{s,b,l}.yaml), chosen by transformer width.
_V11_INFER = {512: (224, 192), 768: (336, 288), 1024: (448, 384)}


def openlrm_config(kwargs: Mapping[str, Any], version: Literal["1.0", "1.1"], name: str,
                   infer: Optional[Mapping[str, Any]] = None, vit: Optional[ViTConfig] = None,
                   image_norm: Optional[Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = None
                   ) -> ModelConfig:
    """From OpenLRM's model kwargs (v1.1 config.json, v1.0 model.pth['kwargs']['model']). ``image_norm``: v1.0's
    (mean, std), its encoder's image-processor values (default: facebook/dino-vitb16's)."""
    where = f"OpenLRM {version} {'config.json' if version == '1.1' else 'model.pth kwargs'} of {name}"
    iwhere = f"OpenLRM {version} {'infer.yaml' if version == '1.1' else 'model.pth infer kwargs'} of {name}"
    infer = dict(infer or {})
    try:
        dim = _int(where, "transformer_dim", kwargs["transformer_dim"])
        heads = _int(where, "transformer_heads", kwargs["transformer_heads"])
        if dim % heads:  # nn.MultiheadAttention splits the width into equal heads
            raise ConfigError(f"{where}: transformer_dim {dim} is not divisible by transformer_heads {heads}")
        triplane_dim = _int(where, "triplane_dim", kwargs["triplane_dim"])
        if version == "1.1":
            if kwargs.get("encoder_type", "dinov2") != "dinov2":
                raise ConfigError(f"{where}: encoder_type {kwargs.get('encoder_type')!r} is not supported")
            encoder: EncoderConfig = dinov2_config(str(kwargs["encoder_model_name"]))
            mean = std = None  # DINOv2 in OpenLRM v1.1 takes the [0,1] image as is
            size, render = _V11_INFER.get(dim, (224, 192))
            if not infer and dim not in _V11_INFER:  # not a release size: its own infer.yaml is missing
                log.warning("%s has no infer.yaml and transformer_dim %d matches no OpenLRM release: using "
                            "generic settings (source_size 224, mesh_size 384, mesh_thres 3.0); a model "
                            "trained at other settings needs its infer.yaml beside config.json", name, dim)
        else:
            encoder = dataclasses.replace(vit or DINO_VITB16, with_pooler=False)
            # v1.0 normalises with its encoder's image processor: facebook/dino-vitb16's maps [0, 1] to [-1, 1]
            # (mean = std = 0.5, the ViTImageProcessor defaults its hub config keeps)
            mean, std = image_norm or (DINO_VITB16_MEAN, DINO_VITB16_STD)
            size, render = 512, 384  # only used without a checkpoint: real ones carry kwargs.infer
        size = _int(iwhere, "source_size", infer.get("source_size", size))
        infer_keys = {"input_size": "source_size", "mc_resolution": "mesh_size", "mc_threshold": "mesh_thres",
                      "render_size": "render_size", "foreground_ratio": "foreground_ratio",
                      "source_cam_dist": "source_cam_dist"}
        model_keys = {"samples_per_ray": "rendering_samples_per_ray"}
        return check_config(ModelConfig(
            name=name, family="openlrm", version=version, encoder=encoder,
            input_size=size, image_mean=mean, image_std=std,
            transformer_dim=dim, transformer_layers=_int(where, "transformer_layers", kwargs["transformer_layers"]),
            transformer_heads=heads, head_dim=dim // heads,
            encoder_feat_dim=_int(where, "encoder_feat_dim", kwargs["encoder_feat_dim"]),
            camera_embed_dim=_int(where, "camera_embed_dim", kwargs["camera_embed_dim"]),
            triplane_low_res=_int(where, "triplane_low_res", kwargs["triplane_low_res"]),
            triplane_dim=triplane_dim,
            decoder_in=3 * triplane_dim, decoder_hidden=64, decoder_linear_layers=4,
            samples_per_ray=_int(where, "rendering_samples_per_ray", kwargs.get("rendering_samples_per_ray", 96)),
            mc_resolution=_int(iwhere, "mesh_size", infer.get("mesh_size", 384), minimum=2),
            mc_threshold=_finite(iwhere, "mesh_thres", infer.get("mesh_thres", 3.0)),
            render_size=_int(iwhere, "render_size", infer.get("render_size", render)),
            # OpenLRM's releases feed the image as framed; a model trained on one framing (lrm-tiny) says
            # in infer.yaml how much of the frame its objects filled, and inputs are framed to that.
            foreground_ratio=(None if infer.get("foreground_ratio") is None
                              else _finite(iwhere, "foreground_ratio", infer["foreground_ratio"], positive=True)),
            background=1.0,
            source_cam_dist=_finite(iwhere, "source_cam_dist", infer.get("source_cam_dist", 2.0), positive=True),
        ), lambda f: f"{iwhere}: {infer_keys[f]}" if f in infer_keys else f"{where}: {model_keys.get(f, f)}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid or missing value ({exc})") from None


# Hyper-parameters of the released checkpoints (HF config.json / config.yaml / model.pth kwargs).
_V11 = {
    "small": dict(camera_embed_dim=1024, rendering_samples_per_ray=96, transformer_dim=512,
                  transformer_layers=12, transformer_heads=8, triplane_low_res=32, triplane_high_res=64,
                  triplane_dim=32, encoder_type="dinov2", encoder_model_name="dinov2_vits14_reg",
                  encoder_feat_dim=384),
    "base": dict(camera_embed_dim=1024, rendering_samples_per_ray=96, transformer_dim=768,
                 transformer_layers=12, transformer_heads=12, triplane_low_res=32, triplane_high_res=64,
                 triplane_dim=48, encoder_type="dinov2", encoder_model_name="dinov2_vitb14_reg",
                 encoder_feat_dim=768),
    "large": dict(camera_embed_dim=1024, rendering_samples_per_ray=128, transformer_dim=1024,
                  transformer_layers=16, transformer_heads=16, triplane_low_res=32, triplane_high_res=64,
                  triplane_dim=80, encoder_type="dinov2", encoder_model_name="dinov2_vitb14_reg",
                  encoder_feat_dim=768),
}
# v1.0: reconstructed from the README table and the published file sizes (see fixtures manifests).
_V10 = {
    "small": dict(camera_embed_dim=768, rendering_samples_per_ray=96, transformer_dim=768,
                  transformer_layers=12, transformer_heads=12, triplane_low_res=32, triplane_dim=32,
                  encoder_feat_dim=768),
    "base": dict(camera_embed_dim=1024, rendering_samples_per_ray=128, transformer_dim=1024,
                 transformer_layers=12, transformer_heads=16, triplane_low_res=32, triplane_dim=40,
                 encoder_feat_dim=768),
    "large": dict(camera_embed_dim=1024, rendering_samples_per_ray=128, transformer_dim=1024,
                  transformer_layers=16, transformer_heads=16, triplane_low_res=32, triplane_dim=80,
                  encoder_feat_dim=768),
}
TRIPOSR_YAML: Dict[str, Any] = {
    "cond_image_size": 512,
    "image_tokenizer": {"pretrained_model_name_or_path": "facebook/dino-vitb16"},
    "tokenizer": {"plane_size": 32, "num_channels": 1024},
    "backbone": {"in_channels": 1024, "num_attention_heads": 16, "attention_head_dim": 64,
                 "num_layers": 16, "cross_attention_dim": 768},
    "post_processor": {"in_channels": 1024, "out_channels": 40},
    "decoder": {"in_channels": 120, "n_neurons": 64, "n_hidden_layers": 9, "activation": "silu"},
    "renderer": {"radius": 0.87, "feature_reduction": "concat", "density_activation": "exp",
                 "density_bias": -1.0, "num_samples_per_ray": 128},
}

NAMED_CONFIGS: Dict[str, ModelConfig] = {"triposr": triposr_config(TRIPOSR_YAML, "triposr")}
for _size, _kw in _V11.items():
    for _data in ("obj", "mix"):
        _name = f"openlrm-{_data}-{_size}-1.1"
        NAMED_CONFIGS[_name] = openlrm_config(_kw, "1.1", _name)
for _size, _kw in _V10.items():
    _name = f"openlrm-{_size}-obj-1.0"
    NAMED_CONFIGS[_name] = openlrm_config(_kw, "1.0", _name)

# Hugging Face repos of the released checkpoints, for ``--model NAME`` with network access.
HF_REPOS: Dict[str, str] = {"triposr": "stabilityai/TripoSR"}
HF_REPOS.update({n: f"zxhezexin/{n}" for n in NAMED_CONFIGS if n.startswith("openlrm-")})


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}") from None
