"""``lrm-rt export``: encoder and transformer to ONNX, validated against PyTorch in ONNX Runtime.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, pinned on purpose: since
torch 2.9 the default dynamo exporter needs onnxscript, emits opset >= 18 and ignores ``dynamic_axes``
(runtime-anchors §0.5). The encoder's position table is baked for the model's fixed input size first,
so the graph holds a constant instead of a bicubic (antialiased, for DINOv2) resize. The batch axis is
dynamic; validation runs at batch 2 with two different images and cameras, so a batch size frozen
into a Reshape would show up as an error there.
"""
from __future__ import annotations

import inspect
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..checkpoint import LoadedModel
from ..config import ModelConfig
from ..errors import ConfigError, LrmError
from ..files import chmod_as_open
from ..models.network import LRMNetwork, default_source_camera
from . import manifest as M

DEFAULT_OPSET = 17  # first opset with a fused LayerNormalization (kept in fp32 by the fp16 rules)
MIN_OPSET = 14
# Protobuf cannot serialise a message over 2 GiB; stay clear of it (graph structure adds a little).
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# Max error allowed against PyTorch, relative to max(1, peak |reference|): 1e-4 absolute for tensors of
# magnitude <= 1 (the fixtures' fp32 rounding scale is ~1e-6, fixtures README §8), rel-scaled above.
FP32_TOL = 1e-4
# fp16 graphs: relative to the peak magnitude. fp16 has an 11-bit mantissa (~5e-4 per rounding);
# a dozen layers of rounding stay well under 1 %.
FP16_TOL = 2e-2


def max_opset() -> Optional[int]:
    """Highest opset the installed torch's TorchScript exporter supports (None: unknown).

    torch has no public query, so its private constants are read defensively (ONNX_MAX_OPSET as a
    fallback). Above this opset the exporter only warns "not supported" (torch 2.13: 21..23), and beyond
    its table it fails deep inside with "RuntimeError: Unsupported onnx_opset_version".
    """
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    for name in ("ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", "ONNX_MAX_OPSET"):
        if isinstance(getattr(_constants, name, None), int):
            return getattr(_constants, name)
    return None


def _unsupported_opset(opset: int) -> ConfigError:
    hi = max_opset()
    supported = f"{MIN_OPSET}..{hi}" if hi else f">= {MIN_OPSET}"
    return ConfigError(f"--opset {opset} is not supported by the ONNX exporter of torch {torch.__version__} "
                       f"(supported: {supported}; {DEFAULT_OPSET} recommended)")


class ExportError(LrmError):
    """Export failed, or the exported graphs do not reproduce PyTorch within tolerance."""


class EncoderGraph(nn.Module):
    """Normalised pixels (B, 3, S, S) -> image tokens (B, T, D)."""

    def __init__(self, net: LRMNetwork):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.encode(pixels)


class TransformerGraph(nn.Module):
    """Image tokens [+ (B, 16) source camera for OpenLRM] -> triplane (B, 3, C, H, W), upsampler included."""

    def __init__(self, net: LRMNetwork):
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor, camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net.image_to_triplane(tokens, camera)


def image_encoder(net: LRMNetwork) -> nn.Module:
    return (net.image_tokenizer if net.config.family == "triposr" else net.encoder).model


