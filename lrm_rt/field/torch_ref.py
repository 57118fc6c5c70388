"""PyTorch reference of the triplane field: plane sampling, NeRF MLP, activations, density grids.

This is the oracle the fast kernels are tested against, so it follows the reference
implementations' float32 operations closely rather than being clever.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, ResourceError
from .base import FieldBackend
from .memory import available_host_memory, check_grid_memory
from .spec import Family, FieldSpec, TriplaneField

DEFAULT_CHUNK = 1 << 18  # points per MLP evaluation: bounds peak memory at ~ chunk * (3C + hidden) floats

# Decoder linear layers in the published state dicts; an optional prefix (e.g. "model.") is tolerated.
_DECODER_KEY = {
    "triposr": re.compile(r"^(?:.*\.)?decoder\.layers\.(\d+)\.(weight|bias)$"),
    "openlrm": re.compile(r"^(?:.*\.)?decoder\.net\.(\d+)\.(weight|bias)$"),
}


def decoder_from_state_dict(
    state_dict: Dict[str, torch.Tensor], family: Family
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Extract the NeRF MLP's linear layers (weights (out,in), biases) ordered by layer index.

    TripoSR: ``decoder.layers.{0,2,...}``; OpenLRM (v1.0 and v1.1): ``synthesizer.decoder.net.{0,2,4,6}``
    (odd indices are the parameter-free activations).
    """
    if family not in _DECODER_KEY:
        raise CheckpointError(f"unknown model family {family!r}")
    pattern = _DECODER_KEY[family]
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise CheckpointError(f"no {family} NeRF decoder layers found in the checkpoint")
    weights: List[torch.Tensor] = []
    biases: List[torch.Tensor] = []
    for idx in sorted(layers):
        layer = layers[idx]
        if "weight" not in layer or "bias" not in layer:
            raise CheckpointError(f"decoder layer {idx} is missing its weight or bias")
        w, b = layer["weight"].float(), layer["bias"].float()
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise CheckpointError(f"decoder layer {idx} has shapes {tuple(w.shape)} / {tuple(b.shape)}")
        if weights and weights[-1].shape[0] != w.shape[1]:
            raise CheckpointError(f"decoder layer {idx} expects {w.shape[1]} inputs, previous layer gives {weights[-1].shape[0]}")
        weights.append(w)
        biases.append(b)
    if weights[-1].shape[0] != 4:
        raise CheckpointError(f"decoder output has {weights[-1].shape[0]} channels, expected 4 (density + rgb)")
    return weights, biases


def _plane_coords(points: torch.Tensor, spec: FieldSpec) -> torch.Tensor:
    """(N,3) world points -> (3, N, 2) grid_sample coordinates (u = width axis, v = height axis)."""
    p = points / spec.radius
    x, y, z = p.unbind(-1)
    third = (y, z) if spec.third_plane == "yz" else (z, y)
    return torch.stack(
        [torch.stack((x, y), -1), torch.stack((x, z), -1), torch.stack(third, -1)], dim=0
    )


def sample_triplane(planes: torch.Tensor, points: torch.Tensor, spec: FieldSpec) -> torch.Tensor:
    """Bilinear triplane features at world points: (N, 3) -> (N, 3C), plane-major [xy | xz | yz-or-zy]."""
    n = points.shape[0]
    grid = _plane_coords(points, spec).unsqueeze(1)  # (3, 1, N, 2)
    feats = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return feats[:, :, 0, :].permute(2, 0, 1).reshape(n, -1)  # (3, C, N) -> (N, 3, C) -> (N, 3C)


def decode(field: TriplaneField, features: torch.Tensor) -> torch.Tensor:
    """NeRF MLP: (N, 3C) features -> raw (N, 4) = [density, 3 colour channels], no output activation."""
    act = F.silu if field.spec.hidden_activation == "silu" else F.relu
    x = features
    last = len(field.weights) - 1
    for i, (w, b) in enumerate(zip(field.weights, field.biases)):
        x = F.linear(x, w, b)
        if i < last:
            x = act(x)
    return x


def activate_density(raw_density: torch.Tensor, spec: FieldSpec) -> torch.Tensor:
    """Family density activation of the raw decoder output (bias included)."""
    x = raw_density + spec.density_bias
    return torch.exp(x) if spec.density_activation == "exp" else F.softplus(x)


