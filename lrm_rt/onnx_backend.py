"""ONNX Runtime network backend: runs an export directory's encoder and transformer graphs.

The decoder MLP comes from the directory's ``decoder.safetensors``, so no checkpoint or torch
network is needed. Providers: CUDA when ONNX Runtime has it (``onnxruntime-gpu``), else CPU.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import BackendError, CheckpointError, ConfigError, is_out_of_memory
from .export import manifest as M
from .kernels import usable_cpus
from .models.network import default_source_camera
from .network_backends import NetworkBackend

Providers = Union[str, Sequence[str]]


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the onnxruntime network backend needs onnxruntime "
                           "(pip install onnxruntime, or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def resolve_providers(providers: Providers = "auto") -> List[str]:
    """'auto' -> CUDA (if this onnxruntime build has it) then CPU; 'cpu'; 'cuda'; or an explicit list."""
    available = _ort().get_available_providers()
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":
            providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        elif key == "cpu":
            providers = []
        elif key == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError("CUDA was requested for ONNX Runtime, but this onnxruntime has no "
                                   f"CUDAExecutionProvider (available: {', '.join(available)}); "
                                   "install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider"]
        else:
            raise ConfigError(f"unknown ONNX Runtime providers {providers!r} (auto, cpu, cuda or a list)")
        return list(providers) + ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendError(f"ONNX Runtime providers not available: {', '.join(missing)} "
                           f"(available: {', '.join(available)})")
    return list(providers)


def make_session(path: Union[str, Path], providers: Providers = "auto", threads: Optional[int] = None,
                 arena: bool = True):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = min(int(threads), usable_cpus())
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # ORT's per-node fp16 "cast inserted" notices are expected
    # ORT's idle worker threads spin after a run; on a small CPU that steals the cores from the field
    # kernels that run next (measured: the following density grid ~2x slower).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=resolve_providers(providers))
    except (BackendError, ConfigError):
        raise
    except Exception as exc:
        raise BackendError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}; "
                           "re-export with lrm-rt export") from None


class OnnxRuntimeNetworkBackend(NetworkBackend):
    """``NetworkBackend`` over ``encoder.onnx`` + ``transformer.onnx`` (or their ``.fp16`` variants)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Union[str, Path], providers: Providers = "auto", threads: Optional[int] = None,
                 precision: str = "fp32"):
        self.export_dir = Path(export_dir)
        if precision not in ("fp32", "fp16", "auto"):
            raise ConfigError(f"precision {precision!r} is not available with onnxruntime (fp32, fp16)")
        self.manifest = M.read_manifest(self.export_dir)
        self.config = M.manifest_config(self.manifest)
        graphs = self.manifest["graphs"]
        if precision == "fp16":
            graphs = self.manifest.get("fp16_graphs")
            if not graphs:
                raise BackendError(f"{self.export_dir} has no fp16 graphs; re-export with lrm-rt export --fp16")
        self.precision = "fp32" if precision == "auto" else precision
        self.weights, self.biases = M.load_decoder(self.export_dir, self.manifest)
        self.sessions = {}
        from .export.onnx_export import graph_specs

        specs = graph_specs(self.config)
        for g in ("encoder", "transformer"):
            path = self.export_dir / str(graphs[g].get("file"))
            if not path.is_file():
                raise CheckpointError(f"export directory {self.export_dir} is incomplete: missing {path.name}")
            M.verified_file(self.export_dir, graphs[g])
            if graphs[g].get("external_data"):
                M.verified_file(self.export_dir, graphs[g], "external_data", "external_data_sha256")
            sess = make_session(path, providers, threads)
            _check_io(sess, graphs[g], path)
            _check_io(sess, specs[g], path, "the manifest's model config implies")  # config edited after export
            self.sessions[g] = sess
        self.providers = self.sessions["encoder"].get_providers()

    def run(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        cfg = self.config
        s = cfg.input_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise BackendError(f"this export takes (B, 3, {s}, {s}) pixels, got {tuple(pixels.shape)}")
        x = np.ascontiguousarray(pixels.detach().cpu().float().numpy())
        feeds = {}
        if cfg.family == "openlrm":
            if camera is None:
                camera = default_source_camera(cfg.source_cam_dist, x.shape[0])
            feeds["camera"] = np.ascontiguousarray(camera.detach().cpu().float().numpy())
        t0 = time.perf_counter()
        tokens = self._run("encoder", {"pixels": x})
        t1 = time.perf_counter()
        triplane = self._run("transformer", {"tokens": tokens, **feeds})
        t2 = time.perf_counter()
        return torch.from_numpy(np.asarray(triplane, dtype=np.float32)), {"encoder": t1 - t0, "transformer": t2 - t1}


    def _run(self, graph: str, feeds: Dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.sessions[graph].run(None, feeds)[0]
        except Exception as exc:  # ORT's own errors (shapes, memory) as one line naming the graph
            if is_out_of_memory(exc):  # the CLI and server report these as out of memory
                raise
            raise BackendError(f"ONNX Runtime failed running the {graph} graph of {self.export_dir}: "
                               f"{type(exc).__name__}: {exc}".splitlines()[0][:500]) from None


def _check_io(sess, info, path: Path, source: str = "the manifest lists") -> None:
    """The graph's input/output names and fixed sizes must be what ``source`` says (guards against mixed-up
    files and edited configs)."""
    want_in = [i["name"] for i in info.get("inputs", [])]
    want_out = [o["name"] for o in info.get("outputs", [])]
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if (want_in and got_in != want_in) or (want_out and got_out != want_out):
        raise CheckpointError(f"{path} has inputs {got_in} / outputs {got_out}, but {source} "
                              f"{want_in} / {want_out}; the export directory is inconsistent, re-export it")
    for spec, arg in zip(info.get("inputs", []) + info.get("outputs", []), sess.get_inputs() + sess.get_outputs()):
        fixed = [(a, b) for a, b in zip(spec["shape"], arg.shape) if isinstance(a, int) and isinstance(b, int)]
        if len(spec["shape"]) != len(arg.shape) or any(a != b for a, b in fixed):
            raise CheckpointError(f"{path}: {arg.name} has shape {arg.shape}, but {source} {spec['shape']}; "
                                  "the export directory is inconsistent, re-export it")
