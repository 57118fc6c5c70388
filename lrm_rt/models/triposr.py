"""TripoSR's triplane tokens, transformer backbone and upsampler (parameter names as published).

The backbone is a 1-D diffusers-style transformer: GroupNorm + proj_in, blocks of
self-attention -> cross-attention -> GEGLU feed-forward (plain pre-LayerNorm), proj_out, and a
residual around the whole stack. There is no camera input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (``to_out.0``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer1D(nn.Module):
    """``backbone.*``: (B, C, N) triplane tokens + (B, M, Dc) image tokens -> (B, C, N)."""

    def __init__(self, in_channels: int, heads: int, head_dim: int, layers: int, context_dim: int,
                 norm_groups: int = 32):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(layers))
        self.proj_out = nn.Linear(inner, in_channels)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(self.norm(tokens).transpose(1, 2))
        for block in self.transformer_blocks:
            x = block(x, context)
        return self.proj_out(x).transpose(1, 2) + tokens


class Triplane1DTokenizer(nn.Module):
    """``tokenizer.embeddings``: learned (3, C, P, P) tokens, flattened plane-major then row-major."""

    def __init__(self, plane_size: int, channels: int):
        super().__init__()
        self.plane_size = plane_size
        self.embeddings = nn.Parameter(torch.zeros(3, channels, plane_size, plane_size))

    def forward(self, batch: int) -> torch.Tensor:
        e = self.embeddings
        return e.permute(1, 0, 2, 3).reshape(1, e.shape[1], -1).expand(batch, -1, -1)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        b, c, _ = tokens.shape
        p = self.plane_size
        return tokens.view(b, c, 3, p, p).permute(0, 2, 1, 3, 4)


class TriplaneUpsampleNetwork(nn.Module):
    """``post_processor.upsample``: a ConvTranspose2d(k=2, s=2) shared by the three planes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        b, n = planes.shape[:2]
        x = self.upsample(planes.reshape(b * n, *planes.shape[2:]))
        return x.view(b, n, *x.shape[1:])