def num_image_tokens(cfg: ModelConfig) -> int:
    patch = getattr(cfg.encoder, "patch_size")
    return 1 + (cfg.input_size // patch) ** 2


def graph_specs(cfg: ModelConfig) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
    """Input/output names and shapes ('batch' = the dynamic axis) of both graphs."""
    tokens = ["batch", num_image_tokens(cfg), cfg.encoder_feat_dim]
    tr_inputs = [{"name": "tokens", "shape": tokens, "dtype": "float32"}]
    if cfg.family == "openlrm":
        tr_inputs.append({"name": "camera", "shape": ["batch", 16], "dtype": "float32"})
    return {
        "encoder": {"inputs": [{"name": "pixels", "shape": ["batch", 3, cfg.input_size, cfg.input_size],
                                "dtype": "float32"}],
                    "outputs": [{"name": "tokens", "shape": tokens, "dtype": "float32"}]},
        "transformer": {"inputs": tr_inputs,
                        "outputs": [{"name": "triplane", "shape": ["batch", *M.triplane_shape(cfg)],
                                     "dtype": "float32"}]},
    }


def sample_inputs(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic validation inputs: uniform [0,1] RGB normalised as the model expects, and cameras."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch, 3, cfg.input_size, cfg.input_size, generator=gen)
    if cfg.image_mean is not None:
        mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
    out = {"pixels": pixels}
    if cfg.family == "openlrm":
        # Different distances per sample, so a camera that was frozen into the graph would show.
        out["camera"] = torch.cat([default_source_camera(cfg.source_cam_dist + 0.1 * i, 1) for i in range(batch)])
    return out


def compare(ref: np.ndarray, got: np.ndarray, tol: float) -> Dict[str, Any]:
    """Max abs error, max error relative to the reference's peak magnitude, and the verdict."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref64.shape != got64.shape:
        return {"shape": list(got64.shape), "expected_shape": list(ref64.shape), "passed": False,
                "max_abs": float("inf"), "max_rel": float("inf")}
    err = float(np.abs(ref64 - got64).max()) if ref64.size else 0.0
    peak = float(np.abs(ref64).max()) if ref64.size else 0.0
    limit = tol * max(1.0, peak)
    finite = bool(np.isfinite(got64).all())
    return {"max_abs": err, "max_rel": err / max(peak, 1e-30), "ref_peak": peak, "limit": limit,
            "passed": finite and err <= limit}


def _export_graph(module: nn.Module, args: Sequence[torch.Tensor], spec: Dict[str, Any], path: Path,
                  opset: int, external_threshold: int, metadata: Dict[str, str]) -> Dict[str, Any]:
    import onnx

    in_names = [i["name"] for i in spec["inputs"]]
    out_names = [o["name"] for o in spec["outputs"]]
    dyn = {n: {0: "batch"} for n in in_names + out_names}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / path.name
        with warnings.catch_warnings():
            # TracerWarnings name the fixed image size (intended: the position table is baked for it) and
            # the exporter's own deprecation notice; neither is actionable here.
            warnings.simplefilter("ignore")
            # torch < 2.5 has no ``dynamo`` argument and always uses the TorchScript exporter.
            pin = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            try:
                with torch.no_grad():
                    torch.onnx.export(module, tuple(args), str(tmp_path), input_names=in_names,
                                      output_names=out_names, dynamic_axes=dyn, opset_version=opset,
                                      do_constant_folding=True, **pin)
            except RuntimeError as exc:  # "Unsupported onnx_opset_version: N", when max_opset() could not tell
                if "opset" not in str(exc).lower():
                    raise
                raise _unsupported_opset(opset) from None
        model = onnx.load(str(tmp_path))  # pulls in external data if the exporter wrote any
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    return save_onnx(model, path, external_threshold)


def save_onnx(model, path: Path, external_threshold: int = EXTERNAL_DATA_BYTES) -> Dict[str, Any]:
    """Write one file, or graph + one ``NAME.onnx.data`` file when the weights pass the threshold."""
    import onnx

    weight_bytes = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)  # stale data of an earlier export
    external = weight_bytes > external_threshold
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    info = {"file": path.name, "external_data": data_name if external else None,
            "sha256": M.sha256_file(path), "weight_bytes": weight_bytes}
    if external:
        info["external_data_sha256"] = M.sha256_file(path.parent / data_name)
    return info


def _validate(out: Path, files: Dict[str, str], inputs: Dict[str, torch.Tensor], ref_tokens: torch.Tensor,
              ref_triplane: torch.Tensor, tol: float, threads: Optional[int]) -> Dict[str, Dict[str, Any]]:
    """Both graphs in ONNX Runtime (CPU) on the inputs PyTorch saw; errors per output."""
    from ..onnx_backend import make_session

    cam = {"camera": inputs["camera"].numpy()} if "camera" in inputs else {}
    # No memory arena: these sessions run once, and the arena would keep the attention peak allocated.
    enc = make_session(out / files["encoder"], providers="cpu", threads=threads, arena=False)
    tokens = enc.run(None, {"pixels": inputs["pixels"].numpy()})[0]
    del enc
    tr = make_session(out / files["transformer"], providers="cpu", threads=threads, arena=False)
    triplane = tr.run(None, {"tokens": ref_tokens.numpy(), **cam})[0]
    chained = tr.run(None, {"tokens": tokens, **cam})[0]
    return {"encoder_tokens": compare(ref_tokens.numpy(), tokens, tol),
            "triplane": compare(ref_triplane.numpy(), triplane, tol),
            "triplane_end_to_end": compare(ref_triplane.numpy(), chained, tol)}


def _versions(opset: int) -> Dict[str, Any]:
    import onnx
    import onnxruntime

    return {"lrm_rt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)", "opset": opset}


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not M.is_export_dir(out):
        raise ConfigError(f"--out {out} is not empty and holds no earlier export; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last: an interrupted export leaves a directory no backend will load.
    (out / M.MANIFEST_NAME).unlink(missing_ok=True)
    # An earlier export's optional artifacts (fp16 graphs, AOTInductor package, TensorRT engines) belong to its
    # weights: removed, so none can outlive them next to this export's files. The TensorRT timing cache stays.
    for pattern in ("*.fp16.onnx", "*.fp16.onnx.data", "network.pt2", "tensorrt/*.plan", "tensorrt/*.plan.json"):
        for stale in out.glob(pattern):
            stale.unlink()


def require_onnx() -> None:
    """The export writes with onnx and validates with onnxruntime (the [onnx] extra): say so before any work."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"lrm-rt export needs onnx and onnxruntime ({' and '.join(missing)} not installed): "
                          "pip install onnx onnxruntime (the project's [onnx] extra)")


MAX_CHECK_BATCH = 16
MAX_PROFILE_BATCH = 64


def export_model(loaded: LoadedModel, out_dir: Union[str, Path], *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                 tensorrt: bool = False, max_batch: int = 4, check_batch: int = 2, seed: int = 0,
                 threads: Optional[int] = None, external_threshold: int = EXTERNAL_DATA_BYTES,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Export ``loaded`` to ``out_dir``; returns the manifest. Raises ExportError when validation fails."""
    require_onnx()
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset} is too old (need >= {MIN_OPSET}; {DEFAULT_OPSET} recommended)")
    if opset > (max_opset() or opset):  # before --out is touched: an earlier export there stays loadable
        raise _unsupported_opset(opset)
    # the validation runs the torch model and ONNX Runtime at check_batch (100,000 of lrm-tiny took 24 GB);
    # TensorRT builds its profile for max_batch
    if not (1 <= check_batch <= MAX_CHECK_BATCH and 1 <= max_batch <= MAX_PROFILE_BATCH):
        raise ConfigError(f"--check-batch must be in [1, {MAX_CHECK_BATCH}] and --max-batch in "
                          f"[1, {MAX_PROFILE_BATCH}], got {check_batch} and {max_batch}")
    if tensorrt:
        from ..tensorrt_backend import require_tensorrt

        require_tensorrt()  # fail before minutes of export work, not after
    cfg = loaded.config
    out = Path(out_dir)
    _prepare_out_dir(out)
    net = loaded.network.float().eval()
    enc = image_encoder(net)
    enc.bake_pos_embed(cfg.input_size, cfg.input_size)
    specs = graph_specs(cfg)
    inputs = sample_inputs(cfg, check_batch, seed)
    with torch.no_grad():
        ref_tokens = net.encode(inputs["pixels"])
        ref_triplane = net.image_to_triplane(ref_tokens, inputs.get("camera"))
    meta = {"lrm_rt_version": __version__, "family": cfg.family, "model_version": cfg.version, "model": cfg.name}
    graphs: Dict[str, Any] = {}
    t0 = time.perf_counter()
    graphs["encoder"] = _export_graph(EncoderGraph(net), [inputs["pixels"]], specs["encoder"],
                                      out / "encoder.onnx", opset, external_threshold, {**meta, "graph": "encoder"})
    tr_args = [ref_tokens] + ([inputs["camera"]] if "camera" in inputs else [])
    graphs["transformer"] = _export_graph(TransformerGraph(net), tr_args, specs["transformer"],
                                          out / "transformer.onnx", opset, external_threshold,
                                          {**meta, "graph": "transformer"})
    for name in graphs:
        graphs[name].update(specs[name])
    log(f"exported encoder.onnx, transformer.onnx (opset {opset}) in {time.perf_counter() - t0:.1f} s")

    # -- validation in ONNX Runtime (CPU) against the PyTorch outputs on the same inputs --------------
    results = _validate(out, {g: graphs[g]["file"] for g in graphs}, inputs, ref_tokens, ref_triplane,
                        FP32_TOL, threads)
    validation: Dict[str, Any] = {
        "runtime": "onnxruntime CPUExecutionProvider", "batch": check_batch, "seed": seed,
        "inputs": "uniform [0,1] RGB (seeded), normalised as the model expects; per-sample source cameras",
        "tolerance": {"fp32": f"max_abs <= {FP32_TOL:g} * max(1, peak |reference|)",
                      "fp16": f"max_abs <= {FP16_TOL:g} * max(1, peak |reference|)"},
        "note": "triplane: transformer fed the PyTorch tokens; triplane_end_to_end: fed the ONNX encoder's tokens",
        "fp32": results}
    _log_results(log, "fp32", results)

    fp16_graphs: Dict[str, Any] = {}
    if fp16:
        fp16_graphs, validation["fp16"] = _export_fp16(out, graphs, inputs, ref_tokens, ref_triplane, threads, log)

    man: Dict[str, Any] = {
        "format": M.FORMAT, "format_version": M.FORMAT_VERSION,
        "family": cfg.family, "version": cfg.version, "name": cfg.name,
        "config": M.config_to_dict(cfg),
        "source": _source_info(loaded),
        "input": {"name": "pixels", "size": cfg.input_size, "layout": "NCHW RGB float32",
                  "normalisation": "x = (rgb01 - mean) / std" if cfg.image_mean else "none: [0, 1] RGB",
                  "mean": list(cfg.image_mean) if cfg.image_mean else None,
                  "std": list(cfg.image_std) if cfg.image_std else None},
        "camera": _camera_info(cfg),
        "triplane": {"name": "triplane", "shape": list(M.triplane_shape(cfg)), "dtype": "float32",
                     "plane_order": M.plane_order(cfg), "radius": cfg.field_spec.radius,
                     "world_box": [[-cfg.field_spec.radius] * 3, [cfg.field_spec.radius] * 3],
                     "field_spec": {k: getattr(cfg.field_spec, k) for k in
                                    ("family", "radius", "third_plane", "hidden_activation",
                                     "density_activation", "color_activation", "density_bias")}},
        "decoder": _write_decoder(out, net),
        "graphs": graphs,
        "batch": {"dynamic": True, "validated_batch": check_batch},
        "tools": _versions(opset),
        "validation": validation,
    }
    if fp16_graphs:
        man["fp16_graphs"] = fp16_graphs
    failed = [f"{prec} {k}" for prec in ("fp32", "fp16") for k, r in validation.get(prec, {}).items() if not r["passed"]]
    if failed:
        man["validation"]["failed"] = failed
        M.write_manifest(out, {**man, "format": M.FORMAT + "-FAILED"})  # kept for inspection, never loadable
        raise ExportError(f"exported graphs do not match PyTorch within tolerance: {', '.join(failed)} "
                          f"(details in {out / M.MANIFEST_NAME})")
    if tensorrt:
        from ..tensorrt_backend import build_engines

        man["tensorrt"] = build_engines(out, man, fp16=fp16, max_batch=max_batch, log=log)
    M.write_manifest(out, man)
    log(f"wrote {out / M.MANIFEST_NAME}")
    return man


def _export_fp16(out: Path, graphs, inputs, ref_tokens, ref_triplane, threads, log):
    import onnx

    from .fp16 import FP32_OPS, convert_to_fp16, fp32_op_counts

    fp16_graphs: Dict[str, Any] = {}
    for name in ("encoder", "transformer"):
        src = onnx.load(str(out / graphs[name]["file"]))
        kept = fp32_op_counts(src)
        half = convert_to_fp16(src)
        del src  # full-size graphs are hundreds of MB: do not hold both copies longer than needed
        info = save_onnx(half, out / f"{name}.fp16.onnx")
        del half
        info.update({k: graphs[name][k] for k in ("inputs", "outputs")})
        info["fp32_ops"] = kept
        fp16_graphs[name] = info
    results = _validate(out, {g: fp16_graphs[g]["file"] for g in fp16_graphs}, inputs, ref_tokens, ref_triplane,
                        FP16_TOL, threads)
    _log_results(log, "fp16", results)
    log(f"  fp16 graphs keep in fp32: {', '.join(sorted(FP32_OPS & set().union(*[g['fp32_ops'] for g in fp16_graphs.values()])))}")
    return fp16_graphs, results


def _log_results(log, prec: str, results: Dict[str, Dict[str, Any]]) -> None:
    for k, r in results.items():
        log(f"  {prec} {k:<20} max abs {r['max_abs']:.3e}  max rel {r['max_rel']:.3e}  "
            f"(limit {r.get('limit', float('nan')):.1e})  {'ok' if r['passed'] else 'FAILED'}")


def _camera_info(cfg: ModelConfig) -> Optional[Dict[str, Any]]:
    if cfg.family != "openlrm":
        return None
    return {"input": "camera", "dims": 16, "source_cam_dist": cfg.source_cam_dist,
            "layout": "3x4 camera-to-world row-major, then fx, fy, cx, cy normalised by the image size",
            "default": default_source_camera(cfg.source_cam_dist, 1)[0].tolist()}


def _write_decoder(out: Path, net: LRMNetwork) -> Dict[str, Any]:
    from safetensors.torch import save_file

    weights, biases = net.decoder_params()
    tensors = {}
    for i, (w, b) in enumerate(zip(weights, biases)):
        tensors[f"layers.{i}.weight"] = w.contiguous()
        tensors[f"layers.{i}.bias"] = b.contiguous()
    path = out / M.DECODER_NAME
    save_file(tensors, str(path), metadata={"format": "pt", "content": "lrm_rt NeRF decoder (nn.Linear layout)"})
    chmod_as_open(path)
    return {"file": M.DECODER_NAME, "sha256": M.sha256_file(path), "layers": len(weights),
            "shapes": [list(w.shape) for w in weights], "hidden_activation": net.config.field_spec.hidden_activation}


def _source_info(loaded: LoadedModel) -> Dict[str, Any]:
    src = loaded.source
    directory = Path(src) if src and Path(src).is_dir() else None
    files = M.checkpoint_file_hashes(directory)
    return {"source": src, "random_weights": src.startswith("random("),
            "checkpoint_files": files,
            "checkpoint_sha256": files[0]["sha256"] if files else None,
            "state_dict_sha256": M.state_dict_sha256(loaded.network.state_dict())}

