"""What a field backend needs to decode a triplane: planes, MLP weights and the family's conventions.

The two families differ only in a handful of conventions (third-plane axis order, world box,
activations); everything else about the field is shared, so one ``FieldSpec`` describes both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

import torch

from ..errors import FieldError

Family = Literal["triposr", "openlrm"]


@dataclass(frozen=True)
class FieldSpec:
    """Conventions of one model family's triplane field.

    radius: world box is [-radius, radius]^3 (TripoSR 0.87, OpenLRM 1.0); points are divided by it
        before the plane lookup.
    third_plane: axes (u, v) of plane 2: "yz" (TripoSR) or "zy" (OpenLRM). Planes 0/1 are (x,y), (x,z);
        u indexes the plane's width (last axis), v its height.
    hidden_activation: "silu" (TripoSR) or "relu" (OpenLRM) between linear layers.
    density_activation: "exp" -> exp(raw + density_bias) (TripoSR), "softplus" -> softplus(raw + density_bias)
        (OpenLRM); density_bias is -1 for both.
    color_activation: "sigmoid" (TripoSR) or "sigmoid_clamp" -> sigmoid*1.002 - 0.001 (OpenLRM).
    """

    family: Family
    radius: float
    third_plane: Literal["yz", "zy"]
    hidden_activation: Literal["silu", "relu"]
    density_activation: Literal["exp", "softplus"]
    color_activation: Literal["sigmoid", "sigmoid_clamp"]
    density_bias: float = -1.0


TRIPOSR_FIELD = FieldSpec("triposr", 0.87, "yz", "silu", "exp", "sigmoid")
OPENLRM_FIELD = FieldSpec("openlrm", 1.0, "zy", "relu", "softplus", "sigmoid_clamp")


@dataclass
class TriplaneField:
    """One object's decodable field.

    planes: (3, C, H, W) float32 (batch already selected).
    weights / biases: the decoder's linear layers in order; weights[i] is (out, in) as in nn.Linear.
        The last layer has 4 outputs: [raw density, 3 raw colour channels].
    """

    planes: torch.Tensor
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    spec: FieldSpec
    extra: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.planes.shape[1])


def check_finite_points(finite: bool, n_bad=None) -> None:
    """The kernels clamp query points into the box, so NaN/inf points would decode as finite values (the torch
    reference gives NaN): refuse them. ``finite``: whether every coordinate is finite."""
    if not finite:
        raise FieldError(f"query points hold {int(n_bad)} NaN/inf coordinates" if n_bad is not None
                         else "query points hold NaN/inf coordinates")


def check_finite_planes(planes: torch.Tensor) -> None:
    """NaN/inf in a triplane would give a silently wrong grid or mesh: refuse it with a clear error."""
    if not bool(torch.isfinite(planes).all()):
        bad = int((~torch.isfinite(planes)).sum())
        raise FieldError(f"the triplane holds {bad} NaN/inf values; the network output is not meshable "
                         "(check the input image and the checkpoint)")
