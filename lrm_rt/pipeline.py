"""The reconstruction pipeline, one place per stage:

image -> preprocess -> network backend (image -> triplane) -> field backend (queries) ->
density grid + marching cubes + vertex colours -> mesh export; novel views by volume rendering.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image

from .checkpoint import LoadedModel, load_model
from .config import MAX_RENDER_SIZE, MIN_RENDER_SIZE, ModelConfig
from .errors import BackendError, ConfigError, LrmError, check_finite, check_int
from .export.manifest import is_export_dir
from .kernels import usable_cpus
from .field.base import FieldBackend
from .mesh import (Mesh, MeshFormat, Orientation, colour_vertices, export_mesh, extract_mesh, mesh_files,
                   empty_mesh_error, png_bytes, require_simplifier, simplify, write_atomic)
from .network_backends import NetworkBackend, TorchNetworkBackend
from .preprocess import PreprocessConfig, PreprocessResult, image_to_rgba, load_image, preprocess
from .texture import bake_texture, check_texture_size, require_xatlas

log = logging.getLogger(__name__)

DEFAULT_MODEL = "lrm-tiny"
ImageInput = Union[str, Path, np.ndarray, Image.Image]


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; anything else (a typo, ``meta``) is refused up front."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r} (cpu, cuda or cuda:N)")
    return device


def cuda_index(device: str) -> Optional[int]:
    """N of "cuda:N"; None for "cuda" (the current GPU) or the CPU."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


def set_torch_threads(n: int) -> None:
    """torch's intra-op threads, at most one per usable processor (more only add overhead to CPU-bound loops,
    and OpenMP exits the process when the OS refuses one)."""
    torch.set_num_threads(max(1, min(int(n), usable_cpus())))


def preprocess_config(cfg: ModelConfig, foreground_ratio: Optional[float] = None,
                      background_removal: str = "auto") -> PreprocessConfig:
    """The family's reference preprocessing for ``cfg`` (TripoSR run.py / OpenLRM infer_single)."""
    # A framing ratio (TripoSR's 0.85, lrm-tiny's, or the caller's) crops and pads as TripoSR's
    # resize_foreground does for either family (no resampling, so the C library reproduces it bit for bit);
    # the family's own resize then scales to the input size.
    ratio = cfg.foreground_ratio if foreground_ratio is None else foreground_ratio
    resize = "bilinear_aa" if cfg.family == "triposr" else "bicubic_ac"
    return PreprocessConfig(cfg.family, cfg.input_size, ratio, cfg.background, resize,
                            cfg.image_mean, cfg.image_std, background_removal=background_removal)


def field_backend(name: str = "auto", device: str = "cpu") -> FieldBackend:
    """``torch`` (reference), ``native`` (CPU kernels), ``cuda`` (CuPy kernels) or ``auto``."""
    from .field.torch_ref import TorchFieldBackend

    if name == "torch":
        return TorchFieldBackend()
    if name == "cuda" or (name == "auto" and device.startswith("cuda")):
        try:
            from .field.cuda import CudaFieldBackend
        except ImportError as exc:
            raise BackendError(f"CUDA field backend unavailable: {exc}") from None
        return CudaFieldBackend(device=cuda_index(device))
    if name in ("native", "auto"):
        try:
            from .field.native import NativeFieldBackend

            return NativeFieldBackend()
        except (ImportError, BackendError) as exc:
            if name == "native":
                raise BackendError(f"native field backend unavailable: {exc}") from None
            log.warning("the native CPU kernels are unavailable (%s); the field runs on the torch reference, "
                        "much slower (lrm-rt info says more)", " ".join(str(exc).split())[:300])
            return TorchFieldBackend()
    raise ConfigError(f"unknown field backend {name!r} (auto, torch, native, cuda)")


def exported_network_backend(export_dir: Union[str, Path], name: str = "auto", device: str = "cpu",
                             precision: Optional[str] = None, threads: Optional[int] = None) -> NetworkBackend:
    """The backend that runs an export directory: ``onnxruntime`` (``auto``) or ``tensorrt``. ``precision``
    None: the fp32 graphs in ONNX Runtime, the engines as built in TensorRT."""
    if name in ("auto", "onnxruntime"):
        from .onnx_backend import OnnxRuntimeNetworkBackend

        providers = "cuda" if device.startswith("cuda") else "cpu"
        return OnnxRuntimeNetworkBackend(export_dir, providers=providers, threads=threads,
                                         precision=precision or "fp32")
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTNetworkBackend

        return TensorRTNetworkBackend(export_dir, device=device, device_id=cuda_index(device) or 0,
                                      precision=precision or "auto")
    if name == "torch":
        raise ConfigError(f"{export_dir} is an export directory (ONNX graphs, no torch weights): use "
                          "--network-backend onnxruntime or tensorrt, or pass the original checkpoint")
    raise ConfigError(f"unknown network backend {name!r} (auto, torch, onnxruntime, tensorrt)")


