"""``lrm-rt export --aoti``: the image-to-triplane network as one AOTInductor package for the C/C++ library.

Why AOTInductor (and not TorchScript): ``torch.jit`` is deprecated upstream, while an AOTI package is the
supported way to run an exported program from C++ (``torch::inductor::AOTIModelPackageLoader``); it is
compiled ahead of time for this machine's ISA, needs no Python at run time, and its cost (about a minute
per tiny fixture model on 2 cores) is paid once at export.

The package ``network.pt2`` holds encoder + transformer (+ upsampler) as one module: normalised pixels
(1, 3, S, S) [+ (1, 16) source camera for OpenLRM] -> triplane (1, 3, C, H, W) float32. Batch 1 is static:
the C API reconstructs one image per call. The package is validated against eager PyTorch on seeded inputs
and recorded under ``aoti`` in manifest.json, with its sha256 and size, so the C library can refuse a
package that does not belong to the directory.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from ..checkpoint import LoadedModel
from ..errors import ConfigError
from ..models.network import LRMNetwork
from . import manifest as M
from .onnx_export import FP32_TOL, ExportError, compare, image_encoder, sample_inputs

AOTI_NAME = "network.pt2"


class ImageToTriplane(nn.Module):
    """pixels [+ camera] -> triplane: the whole network the C library needs, as one graph."""

    def __init__(self, net: LRMNetwork):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net.image_to_triplane(self.net.encode(pixels), camera)


def check_aoti_device(device: str) -> None:
    """Refuse a device the package cannot be compiled for; call it before the ONNX export, which takes minutes."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--aoti device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("an AOTInductor package for cuda must be compiled on a machine with a CUDA GPU "
                          "(torch sees none here); use --aoti-device cpu")


def export_aoti(loaded: LoadedModel, out_dir: Union[str, Path], *, device: str = "cpu",
                log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Compile ``loaded`` into ``out_dir/network.pt2`` and add its entry to the directory's manifest.

    ``out_dir`` must already be an export directory (``export_model`` ran first): the library reads the
    model config and the decoder from it. Returns the manifest entry; raises ExportError when the package
    does not reproduce eager PyTorch within the fp32 tolerance.
    """
    check_aoti_device(device)
    out = Path(out_dir)
    man = M.read_manifest(out, require=())
    cfg = loaded.config
    if M.manifest_config(man) != cfg:
        raise ConfigError(f"{out} was exported from another model than {loaded.source}; export it again")
    net = loaded.network.float().eval()
    image_encoder(net).bake_pos_embed(cfg.input_size, cfg.input_size)  # a constant, not a resize, in the graph
    module = ImageToTriplane(net).to(device)
    example = sample_inputs(cfg, batch=1, seed=0)
    names = ["pixels"] + (["camera"] if "camera" in example else [])
    args = tuple(example[n].to(device) for n in names)

    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(module, args)
    path = out / AOTI_NAME
    path.unlink(missing_ok=True)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    log(f"compiled {AOTI_NAME} (AOTInductor, {device}) in {time.perf_counter() - t0:.1f} s")

    # Validation on other inputs than the example the graph was traced with.
    check = sample_inputs(cfg, batch=1, seed=1)
    check_args = tuple(check[n].to(device) for n in names)
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        ref = module(*check_args)
        got = runner(*check_args)
    got = got[0] if isinstance(got, (list, tuple)) else got
    result = compare(ref.cpu().numpy(), got.cpu().numpy(), FP32_TOL)
    log(f"  aoti triplane max abs {result['max_abs']:.3e} (limit {result['limit']:.1e}) "
        f"{'ok' if result['passed'] else 'FAILED'}")
    if not result["passed"]:
        path.unlink(missing_ok=True)
        raise ExportError(f"the AOTInductor package does not match PyTorch: {result}")

    shapes = {"pixels": [1, 3, cfg.input_size, cfg.input_size], "camera": [1, 16]}
    entry = {"file": AOTI_NAME, "sha256": M.sha256_file(path), "bytes": path.stat().st_size, "device": device,
             "inputs": [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in names],
             "outputs": [{"name": "triplane", "shape": [1, *M.triplane_shape(cfg)], "dtype": "float32"}],
             "torch": torch.__version__, "validation": {"seed": 1, "tolerance": FP32_TOL, "triplane": result}}
    man["aoti"] = entry
    M.write_manifest(out, man)
    return entry
