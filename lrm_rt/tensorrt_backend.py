"""TensorRT engines for an export directory (FP16 with fp32 islands), and the backend that runs them.

Written against TensorRT's documented Python API (10.x); ``tensorrt`` and ``cupy`` are imported only
when a function needs them, so this module imports (and its pure parts are tested) without either.
Device buffers and the stream are CuPy's (no pycuda).

Layout inside the export directory::

    tensorrt/encoder.fp16.plan        serialized engine
    tensorrt/encoder.fp16.plan.json   metadata: TensorRT version, GPU, compute capability, ONNX sha256
    tensorrt/timing-trt10.3.0-sm8.7.cache   builder timing cache (per TensorRT version and GPU arch)

An engine only runs on the TensorRT version and GPU it was built for, so loading compares the
metadata with the running system and the ONNX file's sha256 in the manifest, and refuses a mismatch
with a BackendError that names the rebuild command.

Nothing here has been run against a real TensorRT in this repository's CI (no GPU there); the pure
functions are unit-tested with fake objects (tests/test_tensorrt_logic.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import BackendError, ConfigError
from .network_backends import NetworkBackend

ENGINE_DIR = "tensorrt"
METADATA_FORMAT = "lrm_rt-tensorrt-engine"
METADATA_VERSION = 1
REBUILD_HINT = "rebuild with lrm-rt export --tensorrt [--fp16] --model M --out {dir}"
WORKSPACE_BYTES = 4 << 30

# Precision rules (the TensorRT counterpart of lrm_rt.export.fp16.FP32_OPS). Normalisation, softmax and
# reductions overflow or lose the variance in fp16 (NVIDIA/TensorRT#2781: LayerNorm after attention);
# exp/log/pow/sqrt have a small fp16 range; the final deconvolution makes the triplane, which the field
# kernels read in fp32 and whose values reach ~1e3 (fp16 spacing ~1 there).
FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE", "DECONVOLUTION"})
FP32_UNARY_OPS = frozenset({"EXP", "LOG", "SQRT", "RECIP"})
FP32_ELEMENTWISE_OPS = frozenset({"POW"})
# ONNX node names survive into layer names; catches the same ops when TensorRT fused or renamed types.
FP32_NAME_MARKERS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax",
                     "ReduceMean", "/Exp", "/Pow", "ConvTranspose")
FLOAT_DTYPES = frozenset({"FLOAT", "HALF", "BF16"})


# ---------------------------------------------------------------------------------------------------
# pure logic (no TensorRT needed)

@dataclass(frozen=True)
class LayerInfo:
    """What the precision rules look at: TensorRT layer name, LayerType name, op name, output dtype names."""

    name: str
    type: str
    op: Optional[str] = None
    output_dtypes: Tuple[str, ...] = ("FLOAT",)


def fp32_layer_reason(layer: LayerInfo) -> Optional[str]:
    """Why ``layer`` must run in fp32 under FP16 (None: fp16 is fine). Only float-valued layers qualify:
    forcing a precision on shape arithmetic (int64) is meaningless and rejected by the builder."""
    if layer.output_dtypes and not any(d in FLOAT_DTYPES for d in layer.output_dtypes):
        return None
    if layer.type in FP32_LAYER_TYPES:
        return f"type {layer.type}"
    if layer.type == "UNARY" and layer.op in FP32_UNARY_OPS:
        return f"unary {layer.op}"
    if layer.type == "ELEMENTWISE" and layer.op in FP32_ELEMENTWISE_OPS:
        return f"elementwise {layer.op}"
    for marker in FP32_NAME_MARKERS:
        if marker in layer.name:
            return f"name contains {marker.strip('/')}"
    return None


def fp32_layers(layers: Iterable[LayerInfo]) -> List[Tuple[int, str, str]]:
    """(index, name, reason) of every layer to pin to fp32."""
    out = []
    for i, layer in enumerate(layers):
        reason = fp32_layer_reason(layer)
        if reason:
            out.append((i, layer.name, reason))
    return out


def profile_shapes(inputs: Sequence[Mapping[str, Any]], max_batch: int, opt_batch: int = 1,
                   min_batch: int = 1) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
    """One optimisation profile: (min, opt, max) shape per input; symbolic / -1 dims are the batch."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise BackendError(f"TensorRT profile batch sizes must satisfy 1 <= min {min_batch} <= opt {opt_batch} "
                           f"<= max {max_batch}")
    shapes = {}
    for spec in inputs:
        dims = list(spec["shape"])
        dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int) or d < 0]
        if dynamic not in ([], [0]):
            raise BackendError(f"input {spec['name']} has dynamic dims {dynamic}; only the batch (dim 0) may be")

        def at(b: int) -> Tuple[int, ...]:
            return tuple(b if i in dynamic else int(d) for i, d in enumerate(dims))

        shapes[spec["name"]] = (at(min_batch), at(opt_batch), at(max_batch))
    return shapes