@dataclass
class Reconstruction:
    """One image's result. ``timings`` holds seconds per stage."""

    source: str
    mesh: Optional[Mesh]
    triplane: torch.Tensor
    views: List[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 novel views
    preprocessed: Optional[np.ndarray] = None  # the framed, composited input (uint8)
    timings: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


class Reconstructor:
    """Load a model once, then reconstruct images to meshes.

    >>> rec = Reconstructor("lrm-tiny")                      # doctest: +SKIP
    >>> result = rec.reconstruct("chair.png")                # doctest: +SKIP
    >>> rec.save(result, "out/", "chair", fmt="glb")         # doctest: +SKIP

    ``precision`` None: fp32 for torch and ONNX Runtime, TensorRT's engines as they were built; "auto" as the
    CLI's --precision (bf16 where it measures faster on this CPU).
    """

    def __init__(self, model: Union[str, LoadedModel] = DEFAULT_MODEL, *, device: str = "cpu",
                 network_backend: Union[str, NetworkBackend] = "auto", field_backend_name: str = "auto",
                 precision: Optional[str] = None, threads: Optional[int] = None, random_weights: bool = False):
        if not isinstance(model, (str, Path, LoadedModel)):
            raise ConfigError(f"model must be a name, a directory or a LoadedModel, got {type(model).__name__}")
        check_device(device)
        if threads is not None:
            set_torch_threads(check_int("threads", threads, 1))
        t0 = time.perf_counter()
        if isinstance(model, (str, Path)) and not isinstance(network_backend, NetworkBackend) and is_export_dir(model):
            # An export directory (lrm-rt export) holds graphs, not torch weights: no checkpoint to load.
            self.network = exported_network_backend(model, network_backend, device, precision, threads)
            self.model = LoadedModel(self.network.config, None, f"export {model} ({self.network.name})")
        else:
            self.model = model if isinstance(model, LoadedModel) else load_model(model, random_weights=random_weights)
            if isinstance(network_backend, NetworkBackend):
                self.network = network_backend
            elif network_backend in ("torch", "auto"):
                # a LoadedModel from the caller may be shared with other Reconstructors: left as it is
                self.network = TorchNetworkBackend(self.model.network, device, precision or "fp32",
                                                   in_place=not isinstance(model, LoadedModel))
            elif network_backend in ("onnxruntime", "tensorrt"):
                raise ConfigError(f"--network-backend {network_backend} runs an export directory "
                                  f"(lrm-rt export --model M --out DIR, then --model DIR), not {model}")
            else:
                raise ConfigError(f"unknown network backend {network_backend!r} (auto, torch, onnxruntime, tensorrt)")
        self.config: ModelConfig = self.model.config
        self.field = field_backend(field_backend_name, device)
        self.load_seconds = time.perf_counter() - t0

    def preprocess(self, image: ImageInput, foreground_ratio: Optional[float] = None,
                   background_removal: str = "auto") -> PreprocessResult:
        cfg = preprocess_config(self.config, foreground_ratio, background_removal)
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
                image = image_to_rgba(Image.fromarray(image.reshape(image.shape[:2]) if image.ndim == 3 and
                                                      image.shape[2] == 1 else image))  # grey / RGB: opaque RGBA
            return preprocess(image, cfg)
        if isinstance(image, Image.Image):
            return preprocess(image_to_rgba(image), cfg)
        if not isinstance(image, (str, Path)):
            raise ConfigError(f"image must be a file path, a PIL image or an (H, W, 4) RGBA / (H, W, 3) RGB / (H, W) "
                              f"grey uint8 array, "
                              f"got {type(image).__name__}")
        return preprocess(load_image(image), cfg, source=str(image))

    def triplane(self, pre: PreprocessResult, camera: Optional[torch.Tensor] = None):
        return self.network.run(pre.pixel_values, camera)

    def reconstruct(self, image: Union[ImageInput, PreprocessResult], *, mc_resolution: Optional[int] = None,
                    mc_threshold: Optional[float] = None, vertex_colors: bool = True, render_views: int = 0,
                    render_size: Optional[int] = None, make_mesh: bool = True,
                    foreground_ratio: Optional[float] = None, target_faces: int = 0,
                    texture_size: int = 0) -> Reconstruction:
        """target_faces > 0: simplify the mesh to about that many faces (colours queried at the new vertices);
        texture_size > 0: bake a texture_size² UV texture (lrm_rt.texture) instead of vertex colours."""
        cfg = self.config
        if mc_resolution is not None:
            check_int("mc_resolution", mc_resolution, 2)
        if render_size is not None:
            check_int("render_size", render_size, MIN_RENDER_SIZE, MAX_RENDER_SIZE)
        check_int("render_views", render_views, 0)
        if render_size is not None and not render_views:
            raise ConfigError("render_size sets the size of the novel views: pass render_views=N (none are rendered)")
        if mc_threshold is not None:
            mc_threshold = check_finite("mc_threshold", mc_threshold)
        if not isinstance(vertex_colors, (bool, np.bool_)):  # "no" would count as true
            raise ConfigError(f"vertex_colors must be True or False, got {vertex_colors!r}")
        if texture_size:
            check_texture_size(texture_size)
            require_xatlas()
        if target_faces:
            check_int("target_faces", target_faces, 4)
            require_simplifier()
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        pre = image if isinstance(image, PreprocessResult) else self.preprocess(image, foreground_ratio)
        timings["preprocess"] = time.perf_counter() - t0
        triplane, net_t = self.triplane(pre)
        timings.update(net_t)
        fld = self.network.triplane_field(triplane)
        mesh = None
        if make_mesh:
            mesh = extract_mesh(fld, self.field, mc_resolution or cfg.mc_resolution,
                                cfg.mc_threshold if mc_threshold is None else mc_threshold,
                                vertex_colors and not texture_size and not target_faces)
            if target_faces:
                mesh = simplify(mesh, target_faces)
            if texture_size and mesh.num_faces:
                mesh = bake_texture(mesh, fld, self.field, texture_size)
            elif vertex_colors and target_faces:
                colour_vertices(mesh, fld, self.field)
            timings.update(mesh.timings)
        views: List[np.ndarray] = []
        if render_views:
            t0 = time.perf_counter()
            views = self.render(fld, render_views, render_size or min(cfg.render_size, 256))
            timings["render"] = time.perf_counter() - t0
        source = str(image) if isinstance(image, (str, Path)) else "<array>"
        warnings = list(pre.warnings)
        if mesh is not None and mesh.num_faces == 0:  # save() refuses it; say why already here
            warnings.append(str(empty_mesh_error(mesh)))
        return Reconstruction(source, mesh, triplane, views, pre.display_rgb, timings, warnings)

    def render(self, fld, n_views: int, size: int) -> List[np.ndarray]:
        """Novel views on an orbit around the object (the family's default video cameras)."""
        from . import render as R

        cfg = self.config
        if cfg.family == "triposr":
            rays_o, rays_d = R.spherical_cameras(n_views, 0.0, 1.9, 40.0, size, size)
            images = [self.field.render(fld, rays_o[i], rays_d[i]).rgb for i in range(n_views)]
        else:
            cams = R.surrounding_cameras(n_views + (cfg.version == "1.1"), version=cfg.version)[:n_views]
            opts = R.OpenLRMRenderOptions(n_coarse=cfg.samples_per_ray // 2, n_fine=cfg.samples_per_ray // 2,
                                          version=cfg.version)
            images = []
            for cam in cams:
                o, d = R.openlrm_rays(cam, size)
                images.append(self.field.render(fld, o, d, opts).rgb)
        return [(img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for img in images]

    @staticmethod
    def save(result: Reconstruction, out_dir: Union[str, Path], name: str, fmt: MeshFormat = "glb",
             orientation: Orientation = "native") -> List[Path]:
        """Write the mesh (and views) as ``out_dir/name.fmt`` (``name_viewK.png``); returns the paths. A name that
        already ends in ``.fmt``, in any case ("chair.GLB"), is the mesh file's name as given."""
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            # os.sep / altsep are one of these; NUL ends a name at the OS
            raise ConfigError(f"output name must be a plain file name (no directories), got {name!r}")
        fmt = str(fmt).lower()  # type: ignore[assignment]
        file_name = f"{name}.{fmt}"
        if name.lower().endswith(f".{fmt}") and len(name) > len(fmt) + 1:  # "chair.glb" means chair + .glb
            name, file_name = name[:-len(fmt) - 1], name
        out = Path(out_dir)
        written: List[Path] = []
        if result.mesh is not None:
            path = export_mesh(result.mesh, out / file_name, fmt, orientation)
            written += mesh_files(result.mesh, path, fmt)
        for k, img in enumerate(result.views):
            p = out / f"{name}_view{k:03d}.png"
            write_atomic(p, png_bytes(img))  # as the mesh: no half-written file on failure
            written.append(p)
        return written
