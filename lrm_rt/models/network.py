"""The image-to-triplane network of both families, with the published parameter names.

``LRMNetwork.state_dict()`` has exactly the keys of the released checkpoint for its config
(TripoSR ``model.ckpt``, OpenLRM v1.1 ``model.safetensors``, OpenLRM v1.0 ``model.pth['weights']``),
so loading is a strict ``load_state_dict`` after name normalisation (see ``lrm_rt.checkpoint``).
The NeRF decoder's weights live here too (they are in the checkpoint) but are evaluated by the
field backends, which receive them through ``triplane_field``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..field.spec import TriplaneField
from .dinov2 import Dinov2, Dinov2Config
from .openlrm import CameraEmbedder, OpenLRMTransformer, V10Transformer, upsample_planes
from .triposr import Transformer1D, Triplane1DTokenizer, TriplaneUpsampleNetwork
from .vit import DinoViT


class _Wrap(nn.Module):
    """Adds the ``.model`` level of the published names (``image_tokenizer.model.*``, ``encoder.model.*``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _mlp(cfg: ModelConfig) -> nn.Sequential:
    """NeRF MLP as an nn.Sequential whose Linear layers sit at the published even indices."""
    act = nn.SiLU if cfg.family == "triposr" else nn.ReLU
    dims = [cfg.decoder_in] + [cfg.decoder_hidden] * (cfg.decoder_linear_layers - 1) + [4]
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def default_source_camera(distance: float = 2.0, batch: int = 1) -> torch.Tensor:
    """OpenLRM's canonical source camera: at (0, -d, 0) looking +y, z up; f = 0.75, c = 0.5 (normalised)."""
    cam = torch.tensor([1, 0, 0, 0, 0, 0, -1, -distance, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5],
                       dtype=torch.float32)
    return cam.unsqueeze(0).expand(batch, -1).contiguous()


class LRMNetwork(nn.Module):
    """Image (normalised pixels) [+ camera] -> triplane (B, 3, C, 2L, 2L) for one ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        enc = Dinov2(cfg.encoder) if isinstance(cfg.encoder, Dinov2Config) else DinoViT(cfg.encoder)
        if cfg.family == "triposr":
            self.image_tokenizer = _Wrap(enc)
            self.tokenizer = Triplane1DTokenizer(cfg.triplane_low_res, cfg.transformer_dim)
            self.backbone = Transformer1D(cfg.transformer_dim, cfg.transformer_heads, cfg.head_dim,
                                          cfg.transformer_layers, cfg.encoder_feat_dim)
            self.post_processor = TriplaneUpsampleNetwork(cfg.transformer_dim, cfg.triplane_dim)
            self.decoder = nn.Module()
            self.decoder.layers = _mlp(cfg)
        else:
            self.encoder = _Wrap(enc)
            self.camera_embedder = CameraEmbedder(16, cfg.camera_embed_dim)
            args = (cfg.transformer_dim, cfg.transformer_layers, cfg.transformer_heads,
                    cfg.encoder_feat_dim, cfg.camera_embed_dim)
            if cfg.version == "1.1":
                self.pos_embed = nn.Parameter(torch.zeros(1, 3 * cfg.triplane_low_res ** 2, cfg.transformer_dim))
                self.transformer = OpenLRMTransformer(*args)
                self.upsampler = nn.ConvTranspose2d(cfg.transformer_dim, cfg.triplane_dim, 2, 2, 0)
            else:
                self.transformer = V10Transformer(*args, cfg.triplane_low_res, cfg.triplane_dim)
            self.synthesizer = nn.Module()
            self.synthesizer.decoder = nn.Module()
            self.synthesizer.decoder.net = _mlp(cfg)

    # -- stages -----------------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, S, S) pixels -> image tokens (B, 1 + P, encoder_feat_dim)."""
        enc = self.image_tokenizer if self.config.family == "triposr" else self.encoder
        return enc(pixels)

    def image_to_triplane(self, tokens: torch.Tensor, camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image tokens [+ 16-number source camera for OpenLRM] -> triplane (B, 3, C, H, W)."""
        cfg = self.config
        b = tokens.shape[0]
        if cfg.family == "triposr":
            lowres = self.tokenizer.detokenize(self.backbone(self.tokenizer(b), tokens))
            return self.post_processor(lowres)
        if camera is None:
            camera = default_source_camera(cfg.source_cam_dist, b).to(tokens)
        mod = self.camera_embedder(camera)
        if cfg.version == "1.1":
            pos, deconv = self.pos_embed, self.upsampler
        else:
            pos, deconv = self.transformer.pos_embed, self.transformer.deconv
        x = self.transformer(pos.expand(b, -1, -1), tokens, mod)
        return upsample_planes(x, deconv, cfg.triplane_low_res)

    def forward(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.image_to_triplane(self.encode(pixels), camera)

    # -- field --------------------------------------------------------------------------------
    def decoder_layers(self) -> List[nn.Linear]:
        seq = self.decoder.layers if self.config.family == "triposr" else self.synthesizer.decoder.net
        return [m for m in seq if isinstance(m, nn.Linear)]

    def decoder_params(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        layers = self.decoder_layers()
        return ([l.weight.detach().float().contiguous() for l in layers],
                [l.bias.detach().float().contiguous() for l in layers])

    def triplane_field(self, triplane: torch.Tensor) -> TriplaneField:
        """One object's field: planes (3, C, H, W) of a single triplane plus the decoder weights."""
        if triplane.dim() == 5:
            if triplane.shape[0] != 1:
                raise ValueError("triplane_field takes one object; index the batch first")
            triplane = triplane[0]
        w, b = self.decoder_params()
        return TriplaneField(triplane.detach().float().contiguous(), w, b, self.config.field_spec)

    def stage_outputs(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        tokens = self.encode(pixels)
        return {"encoder_tokens": tokens, "triplane": self.image_to_triplane(tokens, camera)}