def engine_path(export_dir: Union[str, Path], graph: str, precision: str) -> Path:
    return Path(export_dir) / ENGINE_DIR / f"{graph}.{precision}.plan"


def metadata_path(engine: Union[str, Path]) -> Path:
    return Path(str(engine) + ".json")


def timing_cache_path(export_dir: Union[str, Path], trt_version: str, compute_capability: str) -> Path:
    """Timing caches are only valid for one TensorRT version and GPU architecture: key the file by both."""
    return Path(export_dir) / ENGINE_DIR / f"timing-trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def gpu_identity_from_props(props: Mapping[str, Any]) -> Dict[str, str]:
    """Name and compute capability from ``cupy.cuda.runtime.getDeviceProperties`` (name may be bytes)."""
    name = props.get("name", b"")
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"gpu_name": str(name).strip(), "compute_capability": f"{int(props['major'])}.{int(props['minor'])}"}


def engine_metadata(*, graph: str, onnx_sha256: str, tensorrt_version: str, gpu_name: str,
                    compute_capability: str, precision: str, profile: Mapping[str, Any],
                    fp32_layer_count: int = 0, build_seconds: float = 0.0) -> Dict[str, Any]:
    return {"format": METADATA_FORMAT, "format_version": METADATA_VERSION, "graph": graph,
            "onnx_sha256": onnx_sha256, "tensorrt_version": tensorrt_version, "gpu_name": gpu_name,
            "compute_capability": compute_capability, "precision": precision,
            "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "fp32_layers": fp32_layer_count, "build_seconds": round(build_seconds, 2)}


def metadata_mismatches(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> List[str]:
    """Human-readable differences between an engine's metadata and what this system needs."""
    problems = []
    if meta.get("format") != METADATA_FORMAT or meta.get("format_version") != METADATA_VERSION:
        problems.append(f"metadata format {meta.get('format')!r} v{meta.get('format_version')!r} "
                        f"(expected {METADATA_FORMAT!r} v{METADATA_VERSION})")
    labels = {"tensorrt_version": "TensorRT", "gpu_name": "GPU", "compute_capability": "compute capability",
              "onnx_sha256": "ONNX sha256", "graph": "graph", "precision": "precision"}
    for key, label in labels.items():
        if key in expected and meta.get(key) != expected[key]:
            problems.append(f"{label} {meta.get(key)!r} != {expected[key]!r}")
    return problems


def check_engine_metadata(meta: Mapping[str, Any], expected: Mapping[str, Any], engine: Union[str, Path],
                          export_dir: Union[str, Path]) -> None:
    problems = metadata_mismatches(meta, expected)
    if problems:
        raise BackendError(f"TensorRT engine {engine} does not fit this system: {'; '.join(problems)}; "
                           + REBUILD_HINT.format(dir=export_dir))


def read_engine_metadata(engine: Union[str, Path], export_dir: Union[str, Path]) -> Dict[str, Any]:
    path = metadata_path(engine)
    if not Path(engine).is_file() or not path.is_file():
        raise BackendError(f"TensorRT engine {engine} or its metadata {path.name} is missing; "
                           + REBUILD_HINT.format(dir=export_dir))
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read {path}: {exc}; " + REBUILD_HINT.format(dir=export_dir)) from None
    if not isinstance(meta, dict):
        raise BackendError(f"{path} is not a JSON object; " + REBUILD_HINT.format(dir=export_dir))
    return meta


# ---------------------------------------------------------------------------------------------------
# TensorRT / CuPy access

def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("TensorRT is not installed: the tensorrt network backend and lrm-rt export --tensorrt "
                           "need NVIDIA TensorRT 10.x for Python (pip install tensorrt) and a CUDA GPU; use "
                           "--network-backend onnxruntime meanwhile") from None
    return trt


def require_cupy():
    try:
        import cupy
    except ImportError:
        raise BackendError("the tensorrt network backend needs CuPy for device buffers "
                           "(pip install cupy-cuda12x)") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendError("the tensorrt network backend needs a CUDA GPU; none is visible")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendError(f"the tensorrt network backend needs a CUDA GPU: {exc}") from None
    return cupy


def system_identity(device_id: int = 0) -> Dict[str, str]:
    trt = require_tensorrt()
    cp = require_cupy()
    ident = gpu_identity_from_props(cp.cuda.runtime.getDeviceProperties(device_id))
    ident["tensorrt_version"] = str(trt.__version__)
    return ident


def layer_infos(network, trt) -> List[LayerInfo]:
    """LayerInfo for every layer of a TensorRT INetworkDefinition."""
    subclass = {"UNARY": "IUnaryLayer", "ELEMENTWISE": "IElementWiseLayer"}
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        type_name = layer.type.name
        op = None
        if type_name in subclass:
            # The Python bindings hand out the ILayer base; the op lives on the subclass (Polygraphy does the same).
            if not hasattr(layer, "op") and hasattr(trt, subclass[type_name]):
                layer.__class__ = getattr(trt, subclass[type_name])
            op = getattr(getattr(layer, "op", None), "name", None)
        dtypes = tuple(layer.get_output(j).dtype.name for j in range(layer.num_outputs))
        out.append(LayerInfo(layer.name, type_name, op, dtypes))
    return out


def apply_precision_constraints(network, trt) -> List[Tuple[int, str, str]]:
    """Pin the rule-selected layers (and their float outputs) to fp32; returns what was pinned."""
    pinned = fp32_layers(layer_infos(network, trt))
    for idx, _, _ in pinned:
        layer = network.get_layer(idx)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype.name in FLOAT_DTYPES:
                layer.set_output_type(j, trt.float32)
    for j in range(network.num_outputs):  # the triplane (and tokens) leave the engine as fp32
        network.get_output(j).dtype = trt.float32
    return pinned


def build_engine(onnx_path: Path, out_path: Path, inputs: Sequence[Mapping[str, Any]], *, fp16: bool,
                 max_batch: int, cache_path: Path, log=print) -> Dict[str, Any]:
    """Parse ONNX, build one engine (explicit batch, one profile), write it; returns build facts."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it set.
    network = builder.create_network(0 if flag is None or int(trt.__version__.split(".")[0]) >= 10 else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    shapes = profile_shapes(inputs, max_batch=max_batch)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    pinned: List[Tuple[int, str, str]] = []
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = apply_precision_constraints(network, trt)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    log(f"  built {out_path.name} in {seconds:.1f} s ({len(pinned)} layers pinned to fp32)")
    return {"profile": shapes, "fp32_layers": len(pinned), "build_seconds": seconds}


def build_engines(export_dir: Union[str, Path], manifest: Mapping[str, Any], *, fp16: bool, max_batch: int,
                  log=print) -> Dict[str, Any]:
    """Engines for both graphs of an export (called by ``export_model``); returns the manifest entry."""
    from .export.manifest import sha256_file

    d = Path(export_dir)
    ident = system_identity()
    precision = "fp16" if fp16 else "fp32"
    cache = timing_cache_path(d, ident["tensorrt_version"], ident["compute_capability"])
    engines = {}
    for graph in ("encoder", "transformer"):
        g = manifest["graphs"][graph]
        out = engine_path(d, graph, precision)
        facts = build_engine(d / g["file"], out, g["inputs"], fp16=fp16, max_batch=max_batch, cache_path=cache, log=log)
        meta = engine_metadata(graph=graph, onnx_sha256=g["sha256"], precision=precision,
                               fp32_layer_count=facts["fp32_layers"], profile=facts["profile"],
                               build_seconds=facts["build_seconds"], **ident)
        metadata_path(out).write_text(json.dumps(meta, indent=1) + "\n")
        engines[graph] = {"file": str(out.relative_to(d)), "metadata": str(metadata_path(out).relative_to(d)),
                          "sha256": sha256_file(out)}
    return {"precision": precision, "max_batch": max_batch, "engines": engines,
            "timing_cache": str(cache.relative_to(d)), **ident}


# ---------------------------------------------------------------------------------------------------
# runtime

class TensorRTNetworkBackend(NetworkBackend):
    """Runs an export directory's TensorRT engines; triplane returned as a float32 torch tensor."""

    name = "tensorrt"

    def __init__(self, export_dir: Union[str, Path], device: str = "cuda", device_id: int = 0, precision: str = "auto"):
        """``precision``: "auto" runs the engines as built; "fp32" / "fp16" must be the precision they were built
        in (a TensorRT engine's precision is fixed when it is built)."""
        from .export import manifest as M

        self.export_dir = Path(export_dir)
        self.manifest = M.read_manifest(self.export_dir)
        self.config = M.manifest_config(self.manifest)
        info = self.manifest.get("tensorrt")
        if not info:
            raise BackendError(f"{self.export_dir} has no TensorRT engines; " + REBUILD_HINT.format(dir=self.export_dir))
        built = str(info.get("precision", "fp32"))
        if precision not in ("auto", built):
            if precision not in ("fp32", "fp16"):
                raise ConfigError(f"precision {precision!r} is not available with tensorrt (fp32, fp16)")
            raise ConfigError(f"the TensorRT engines in {self.export_dir} were built in {built}, not {precision}: "
                              f"drop --precision, or rebuild with lrm-rt export --tensorrt"
                              f"{' --fp16' if precision == 'fp16' else ''}")
        self.precision = built
        trt = require_tensorrt()
        cp = require_cupy()
        self.weights, self.biases = M.load_decoder(self.export_dir, self.manifest)
        ident = system_identity(device_id)
        self._cp, self._trt = cp, trt
        self._device = cp.cuda.Device(device_id)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engines, self._contexts = {}, {}
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            for graph in ("encoder", "transformer"):
                path = self.export_dir / str(info["engines"][graph]["file"])
                if self.export_dir.resolve() not in path.resolve().parents:
                    raise BackendError(f"the manifest names an engine outside {self.export_dir}: {path}; "
                                       + REBUILD_HINT.format(dir=self.export_dir))
                if path.is_file() and M.sha256_file(path) != info["engines"][graph].get("sha256"):
                    raise BackendError(f"{path} is not the engine this export built (sha256 differs from the "
                                       "manifest's); " + REBUILD_HINT.format(dir=self.export_dir))
                meta = read_engine_metadata(path, self.export_dir)
                expected = {**ident, "graph": graph, "onnx_sha256": self.manifest["graphs"][graph]["sha256"]}
                check_engine_metadata(meta, expected, path, self.export_dir)
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise BackendError(f"TensorRT could not deserialize {path}; " + REBUILD_HINT.format(dir=self.export_dir))
                self._engines[graph] = engine
                self._contexts[graph] = engine.create_execution_context()
        self.max_batch = int(info.get("max_batch", 1))
        self.device = device

    def _execute(self, graph: str, feeds: Dict[str, Any]) -> Dict[str, Any]:
        trt, cp = self._trt, self._cp
        engine, ctx = self._engines[graph], self._contexts[graph]
        for name, arr in feeds.items():
            ctx.set_input_shape(name, tuple(arr.shape))
            ctx.set_tensor_address(name, arr.data.ptr)
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(ctx.get_tensor_shape(name))
                outputs[name] = cp.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
                ctx.set_tensor_address(name, outputs[name].data.ptr)
        if not ctx.execute_async_v3(self._stream.ptr):
            raise BackendError(f"TensorRT execution of the {graph} engine failed")
        return outputs

    def run(self, pixels: torch.Tensor, camera: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        from .models.network import default_source_camera

        cp, cfg = self._cp, self.config
        b, s = pixels.shape[0], cfg.input_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise BackendError(f"this export takes (B, 3, {s}, {s}) pixels, got {tuple(pixels.shape)}")
        if b > self.max_batch:
            raise BackendError(f"batch {b} exceeds the engines' profile (max {self.max_batch}); "
                               "rebuild with lrm-rt export --tensorrt --max-batch N")
        with self._device, self._stream:
            x = cp.ascontiguousarray(cp.asarray(pixels.detach().float().contiguous().cpu().numpy()))
            feeds = {}
            if cfg.family == "openlrm":
                cam = camera if camera is not None else default_source_camera(cfg.source_cam_dist, b)
                feeds["camera"] = cp.ascontiguousarray(cp.asarray(cam.detach().float().cpu().numpy()))
            t0 = time.perf_counter()
            tokens = self._execute("encoder", {"pixels": x})["tokens"]
            self._stream.synchronize()
            t1 = time.perf_counter()
            triplane = self._execute("transformer", {"tokens": tokens, **feeds})["triplane"]
            self._stream.synchronize()
            t2 = time.perf_counter()
        if torch.cuda.is_available() and self.device.startswith("cuda"):
            out = torch.from_dlpack(triplane).float()
        else:
            out = torch.from_numpy(cp.asnumpy(triplane)).float()
        return out, {"encoder": t1 - t0, "transformer": t2 - t1}
