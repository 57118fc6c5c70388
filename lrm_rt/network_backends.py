"""Network backends: image pixels (+ camera) -> triplane. One interface, several engines.

``torch`` is the reference (fp32) and also runs reduced precision (bf16/fp16); ONNX Runtime and
TensorRT backends (from ``lrm-rt export``) implement the same interface.
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

import torch

from .config import ModelConfig
from .errors import BackendError, ConfigError
from .files import cache_dir
from .field.spec import TriplaneField
from .models.network import LRMNetwork, default_source_camera

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (other AVX512 CPUs emulate them, which is slower)."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if callable(p)]
    if probes:
        return any(p() for p in probes)
    cap = torch.backends.cpu.get_cpu_capability()  # older torch: the coarse ISA level only
    return "AVX512" in cap or "AMX" in cap


# (width, threads) -> whether bf16 won the probe; one probe per process and shape
_BF16_PROBES: Dict[Tuple[int, int], bool] = {}
BF16_MIN_SPEEDUP = 1.15  # bf16 costs accuracy (~1 % Chamfer), so it must be clearly faster to be chosen


def _time_matmuls(width: int, tokens: int, rounds: int = 5) -> Tuple[float, float]:
    """Best seconds of (fp32, bf16) for a transformer MLP's first matmul, (tokens, width) @ (width, 4 width).
    The two precisions alternate round by round, so a burst of load from other processes hits both."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, width, generator=gen), torch.randn(width, 4 * width, generator=gen)
    pairs = [(x, w), (x.bfloat16(), w.bfloat16())]
    best = [float("inf"), float("inf")]
    for a, b in pairs:
        torch.mm(a, b)  # warm-up: first-call dispatch and weight packing
    for _ in range(rounds):
        for i, (a, b) in enumerate(pairs):
            t = time.perf_counter()
            torch.mm(a, b)
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _probe_file() -> Path:
    return cache_dir() / "bf16_probe.json"


def _stored_probes() -> dict:
    try:
        data = json.loads(_probe_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cpu_bf16_is_faster(width: int = 1024) -> bool:
    """Measured, not assumed: CPUs with native bf16 differ (bf16 ran 2.7x faster than fp32 on an AMD EPYC with
    AVX512-BF16, 1.4-1.7x *slower* on an Intel Xeon with AVX512-BF16 but no AMX), so time the network's dominant
    operation at its width in both precisions, at the current thread count. Enough tokens for ~0.25 GFLOP per
    matmul (timer noise swamps smaller ones); 0.02-0.2 s. The decision is kept per process and stored in the
    kernel cache folder per CPU model, torch version, width and thread count, so that the same command gives the
    same mesh on a machine run after run (a probe under load from other processes could decide otherwise)."""
    key = (int(width), torch.get_num_threads())
    if key not in _BF16_PROBES:
        name = f"{_cpu_model()} | torch {torch.__version__} | width {key[0]} | threads {key[1]}"
        stored = _stored_probes()
        if isinstance(stored.get(name), bool):
            _BF16_PROBES[key] = stored[name]
        else:
            tokens = int(min(1024, max(128, 0.25e9 / (8 * key[0] ** 2))))
            t32, t16 = _time_matmuls(key[0], tokens)
            _BF16_PROBES[key] = stored[name] = t16 * BF16_MIN_SPEEDUP < t32
            try:  # best effort: an unwritable cache only means probing again next time
                f = _probe_file()
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(stored, indent=1))
                os.replace(tmp, f)
            except OSError:
                pass
    return _BF16_PROBES[key]


def resolve_precision(precision: str, device: str = "cpu", width: int = 1024) -> str:
    """``auto``: bf16 on CPUs with native bf16 where it also measures clearly faster at this network's
    ``width`` (mesh within 1 % Chamfer; export/README.md), fp32 elsewhere. Explicit fp32 / bf16 / fp16 pass
    through."""
    if precision == "auto":
        fast = device.startswith("cpu") and cpu_has_native_bf16() and cpu_bf16_is_faster(width)
        return "bf16" if fast else "fp32"
    if precision not in DTYPES:
        raise ConfigError(f"unknown precision {precision!r} (auto, fp32, bf16, fp16)")
    return precision


class NetworkBackend(ABC):
    name = "abstract"
    config: ModelConfig
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]

    @abstractmethod
    def run(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(B, 3, S, S) normalised pixels -> (triplane (B, 3, C, H, W) float32, per-stage seconds)."""

    def triplane_field(self, triplane: torch.Tensor) -> TriplaneField:
        """The decodable field of one object; the triplane hand-off stays float32."""
        if triplane.dim() == 5:
            triplane = triplane[0]
        return TriplaneField(triplane.float().contiguous(), self.weights, self.biases, self.config.field_spec)


def _converted_copy(network: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``network`` on ``device`` in ``dtype`` (floating tensors only, as Module.to), as a copy when that changes
    anything: each tensor is converted once, straight into the copy (no second full-precision copy on the way)."""
    tensors = list(network.parameters()) + list(network.buffers())
    def placed(t: torch.Tensor) -> bool:  # "cuda" names the current GPU
        return t.device.type == device.type and device.index in (None, t.device.index)

    if all(placed(t) and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return network

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device, dtype) if t.is_floating_point() else t.detach().to(device)

    memo = {id(p): torch.nn.Parameter(convert(p), requires_grad=p.requires_grad) for p in network.parameters()}
    memo.update({id(b): convert(b) for b in network.buffers()})
    return copy.deepcopy(network, memo)


class TorchNetworkBackend(NetworkBackend):
    name = "torch"

    def __init__(self, network: LRMNetwork, device: str = "cpu", precision: str = "auto", *, in_place: bool = False):
        """``in_place``: convert ``network`` itself to the device and precision (for a network nobody else uses);
        otherwise a network that needs converting is copied, so a model shared by several backends keeps its own."""
        precision = resolve_precision(precision, device, network.config.transformer_dim)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("--device cuda was requested but torch sees no CUDA GPU")
        self.config = network.config
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.weights, self.biases = network.decoder_params()  # fp32 copies for the field
        if not in_place:
            network = _converted_copy(network, self.device, self.dtype)
        self.network = network.to(self.device, self.dtype).eval()

    @torch.no_grad()
    def run(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        net = self.network
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        x = pixels.to(self.device, self.dtype)
        if camera is None and self.config.family == "openlrm":
            camera = default_source_camera(self.config.source_cam_dist, x.shape[0])
        if camera is not None:
            camera = camera.to(self.device, self.dtype)
        t0 = time.perf_counter()
        tokens = net.encode(x)
        sync()
        t1 = time.perf_counter()
        triplane = net.image_to_triplane(tokens, camera).float()
        sync()
        t2 = time.perf_counter()
        return triplane.cpu() if self.device.type == "cpu" else triplane, {"encoder": t1 - t0, "transformer": t2 - t1}
