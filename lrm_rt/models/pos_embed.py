"""Baking of an encoder's interpolated position table for one input size (shared by both ViT flavours).

Exported graphs then hold a constant instead of a bicubic (antialiased) resize, which ONNX cannot
express; loading new weights re-bakes the table so it never goes stale.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor


class BakedPosEmbed(nn.Module):
    """Mixin: subclasses define ``interpolated_pos_embed(height, width)`` and call ``_init_pos_baking()``."""

    def _init_pos_baking(self) -> None:
        self.register_buffer("baked_pos_embed", None, persistent=False)
        self._baked_hw: Optional[Tuple[int, int]] = None
        self.register_load_state_dict_post_hook(_rebake_after_load)

    def interpolated_pos_embed(self, height: int, width: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bake_pos_embed(self, height: int, width: int) -> None:
        with torch.no_grad():
            table = self.interpolated_pos_embed(height, width).detach().clone()
        self.baked_pos_embed = table
        self._baked_hw = (int(height), int(width))

    def clear_baked_pos_embed(self) -> None:
        self.baked_pos_embed = None
        self._baked_hw = None

    def pos_embed_for(self, height: int, width: int) -> Tensor:
        if self.baked_pos_embed is not None and self._baked_hw == (height, width):
            return self.baked_pos_embed
        return self.interpolated_pos_embed(height, width)


def _rebake_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    if getattr(module, "_baked_hw", None) is not None:
        module.bake_pos_embed(*module._baked_hw)
