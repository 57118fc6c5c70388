"""OpenLRM's image-to-triplane transformer (v1.0 and v1.1 share the maths; only module paths differ).

Blocks are pre-norm with camera-modulated LayerNorm (ModLN) and run cross-attention -> self-attention
-> MLP. Attention has no biases at all (``bias=False``). Parameter names equal the published ones, so a
released state dict loads strictly.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class CameraEmbedder(nn.Module):
    """16 camera numbers (3x4 c2w row-major + fx, fy, cx, cy normalised) -> modulation vector."""

    def __init__(self, raw_dim: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(raw_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.mlp(camera)


class ModLN(nn.Module):
    """LayerNorm whose output is scaled and shifted by the camera embedding: LN(x)·(1+scale) + shift."""

    def __init__(self, dim: int, mod_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(mod_dim, dim * 2))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mlp(mod).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ConditionModulationBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int, mod_dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = ModLN(dim, mod_dim, eps)
        # nn.MultiheadAttention stores q/k/v packed (in_proj_weight) when kdim == dim and separately
        # otherwise -- exactly the naming of the released checkpoints.
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=cond_dim, vdim=cond_dim, bias=False,
                                                batch_first=True)
        self.norm2 = ModLN(dim, mod_dim, eps)
        self.self_attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.norm3 = ModLN(dim, mod_dim, eps)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x, mod), cond, cond, need_weights=False)[0]
        h = self.norm2(x, mod)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm3(x, mod))


class OpenLRMTransformer(nn.Module):
    """``transformer.*`` of OpenLRM: the block stack and the final LayerNorm."""

    def __init__(self, dim: int, layers: int, heads: int, cond_dim: int, mod_dim: int, eps: float = 1e-6):
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionModulationBlock(dim, cond_dim, mod_dim, heads, eps) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cond, mod)
        return self.norm(x)


def upsample_planes(tokens: torch.Tensor, deconv: nn.ConvTranspose2d, low_res: int) -> torch.Tensor:
    """(N, 3·L², D) tokens in (plane, row, col) order -> (N, 3, C, 2L, 2L) through one shared deconv."""
    n, _, d = tokens.shape
    x = tokens.view(n, 3, low_res, low_res, d).permute(0, 1, 4, 2, 3).reshape(n * 3, d, low_res, low_res)
    x = deconv(x)
    return x.view(n, 3, *x.shape[1:])


class V10Transformer(OpenLRMTransformer):
    """v1.0 keeps the learned tokens and the deconvolution inside ``transformer``."""

    def __init__(self, dim: int, layers: int, heads: int, cond_dim: int, mod_dim: int,
                 low_res: int, triplane_dim: int):
        super().__init__(dim, layers, heads, cond_dim, mod_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 * low_res * low_res, dim))
        self.deconv = nn.ConvTranspose2d(dim, triplane_dim, kernel_size=2, stride=2, padding=0)
