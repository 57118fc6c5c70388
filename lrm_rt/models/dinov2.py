"""DINOv2-with-registers image encoder of OpenLRM v1.1 (facebookresearch/dinov2 ``DinoVisionTransformer``
as vendored by OpenLRM, built by ``dinov2_vit{s,b}14_reg``).

Parameter names are exactly those under ``encoder.model.`` in the v1.1 checkpoints. OpenLRM's fork has no
``mask_token``; Meta's original hub weights do, so ``strip_dinov2_extra_keys`` drops it before a strict load
(OpenLRM's wrapper does the same).

Output follows OpenLRM's ``Dinov2Wrapper``: [normed CLS, normed patch tokens]; the 4 register tokens are
computed but dropped. Input is the [0, 1] RGB image with **no** mean/std normalisation (OpenLRM v1.1 convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pos_embed import BakedPosEmbed
from ..errors import ConfigError

__all__ = [
    "Dinov2Config",
    "DINOV2_CONFIGS",
    "dinov2_config",
    "Dinov2",
    "interpolate_dinov2_pos_embed",
    "strip_dinov2_extra_keys",
]


@dataclass(frozen=True)
class Dinov2Config:
    """Hyper-parameters of ``DinoVisionTransformer`` as built by the hub ``*_reg`` constructors."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518  # -> 37x37 learned position grid
    in_chans: int = 3
    num_register_tokens: int = 4
    init_values: float = 1.0  # LayerScale init; irrelevant once weights are loaded
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layer_norm_eps: float = 1e-6
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads != 0:
            raise ConfigError(f"DINOv2 embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.img_size % self.patch_size != 0:
            raise ConfigError(f"DINOv2 img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of ``pos_embed`` (CLS + grid; registers have no position embedding)."""
        return self.grid_size**2 + 1

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def dinov2_vits14_reg(cls) -> "Dinov2Config":
        return cls(embed_dim=384, depth=12, num_heads=6)

    @classmethod
    def dinov2_vitb14_reg(cls) -> "Dinov2Config":
        return cls(embed_dim=768, depth=12, num_heads=12)

    @classmethod
    def dinov2_tiny14_reg(cls) -> "Dinov2Config":
        """Fixture-only model (fixtures README §4): the vits14_reg construction at 64 dims, 2 blocks, 2 heads."""
        return cls(embed_dim=64, depth=2, num_heads=2)

    @classmethod
    def dinov2_lrmtiny14_reg(cls) -> "Dinov2Config":
        """lrm-tiny's encoder for stages 1-7 of its training (112 px input, an 8x8 position grid); kept so that those
        checkpoints still load (training/resize_patches.py moves them to the shipped 16 px one)."""
        return cls(embed_dim=192, depth=4, num_heads=3, img_size=112)

    @classmethod
    def dinov2_lrmtiny16_reg(cls) -> "Dinov2Config":
        """Encoder of the shipped lrm-tiny: 128 px input in 16 px patches, the 8x8 position grid it was trained with."""
        return cls(embed_dim=192, depth=4, num_heads=3, patch_size=16, img_size=128)


# OpenLRM v1.1 ``encoder_model_name`` -> config.
DINOV2_CONFIGS: Dict[str, Dinov2Config] = {
    "dinov2_vits14_reg": Dinov2Config.dinov2_vits14_reg(),
    "dinov2_vitb14_reg": Dinov2Config.dinov2_vitb14_reg(),
    "dinov2_tiny14_reg": Dinov2Config.dinov2_tiny14_reg(),
    "dinov2_lrmtiny14_reg": Dinov2Config.dinov2_lrmtiny14_reg(),
    "dinov2_lrmtiny16_reg": Dinov2Config.dinov2_lrmtiny16_reg(),
}


def dinov2_config(name: str) -> Dinov2Config:
    try:
        return DINOV2_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown DINOv2 encoder {name!r} (known: {', '.join(sorted(DINOV2_CONFIGS))})") from None


def interpolate_dinov2_pos_embed(
    pos_embed: Tensor,
    height: int,
    width: int,
    patch_size: int,
    antialias: bool = True,
    offset: float = 0.0,
) -> Tensor:
    """DINOv2 ``interpolate_pos_encoding`` for a (height, width) pixel input.

    pos_embed: (1, 1 + M*M, D). Returns (1, 1 + h0*w0, D) in pos_embed's dtype (computed in fp32 as the reference).
    The reference names the input dims (w, h) but takes them from ``x.shape[2:]``, so its first scale factor is
    in fact the *row* factor: scale_factor = ((h0 + offset)/M, (w0 + offset)/M) applied to (rows, cols).
    """
    n = pos_embed.shape[1] - 1
    h0, w0 = height // patch_size, width // patch_size
    if h0 * w0 == n and height == width:
        return pos_embed
    grid = int(math.sqrt(n))
    if grid * grid != n:
        raise ConfigError(f"DINOv2 position table with {n} patch entries is not a square grid")
    dim = pos_embed.shape[-1]
    sqrt_n = math.sqrt(n)
    # A scale factor (not a size) is what the reference passes: PyTorch then maps coordinates with it.
    scale = ((h0 + offset) / sqrt_n, (w0 + offset) / sqrt_n)
    patch = pos_embed[:, 1:].float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    if math.floor(grid * scale[0]) == h0 and math.floor(grid * scale[1]) == w0:
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        # With offset 0, floor(M * (k/M)) rounds to k-1 for a few k (e.g. 39 and 43 for M = 37), where the
        # reference's size assert fails. Use the explicit size there instead (source scale M/k vs 1/(k/M):
        # differs only in the last bits) so such inputs still run.
        patch = F.interpolate(patch, size=(h0, w0), mode="bicubic", antialias=antialias)
    patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
    return torch.cat((pos_embed[:, :1].float(), patch), dim=1).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, h0*w0, D), row-major patches."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            # The reference asserts this too: DINOv2 never silently drops border pixels.
            raise ConfigError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=cfg.proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # SDPA's default scale equals the reference's head_dim**-0.5 applied to q; fp32 agrees to ~1e-7.
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden_dim, bias=cfg.ffn_bias)
        self.fc2 = nn.Linear(cfg.mlp_hidden_dim, cfg.embed_dim, bias=cfg.ffn_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # nn.GELU() default: exact erf GELU


class Block(nn.Module):
    """Pre-norm block with LayerScale; submodule order = checkpoint key order."""

    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim, cfg.init_values)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.embed_dim, cfg.init_values)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Dinov2(BakedPosEmbed):
    """DINOv2 with registers. ``forward(image)`` -> (B, 1 + h0*w0, D) = [CLS, patches] after the final norm.

    image: (B, 3, H, W) in [0, 1], H and W multiples of the patch size. ``bake_pos_embed(h, w)`` precomputes the
    antialiased-bicubic position table for one input size (non-persistent buffer, re-baked on weight load),
    so exported graphs contain a constant instead of an op ONNX cannot express.
    """

    def __init__(self, cfg: Dinov2Config) -> None:
        super().__init__()
        self.config = cfg
        # Own parameters first, as in the checkpoint: cls_token, pos_embed, register_tokens.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.embed_dim))
        self.register_tokens: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.embed_dim)) if cfg.num_register_tokens else None
        )
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self._init_pos_baking()

    @classmethod
    def from_name(cls, name: str) -> "Dinov2":
        return cls(dinov2_config(name))

    # --- position embeddings -------------------------------------------------------------------------
    def interpolated_pos_embed(self, height: int, width: int) -> Tensor:
        """(1, 1 + h0*w0, D) position table for a (height, width) input (always computed)."""
        cfg = self.config
        return interpolate_dinov2_pos_embed(
            self.pos_embed, height, width, cfg.patch_size, cfg.interpolate_antialias, cfg.interpolate_offset
        )

    # --- forward ---------------------------------------------------------------------------------------
    def prepare_tokens(self, image: Tensor) -> Tensor:
        """[CLS, registers, patches]: position embeddings are added before the registers are inserted."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        x = self.patch_embed(image)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed_for(height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, image: Tensor) -> Dict[str, Tensor]:
        """Same fields as the reference's ``forward_features`` (without masks)."""
        x = self.prepare_tokens(image)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        r = self.config.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
        }

    def forward(self, image: Tensor) -> Tensor:
        x = self.prepare_tokens(image)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # OpenLRM's Dinov2Wrapper output: CLS followed by the patch tokens (registers dropped).
        r = self.config.num_register_tokens
        return torch.cat((x[:, :1], x[:, r + 1 :]), dim=1)



def strip_dinov2_extra_keys(state_dict: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
    """Drop ``{prefix}mask_token`` (present in Meta's DINOv2 hub weights, removed in OpenLRM's fork).

    OpenLRM v1.1 checkpoints never contain it; this is for loading the original DINOv2 weights strictly.
    """
    drop = prefix + "mask_token"
    return {k: v for k, v in state_dict.items() if k != drop}
