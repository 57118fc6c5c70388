"""DINO (v1) ViT image encoder, numerically equivalent to HF ``transformers`` 4.35 ``ViTModel``.

Used by TripoSR (``image_tokenizer.model.*``, with pooler) and OpenLRM v1.0 (``encoder.model.*``, no pooler).
Parameter names are the transformers 4.x ones so the published checkpoints load strictly;
``remap_hf_vit_keys`` converts transformers >= 5 names to them.

Position-embedding interpolation follows transformers 4.35 exactly (bicubic with a *scale factor* of
(h0 + 0.1) / sqrt(N)); newer transformers versions interpolate to an explicit size, which changes the
result visibly (fixture README §6.3).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pos_embed import BakedPosEmbed
from ..errors import CheckpointError, ConfigError

__all__ = [
    "ViTConfig",
    "DINO_VITB16_HF_JSON",
    "DINO_VITB16",
    "DinoViT",
    "ViTEmbeddings",
    "interpolate_vit_pos_embed",
    "remap_hf_vit_keys",
]


@dataclass(frozen=True)
class ViTConfig:
    """The subset of HF ``ViTConfig`` that changes inference. Dropouts are ignored (inference only)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    # HF ``ViTModel(add_pooling_layer=...)``: TripoSR keeps the (unused) pooler, OpenLRM v1.0 drops it.
    with_pooler: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"ViT hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            # HF "gelu" is the exact erf GELU; other variants (gelu_new, ...) are not used by any LRM checkpoint.
            raise ConfigError(f"unsupported ViT hidden_act {self.hidden_act!r} (only 'gelu')")
        if self.image_size % self.patch_size != 0:
            raise ConfigError(f"ViT image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Side of the learned (square) position grid."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of ``embeddings.position_embeddings`` (CLS + grid)."""
        return self.grid_size**2 + 1

    @classmethod
    def from_hf_json(cls, cfg: Mapping[str, Any], with_pooler: bool = True) -> "ViTConfig":
        """Build from an HF ``config.json`` dict; missing keys take HF ``ViTConfig`` defaults (e.g. qkv_bias True)."""
        if cfg.get("model_type", "vit") != "vit":
            raise ConfigError(f"not a ViT config: model_type {cfg.get('model_type')!r}")
        image_size = cfg.get("image_size", 224)
        patch_size = cfg.get("patch_size", 16)
        for name, value in (("image_size", image_size), ("patch_size", patch_size)):
            if isinstance(value, (list, tuple)):
                # HF allows (h, w); its interpolation assumes a square grid, so only square values are usable.
                if len(value) != 2 or value[0] != value[1]:
                    raise ConfigError(f"non-square ViT {name} {value!r} is not supported")
                value = value[0]
            if name == "image_size":
                image_size = int(value)
            else:
                patch_size = int(value)
        try:
            return cls(
                hidden_size=int(cfg.get("hidden_size", 768)),
                num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
                num_attention_heads=int(cfg.get("num_attention_heads", 12)),
                intermediate_size=int(cfg.get("intermediate_size", 3072)),
                patch_size=patch_size,
                image_size=image_size,
                num_channels=int(cfg.get("num_channels", 3)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                qkv_bias=bool(cfg.get("qkv_bias", True)),
                hidden_act=str(cfg.get("hidden_act", "gelu")),
                with_pooler=with_pooler,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid ViT config value: {exc}") from exc


# `facebook/dino-vitb16` config.json (TripoSR and OpenLRM v1.0 fetch it from the hub at build time; we cannot).
DINO_VITB16_HF_JSON: Dict[str, Any] = {
    "architectures": ["ViTModel"],
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 224,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "model_type": "vit",
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 16,
    "torch_dtype": "float32",
}
# With pooler (TripoSR layout); use dataclasses.replace(DINO_VITB16, with_pooler=False) for OpenLRM v1.0.
DINO_VITB16 = ViTConfig.from_hf_json(DINO_VITB16_HF_JSON, with_pooler=True)


def interpolate_vit_pos_embed(pos_embed: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """transformers 4.35 ``ViTEmbeddings.interpolate_pos_encoding`` for a (height, width) pixel input.

    pos_embed: (1, 1 + N, D) learned table (CLS first, square grid). Returns (1, 1 + h0*w0, D) in pos_embed's dtype.
    """
    num_positions = pos_embed.shape[1] - 1
    h0, w0 = height // patch_size, width // patch_size
    # Same early exit as the reference (patch count equal and square input): the learned table as is.
    if h0 * w0 == num_positions and height == width:
        return pos_embed
    grid = int(math.sqrt(num_positions))
    if grid * grid != num_positions:
        raise ConfigError(f"ViT position table with {num_positions} patch entries is not a square grid")
    dim = pos_embed.shape[-1]
    # The reference adds 0.1 and passes a scale factor; PyTorch then maps output -> source coordinates with
    # that factor (16.1/7), not with out/in (16/7), so passing size= would give different values.
    sqrt_n = math.sqrt(num_positions)
    scale = ((h0 + 0.1) / sqrt_n, (w0 + 0.1) / sqrt_n)
    patch = pos_embed[:, 1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False)
    if patch.shape[-2:] != (h0, w0):
        raise ConfigError(f"ViT pos-embed interpolation gave {tuple(patch.shape[-2:])}, expected {(h0, w0)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
    return torch.cat((pos_embed[:, :1].float(), patch), dim=1).to(pos_embed.dtype)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, h0*w0, D), row-major patches; trailing pixels that do not fill a patch are dropped.
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(BakedPosEmbed):
    """CLS + patch tokens + (interpolated) position embeddings.

    ``bake_pos_embed(h, w)`` stores the interpolated table for one input size in a non-persistent buffer
    (not in ``state_dict``), so a traced/exported graph holds a constant instead of a bicubic resize.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        # Registration order = HF state_dict order: own parameters first, then the patch embedding.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self._init_pos_baking()

    def interpolated_pos_embed(self, height: int, width: int) -> Tensor:
        """(1, 1 + h0*w0, D) position table for a (height, width) input (computed, never the baked copy)."""
        return interpolate_vit_pos_embed(self.position_embeddings, height, width, self.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        height, width = int(pixel_values.shape[-2]), int(pixel_values.shape[-1])
        x = self.patch_embeddings(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.pos_embed_for(height, width)


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        # SDPA's default scale 1/sqrt(head_dim) is the reference's; fp32 results agree to ~1e-7.
        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return out.transpose(1, 2).reshape(b, n, d)


class ViTSelfOutput(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(cfg)
        self.output = ViTSelfOutput(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.attention(x))


class ViTIntermediate(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class ViTOutput(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class ViTLayer(nn.Module):
    """Pre-norm block; submodule order matches HF so state_dict order matches the checkpoints."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTAttention(cfg)
        self.intermediate = ViTIntermediate(cfg)
        self.output = ViTOutput(cfg)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class ViTPooler(nn.Module):
    """Present only so checkpoints that carry ``pooler.dense.*`` load strictly; no LRM uses its output."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class DinoViT(nn.Module):
    """HF-4.x-named DINO ViT. ``forward(pixel_values)`` -> ``last_hidden_state`` (B, 1 + h0*w0, D).

    pixel_values: (B, C, H, W), already normalised by the caller (ImageNet mean/std for TripoSR and
    OpenLRM v1.0). Position embeddings are always interpolated to the input size
    (``interpolate_pos_encoding=True`` in both references).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pooler: Optional[ViTPooler] = ViTPooler(cfg) if cfg.with_pooler else None

    def interpolated_pos_embed(self, height: int, width: int) -> Tensor:
        return self.embeddings.interpolated_pos_embed(height, width)

    def bake_pos_embed(self, height: int, width: int) -> None:
        """Precompute the position table for a fixed input size (e.g. before ONNX export). Re-baked on load."""
        self.embeddings.bake_pos_embed(height, width)

    def clear_baked_pos_embed(self) -> None:
        self.embeddings.clear_baked_pos_embed()

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))


# transformers >= 5 renamed the per-layer ViT modules; embeddings / final layernorm / pooler kept their names.
_TF5_TO_TF4 = [
    (re.compile(r"(^|\.)layers\.(\d+)\.attention\.q_proj\."), r"\1encoder.layer.\2.attention.attention.query."),
    (re.compile(r"(^|\.)layers\.(\d+)\.attention\.k_proj\."), r"\1encoder.layer.\2.attention.attention.key."),
    (re.compile(r"(^|\.)layers\.(\d+)\.attention\.v_proj\."), r"\1encoder.layer.\2.attention.attention.value."),
    (re.compile(r"(^|\.)layers\.(\d+)\.attention\.o_proj\."), r"\1encoder.layer.\2.attention.output.dense."),
    (re.compile(r"(^|\.)layers\.(\d+)\.mlp\.fc1\."), r"\1encoder.layer.\2.intermediate.dense."),
    (re.compile(r"(^|\.)layers\.(\d+)\.mlp\.fc2\."), r"\1encoder.layer.\2.output.dense."),
    (re.compile(r"(^|\.)layers\.(\d+)\.(layernorm_before|layernorm_after)\."), r"\1encoder.layer.\2.\3."),
]


def remap_hf_vit_keys(state_dict: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
    """Rename transformers 5.x ViT keys to the 4.x names ``DinoViT`` uses; 4.x keys pass through unchanged.

    Only keys starting with ``prefix`` are touched (e.g. ``"image_tokenizer.model."`` on a whole TripoSR
    checkpoint), so other modules that happen to have ``layers.N.mlp.fc1`` names are never renamed.
    Order of entries is preserved.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for pattern, repl in _TF5_TO_TF4:
                rest, n = pattern.subn(repl, rest, count=1)
                if n:
                    break
            new_key = prefix + rest
        if new_key in out:
            raise CheckpointError(
                f"ViT key {key!r} maps to {new_key!r}, which is already present (mixed 4.x/5.x names?)"
            )
        out[new_key] = value
    return out
