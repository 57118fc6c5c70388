"""The interface every triplane-field backend (torch reference, native CPU, CUDA) implements.

A backend only has to evaluate the field at points; the renderers in ``lrm_rt.render`` do the
ray sampling and compositing on top of ``query``, so a faster backend gets rendering for free
(and may still override ``render`` with a fused implementation).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch

from .spec import TriplaneField

if TYPE_CHECKING:  # render imports the torch reference, which imports this module
    from ..render import OpenLRMRenderOptions, RenderOutput, TripoSRRenderOptions


class FieldBackend(ABC):
    """Evaluates a ``TriplaneField``: point queries, mesh density grids and (via ``lrm_rt.render``) renders."""

    name: str = "abstract"

    @abstractmethod
    def query(
        self, field: TriplaneField, points: torch.Tensor, raw_density: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode the field at world-space points.

        points: (N, 3) float32 in the family's world frame (not divided by the radius).
        Returns (density (N,), rgb (N, 3)). rgb is always activated (family colour activation).
        density is the activated density, or with ``raw_density=True`` the decoder's raw output
        (channel 0, before density_bias and activation): OpenLRM's ray marcher averages raw
        sigma between samples before activating it.
        """

    @abstractmethod
    def density_grid(self, field: TriplaneField, resolution: int, level: Optional[float] = None) -> torch.Tensor:
        """Activated density on the family's marching-cubes grid, shape (R, R, R), [i,j,k] = (x_i, y_j, z_k).

        TripoSR: linspace(0, 1, R) mapped to [-radius, radius]; OpenLRM: linspace(-1, 1, R).
        level: the iso-level the grid will be meshed at, a hint a backend may use (e.g. to evaluate
        exactly only near the surface) as long as the side of ``level`` of every value is kept;
        the reference ignores it. Implementations must not materialise all R^3 points at once.
        """

    def render(
        self,
        field: TriplaneField,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        options: Optional[Union["TripoSRRenderOptions", "OpenLRMRenderOptions"]] = None,
    ) -> "RenderOutput":
        """Volume-render rays (..., 3) with the family's renderer, evaluating the field through ``self.query``.

        options: ``TripoSRRenderOptions`` / ``OpenLRMRenderOptions`` (defaults by family when None).
        Returns a ``RenderOutput`` whose tensors have the rays' leading shape.
        """
        from ..render import render_field

        return render_field(field, rays_o, rays_d, options, query=self.query)