def activate_color(raw_color: torch.Tensor, spec: FieldSpec) -> torch.Tensor:
    """Family colour activation; OpenLRM widens the sigmoid slightly (MipNeRF clamping)."""
    c = torch.sigmoid(raw_color)
    return c if spec.color_activation == "sigmoid" else c * (1 + 2 * 0.001) - 0.001


def activate(raw: torch.Tensor, spec: FieldSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """raw (N, 4) -> (density (N,), rgb (N, 3))."""
    return activate_density(raw[:, 0], spec), activate_color(raw[:, 1:], spec)


def query_raw(field: TriplaneField, points: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Raw decoder output (N, 4) at world points, evaluated in chunks of ``chunk`` points."""
    points = points.reshape(-1, 3).to(field.planes)
    if points.shape[0] <= chunk:
        return decode(field, sample_triplane(field.planes, points, field.spec))
    return torch.cat(
        [decode(field, sample_triplane(field.planes, points[i : i + chunk], field.spec)) for i in range(0, points.shape[0], chunk)]
    )


def query(
    field: TriplaneField, points: torch.Tensor, raw_density: bool = False, chunk: int = DEFAULT_CHUNK
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(density (N,), rgb (N, 3)) at world points; density is raw (pre-bias) when ``raw_density``."""
    raw = query_raw(field, points, chunk)
    rgb = activate_color(raw[:, 1:], field.spec)
    density = raw[:, 0] if raw_density else activate_density(raw[:, 0], field.spec)
    return density, rgb


def grid_axis(resolution: int, spec: FieldSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Coordinates of the mesh grid along one axis, computed as each reference does."""
    if spec.family == "triposr":
        # TripoSR builds linspace(0,1) and rescales it to [-r, r]
        return torch.linspace(0.0, 1.0, resolution, device=device) * (2 * spec.radius) - spec.radius
    return torch.linspace(-spec.radius, spec.radius, resolution, device=device)


def grid_points(resolution: int, spec: FieldSpec) -> torch.Tensor:
    """All mesh grid points (R^3, 3), flat index i*R*R + j*R + k <-> (x_i, y_j, z_k). Only for small R."""
    a = grid_axis(resolution, spec)
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), dim=-1).reshape(-1, 3)


def density_grid(field: TriplaneField, resolution: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Activated density on the family's mesh grid (R, R, R), built slab by slab along x to bound memory."""
    r = int(resolution)
    if r < 2:
        raise ConfigError(f"density-grid resolution must be >= 2, got {resolution}")
    dev = field.planes.device
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else available_host_memory()
    # + one chunk of MLP activations (under 256 floats a point for every released decoder)
    check_grid_memory(r, chunk * 1024, free, "GPU" if dev.type == "cuda" else "host")
    a = grid_axis(r, field.spec, dev)
    try:
        out = torch.empty((r, r, r), dtype=field.planes.dtype, device=dev)
    except RuntimeError as e:  # torch reports a failed allocation as RuntimeError, not MemoryError
        raise ResourceError(f"allocating a {r}^3 density grid failed: {str(e).splitlines()[0]}") from None
    yy, zz = torch.meshgrid(a, a, indexing="ij")
    yz = torch.stack((yy, zz), dim=-1).reshape(-1, 2)  # (R*R, 2), shared by every x slab
    slabs = max(1, chunk // (r * r))
    for i0 in range(0, r, slabs):
        xs = a[i0 : i0 + slabs]
        pts = torch.cat([xs.repeat_interleave(r * r)[:, None], yz.repeat(len(xs), 1)], dim=1)
        density, _ = query(field, pts, chunk=chunk)
        out[i0 : i0 + len(xs)] = density.reshape(len(xs), r, r)
    return out


class TorchFieldBackend(FieldBackend):
    """The PyTorch reference backend (CPU or whatever device the field's tensors live on)."""

    name = "torch"

    def __init__(self, chunk: int = DEFAULT_CHUNK) -> None:
        self.chunk = chunk

    def query(
        self, field: TriplaneField, points: torch.Tensor, raw_density: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return query(field, points, raw_density=raw_density, chunk=self.chunk)

    def density_grid(self, field: TriplaneField, resolution: int, level: Optional[float] = None) -> torch.Tensor:
        return density_grid(field, resolution, chunk=self.chunk)  # exact everywhere: level is not needed
