"""The benchmark suite behind ``lrm-rt bench``.

Times every stage of the pipeline (preprocess, encoder, transformer, density grid, marching cubes,
vertex colours, GLB export, novel-view rendering) and the whole chain image -> GLB, for every
network backend x field backend that is available at run time, against the PyTorch baseline:

    baseline = torch fp32 network + torch field backend (dense grid, torch reference query) + PyMCubes

A fast path is timed only after its output passed the parity gate against the baseline (triplane
error, mesh Chamfer / face count, vertex colours); otherwise it is reported as FAILING with the
failed checks and no time. Results go to ``benchmarks/results/<machine>/`` (see report.py).

Optional pieces (ONNX Runtime, TensorRT, CuPy, the native kernels, lrm_rt.mc, lrm_rt.meshcompare,
matplotlib, psutil) are imported lazily; whatever is missing is listed as "unavailable: reason".
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
SCHEMA = "lrm_rt.bench/1"

BASELINE_NET = "torch-fp32"
BASELINE_FIELD = "torch"
BASELINE_DESCRIPTION = ("torch fp32 network + torch field backend (dense grid, torch reference query) "
                        "+ PyMCubes marching cubes")
RELEASE_MODELS = ["triposr", "openlrm-obj-base-1.1", "openlrm-obj-large-1.1"]
DEFAULT_MODEL = "lrm-tiny"
NETWORK_BACKENDS = ["torch-fp32", "torch-bf16", "torch-fp16", "onnxruntime", "onnxruntime-fp16", "tensorrt"]
FIELD_BACKENDS = ["torch", "native", "cuda"]
EXTRACTION_STAGES = ["density_grid", "marching_cubes", "vertex_colors"]
E2E_STAGES = ["preprocess", "encoder", "transformer", *EXTRACTION_STAGES, "export"]

# Parity tolerances. Triplane: max |a - b| / max |b| by network precision (fp32 engines differ only
# in summation order; bf16/fp16 keep 8/11 mantissa bits through 12-16 transformer layers). Meshes:
# distances in voxels (grid spacing); a path on the same triplane must reproduce the baseline's
# iso-surface up to float rounding, so its Chamfer budget is 1% of a voxel. Face counts may differ
# where grid values sit within rounding of the level (a flipped corner adds/removes a few faces).
TOLERANCES = {
    "triplane_rel": {"fp32": 1e-3, "bf16": 5e-2, "fp16": 2e-2},
    # area / volume: relative differences of the surface area and the signed enclosed volume, which the vertex
    # Chamfer cannot see (faces over the right vertices but wrongly connected, or wound inside out). Two correct
    # marching cubes may triangulate the same cells differently (the native kernel and PyMCubes do, for half the
    # faces): 0.13 % / 0.19 % apart at 64^3 on lrm-tiny's chair, ~1/R smaller on finer grids; hence 1 %.
    "same_triplane": {"chamfer_vox": 0.01, "face_rel": 0.002, "face_abs": 8, "color": 0.02, "area_rel": 0.01,
                      "volume_rel": 0.01},
    "e2e_fp32": {"chamfer_vox": 0.05, "face_rel": 0.005, "face_abs": 16, "color": 0.03, "area_rel": 0.01,
                 "volume_rel": 0.01},
    "e2e_reduced": {"chamfer_vox": 0.25, "face_rel": 0.02, "face_abs": 32, "color": 0.08, "area_rel": 0.03,
                    "volume_rel": 0.03},
    "render_max_abs": 0.02,
    "grid_sign_mismatch": 0,  # cells on the wrong side of the level, ignoring values within rounding of it
}
# Synthetic surface (random weights): fraction of the box inside the iso-surface and the std of the
# raw density around it (the fixtures' tiny models use ~0.10 and 1.5).
SURFACE_INSIDE_FRACTION = 0.12
SURFACE_RAW_STD = 1.5
SURFACE_DETAIL = 0.15
BASELINE_REUSE_S = 10.0  # see Runner.measure  # weight of the network's own triplane on top of the analytic planes


class Unavailable(Exception):
    """A backend that cannot run on this machine / checkout; the message is the reason."""


# ------------------------------------------------------------------------------------------- settings

@dataclass
class Settings:
    models: List[str]
    resolutions: List[int]
    batches: List[int]
    e2e_batches: List[int]
    network_backends: Optional[List[str]]  # None: every known one that is available
    field_backends: Optional[List[str]]
    repeats: int = 3
    warmup: int = 1
    baseline_repeats: int = 1
    baseline_max_resolution: Optional[int] = None
    e2e_resolution: int = 256
    render_size: int = 128
    render_views: int = 1
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 0
    quick: bool = False
    out: Optional[str] = None
    plots: bool = True
    strict: bool = False
    command: str = ""


def _usage_error(message: str) -> NoReturn:
    """A bad option: one ``error:`` line and exit status 2, as everywhere else in the lrm-rt CLI."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _csv_ints(text: str) -> List[int]:
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(text: str) -> List[str]:
    return [x for x in str(text).replace(" ", "").split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-rt bench",
        description="Benchmark every available network x field backend against the PyTorch fp32 baseline "
                    f"({BASELINE_DESCRIPTION}).")
    p.add_argument("--models", type=_csv, default=None,
                   help=f"comma list: release configs (random seeded weights), built-in models or model "
                        f"directories (default: {', '.join(RELEASE_MODELS)} and {DEFAULT_MODEL} when shipped)")
    p.add_argument("--resolutions", type=_csv_ints, default=None, help="marching-cubes grids (default 64,128,256,384,512)")
    p.add_argument("--batch", type=_csv_ints, default=None, help="batch sizes of the network rows (default 1,4)")
    p.add_argument("--e2e-batch", type=_csv_ints, default=None,
                   help="batch sizes of the end-to-end rows (default 1: batching only changes the network stage, "
                        "which the network rows measure; 4 multiplies the end-to-end matrix's run time by ~4)")
    p.add_argument("--network-backends", type=_csv, default=None,
                   help=f"subset of {', '.join(NETWORK_BACKENDS)} (default: all available; the baseline is always run)")
    p.add_argument("--field-backends", type=_csv, default=None,
                   help=f"subset of {', '.join(FIELD_BACKENDS)} (default: all available; the baseline is always run)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per fast path (default 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs before the timed ones, the parity run included (default 1 = the parity run only)")
    p.add_argument("--baseline-repeats", type=int, default=None, help="timed runs of the baseline (default 1)")
    p.add_argument("--baseline-max-resolution", type=int, default=None,
                   help="measure the dense baseline only up to this grid and extrapolate above it (clearly "
                        "labelled; default: measure every resolution)")
    p.add_argument("--e2e-resolution", type=int, default=None, help="grid of the end-to-end runs (default 256)")
    p.add_argument("--render-size", type=int, default=None, help="novel-view side in pixels (default 128)")
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: {DEFAULT_MODEL} (or a tiny TripoSR-shaped config), grids 32/64, batch 1, 1 repeat")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any path is FAILING or errors")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<machine>, with --quick <machine>-quick)")
    return p


def settings_from_args(argv: Optional[Sequence[str]] = None) -> Settings:
    args = build_parser().parse_args(argv)
    q = args.quick
    s = Settings(
        models=args.models or ([quick_model()] if q else default_models()),
        resolutions=args.resolutions or ([32, 64] if q else [64, 128, 256, 384, 512]),
        batches=args.batch or ([1] if q else [1, 4]),
        e2e_batches=args.e2e_batch or [1],
        network_backends=args.network_backends,
        field_backends=args.field_backends,
        repeats=args.repeats if args.repeats is not None else (1 if q else 3),
        warmup=args.warmup if args.warmup is not None else 1,
        baseline_repeats=args.baseline_repeats if args.baseline_repeats is not None else 1,
        baseline_max_resolution=args.baseline_max_resolution,
        e2e_resolution=args.e2e_resolution or (64 if q else 256),
        render_size=args.render_size or (32 if q else 128),
        device=args.device, threads=args.threads, seed=args.seed, quick=q, out=args.out,
        plots=not args.no_plots,
        strict=args.strict,
        command="lrm-rt bench " + " ".join(list(argv) if argv is not None else sys.argv[1:]),
    )
    for name, vals in (("--resolutions", s.resolutions), ("--batch", s.batches), ("--e2e-batch", s.e2e_batches)):
        if any(v < (2 if name == "--resolutions" else 1) for v in vals):
            _usage_error(f"{name} values must be >= {2 if name == '--resolutions' else 1}")
    if s.repeats < 1 or s.warmup < 1 or s.baseline_repeats < 1:
        _usage_error("--repeats, --baseline-repeats and --warmup must be >= 1 (the parity run is a warm-up)")
    unknown = [m for m in s.models if not _is_model_spec(m)]
    if unknown:  # caught here, before the suite runs and writes a results folder with nothing measured in it
        _usage_error(f"--models: unknown model {unknown[0]!r}: not a release config, a built-in model, a model "
                     f"directory or a repo id (release configs: {', '.join(RELEASE_MODELS)})")
    if s.device != "auto":  # the pipeline's own check; otherwise every model would fail the same way
        from lrm_rt.errors import ConfigError
        from lrm_rt.pipeline import check_device

        try:
            check_device(s.device)
        except ConfigError:
            _usage_error(f"--device must be auto, cpu or cuda, got {s.device!r}")
    return s


def _is_model_spec(spec: str) -> bool:
    """Whether ``spec`` is something ``resolve_model`` can try: a bench or release config, a built-in model,
    an existing path (its contents are checked when it loads) or a repo id."""
    from lrm_rt.config import NAMED_CONFIGS

    return (spec in BENCH_CONFIGS or spec in NAMED_CONFIGS or spec in builtin_models()
            or Path(spec).expanduser().exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None)


def builtin_models() -> List[str]:
    from lrm_rt import models_dir

    d = models_dir()
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def default_models() -> List[str]:
    return RELEASE_MODELS + ([DEFAULT_MODEL] if DEFAULT_MODEL in builtin_models() else [])


def quick_model() -> str:
    return DEFAULT_MODEL if DEFAULT_MODEL in builtin_models() else "tiny-triposr"


# ------------------------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"@.*$", "", text)
    text = re.sub(r"\b(cpu|processor|with radeon graphics)\b", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def _gpu_name(device: str) -> Optional[str]:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None


def machine_slug(device: str) -> str:
    gpu = _gpu_name(device)
    if gpu:
        return "gpu-" + _slug(gpu)
    return f"cpu-{_slug(_cpu_model())}-{usable_cores()}c"


def _version(module: str) -> Optional[str]:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "installed"))


def _git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=BENCH_DIR, capture_output=True,
                               text=True, timeout=10)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine_info(device: str) -> Dict[str, Any]:
    flags = cpu_flags()
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: Dict[str, Any] = {
        "slug": machine_slug(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16",
                                     "amx_tile", "asimd", "asimdhp", "bf16"}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "device": device,
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        },
        "libraries": {m: _version(m) for m in ("lrm_rt", "torch", "numpy", "mcubes", "trimesh", "scipy",
                                              "onnxruntime", "tensorrt", "cupy", "matplotlib", "psutil")},
        "git_revision": _git_revision(),
    }
    info["libraries"]["PyMCubes"] = info["libraries"].pop("mcubes")
    gpu = _gpu_name(device)
    if gpu:
        info["gpu"] = gpu
        info["cuda_runtime"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                drv, memtot = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
                info["gpu_driver"], info["gpu_memory"] = drv, memtot
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return info


# ------------------------------------------------------------------------------------------- memory

def _read_hwm_kb() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them), so an earlier row's garbage does not
    count as resident memory of the next one."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Linux resets the peak-RSS mark when "5" is written to clear_refs (kernel >= 4.0)."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory (and GPU memory) of this process while the block runs.

    Preferred: reset and read Linux's VmHWM, exact and free. Else psutil polling every 5 ms, else
    getrusage's lifetime maximum (labelled: it cannot be reset, so it is an upper bound).
    """

    def __init__(self, device: str):
        self.device = device
        self.method = ""
        self.peak_rss_mb: Optional[float] = None
        self.peak_gpu_mb: Optional[float] = None
        self._poll = None

    def __enter__(self) -> "PeakMemory":
        if _reset_hwm() and _read_hwm_kb() is not None:
            self.method = "VmHWM"
        else:
            try:
                import threading

                import psutil

                proc, stop, peak = psutil.Process(), threading.Event(), [0]

                def poll():
                    while not stop.is_set():
                        peak[0] = max(peak[0], proc.memory_info().rss)
                        stop.wait(0.005)

                th = threading.Thread(target=poll, daemon=True)
                th.start()
                self._poll = (stop, th, peak)
                self.method = "psutil-poll"
            except ImportError:
                self.method = "ru_maxrss-lifetime"
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if "cupy" in sys.modules:
                sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.peak_rss_mb = (_read_hwm_kb() or 0) / 1024
        elif self._poll is not None:
            stop, th, peak = self._poll
            stop.set()
            th.join()
            self.peak_rss_mb = peak[0] / 2**20
        else:
            import resource

            self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            gpu = torch.cuda.max_memory_allocated()
            if "cupy" in sys.modules:  # the pool keeps every block it grew to: its size is its peak
                gpu += sys.modules["cupy"].get_default_memory_pool().total_bytes()
            self.peak_gpu_mb = gpu / 2**20

    def as_dict(self) -> Dict[str, Any]:
        return {"peak_rss_mb": _round(self.peak_rss_mb, 1), "peak_gpu_mb": _round(self.peak_gpu_mb, 1),
                "rss_method": self.method}


# ------------------------------------------------------------------------------------------- timing

def _round(x: Optional[float], nd: int = 6) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        if "cupy" in sys.modules:
            sys.modules["cupy"].cuda.Device().synchronize()


class StageTimer:
    """Wall-clock seconds per named stage, accumulated (a batch extracts several meshes)."""

    def __init__(self, device: str):
        self.device = device
        self.times: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds


def summarise(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, Any]]:
    """Per stage: median and p90 over the timed runs (linear-interpolated percentile), plus the runs."""
    out: Dict[str, Dict[str, Any]] = {}
    for key in runs[0]:
        vals = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = {"median": _round(float(np.median(vals))), "p90": _round(float(np.percentile(vals, 90))),
                    "runs": [_round(v) for v in vals.tolist()]}
    return out


# ------------------------------------------------------------------------------------------- models

def tiny_triposr_config():
    """A TripoSR-shaped config small enough for CI (same classes, tiny widths)."""
    from lrm_rt.config import TRIPOSR_YAML, triposr_config
    from lrm_rt.models.vit import ViTConfig

    y = copy.deepcopy(TRIPOSR_YAML)
    y["cond_image_size"] = 128
    y["tokenizer"] = {"plane_size": 8, "num_channels": 64}
    y["backbone"] = {"in_channels": 64, "num_attention_heads": 2, "attention_head_dim": 24, "num_layers": 2,
                     "cross_attention_dim": 48}
    y["post_processor"] = {"in_channels": 64, "out_channels": 8}
    y["decoder"] = {"in_channels": 24, "n_neurons": 16, "n_hidden_layers": 3, "activation": "silu"}
    vit = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                    patch_size=16, image_size=128)
    return triposr_config(y, "tiny-triposr", vit)


BENCH_CONFIGS: Dict[str, Callable[[], Any]] = {"tiny-triposr": tiny_triposr_config}


@dataclass
class ModelSource:
    name: str
    config: Any
    random: bool
    source: str
    load: Callable[[], Any]  # -> LoadedModel, a fresh copy each call (precision casts are in place)


def resolve_model(spec: str, seed: int) -> ModelSource:
    from lrm_rt.checkpoint import LoadedModel, load_model, random_network
    from lrm_rt.config import NAMED_CONFIGS

    if spec in BENCH_CONFIGS:
        cfg = BENCH_CONFIGS[spec]()
        return ModelSource(spec, cfg, True, f"random(seed={seed})",
                           lambda: LoadedModel(cfg, random_network(cfg, seed), f"random(seed={seed})"))
    if spec in NAMED_CONFIGS and spec not in builtin_models() and not Path(spec).is_dir():
        # Release shapes without downloading: seeded random weights (no meaningful surface; see Surface).
        cfg = NAMED_CONFIGS[spec]
        return ModelSource(spec, cfg, True, f"random(seed={seed})",
                           lambda: load_model(spec, random_weights=True, seed=seed))
    first = load_model(spec)
    cache = [first]

    def load():
        return cache.pop() if cache else load_model(spec)

    return ModelSource(first.config.name if Path(spec).is_dir() else spec, first.config, False, first.source, load)


def release_shape(cfg) -> Optional[str]:
    """The release config ``cfg`` has the architecture of (names aside), e.g. "triposr"; None if none."""
    from lrm_rt.config import NAMED_CONFIGS

    for name, ref in NAMED_CONFIGS.items():
        if dataclasses.replace(ref, name=cfg.name) == cfg:
            return name
    return None


def count_params(net: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


# ------------------------------------------------------------------------------------------- inputs

def synthetic_image(size: int = 320, variant: int = 0) -> np.ndarray:
    """An RGBA object on a transparent background: a shaded disk and a box, shifted per variant."""
    rng = np.random.default_rng(1000 + variant)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = size * (0.5 + rng.uniform(-0.05, 0.05)), size * (0.52 + rng.uniform(-0.05, 0.05))
    r = size * 0.28
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    alpha = np.clip(r - d + 0.5, 0, 1)  # one-pixel anti-aliased rim
    box = (np.abs(xx - cx - 0.3 * r) < 0.45 * r) & (np.abs(yy - cy + 0.9 * r) < 0.35 * r)
    alpha = np.maximum(alpha, box.astype(np.float32))
    shade = np.clip(1.0 - 0.6 * d / r, 0.2, 1.0)
    base = rng.uniform(0.3, 1.0, 3)
    rgb = np.where(box[..., None], np.array([0.2, 0.3, 0.9]), base * shade[..., None])
    img = np.concatenate([rgb, alpha[..., None]], axis=-1)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------- surface

def raw_iso_level(spec, threshold: float) -> float:
    """Raw decoder density whose activation equals ``threshold`` (activations are monotonic)."""
    if spec.density_activation == "exp":
        return math.log(threshold) - spec.density_bias
    return math.log(math.expm1(threshold)) - spec.density_bias  # inverse softplus


@dataclass
class Surface:
    """How the benchmark turns a network triplane into the field that is meshed and rendered.

    kind "model": real weights, the network's triplane and decoder as they are.
    kind "synthetic": random weights give a noise field whose iso-surface is a sponge filling the box,
    which would make marching cubes, vertex colours and any coarse-to-fine grid behave nothing like
    on a real object. So the planes are an analytic, smooth blob (``base``) plus a small contribution
    of the network's own triplane (``detail * tanh(triplane / scale)``, so a wrong network output
    still changes the mesh), and the decoder's last layer is tuned like the fixtures' (README §3):
    the density row is scaled/shifted so the iso-level cuts the box at a fixed inside fraction with a
    fixed raw-density spread, and oriented so the centre is inside. Shapes, dtypes and the per-point
    cost of the field are exactly the model's.
    """

    kind: str
    spec: Any
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    threshold: float
    base: Optional[torch.Tensor] = None
    scale: float = 1.0
    info: Dict[str, Any] = field(default_factory=dict)

    def field(self, triplane: torch.Tensor, device: str = "cpu"):
        from lrm_rt.field.spec import TriplaneField

        t = triplane.detach().float()
        if self.kind == "synthetic":
            t = self.base.to(t.device) + SURFACE_DETAIL * torch.tanh(t / self.scale)
        dev = torch.device(device)
        return TriplaneField(t.to(dev).contiguous(), [w.to(dev) for w in self.weights],
                             [b.to(dev) for b in self.biases], self.spec)


def _analytic_planes(c: int, h: int, w: int, first_layer: torch.Tensor, seed: int) -> torch.Tensor:
    """Planes whose decoded field is a compact blob: every plane holds a centred Gaussian bump g times
    a per-plane channel vector a_p, with a_p solved (least squares) so that W1_p a_p is the same vector
    for the three planes (W1 = the decoder's first layer). The first hidden layer then sees roughly
    v * (g_xy + g_xz + g_yz), a round function of the position, whatever the random weights are; a weak
    low-frequency wave keeps the shape from being perfectly symmetric."""
    gen = torch.Generator().manual_seed(seed + 7)
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1  # plane texel centres, align_corners=False
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    bump = torch.exp(-(uu ** 2 + vv ** 2) / (2 * 0.4 ** 2))
    blocks = [first_layer[:, p * c:(p + 1) * c].double() for p in range(3)]
    a0 = torch.randn(c, generator=gen, dtype=torch.float64)
    target = blocks[0] @ a0
    norm = float(target.std()) or 1.0
    a0, target = a0 / norm, target / norm  # pre-activation swing ~1 per plane
    amps = [a0] + [torch.linalg.lstsq(blk, target[:, None]).solution[:, 0] for blk in blocks[1:]]
    planes = torch.empty(3, c, h, w)
    for p in range(3):
        k = torch.randn(2, generator=gen) * 1.5
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        wave = torch.cos(math.pi * (k[0] * uu + k[1] * vv) + phase)
        planes[p] = amps[p].float()[:, None, None] * bump + 0.1 * float(amps[p].abs().mean()) * \
            torch.randn(c, generator=gen)[:, None, None] * wave

    def target(p: torch.Tensor) -> torch.Tensor:
        """The blob the planes encode, at normalised points (N, 3): the sum of the three bumps."""
        x, y, z = p.unbind(-1)
        return sum(torch.exp(-(a ** 2 + b ** 2) / (2 * 0.4 ** 2)) for a, b in ((x, y), (x, z), (y, z)))

    return planes, target


def _last_hidden(fld, points: torch.Tensor) -> torch.Tensor:
    """The decoder's activations feeding its last layer (what the tuned density row weighs)."""
    import torch.nn.functional as F

    from lrm_rt.field import torch_ref

    x = torch_ref.sample_triplane(fld.planes, points, fld.spec)
    act = F.silu if fld.spec.hidden_activation == "silu" else F.relu
    for wt, bs in zip(fld.weights[:-1], fld.biases[:-1]):
        x = act(F.linear(x, wt, bs))
    return x


def make_surface(src: ModelSource, weights, biases, triplane0: torch.Tensor, threshold: float,
                 seed: int, tune_res: int = 48) -> Surface:
    from lrm_rt.field import torch_ref
    from lrm_rt.field.spec import TriplaneField

    spec = src.config.field_spec
    t0 = triplane0.detach().float().cpu()
    w = [x.detach().float().cpu().clone() for x in weights]
    b = [x.detach().float().cpu().clone() for x in biases]
    pts = torch_ref.grid_points(tune_res, spec)
    level_raw = raw_iso_level(spec, threshold)
    if not src.random:
        raw = torch_ref.query_raw(TriplaneField(t0, w, b, spec), pts)[:, 0]
        frac = float((raw > level_raw).float().mean())
        if 0.0 < frac < 1.0:
            return Surface("model", spec, w, b, threshold,
                           info={"kind": "model", "inside_fraction_at_%d" % tune_res: round(frac, 4),
                                 "description": "the model's own triplane and decoder"})
        note = f"real weights give no surface at threshold {threshold} on this input; using the synthetic one"
    else:
        note = ""
    scale = float(t0.std()) or 1.0
    base, target_fn = _analytic_planes(*t0.shape[-3:], w[0], seed)
    surf = Surface("synthetic", spec, w, b, threshold, base=base, scale=scale)
    with torch.no_grad():
        hidden = _last_hidden(surf.field(t0), pts)  # (N, hidden)
        feats = torch.cat([hidden, torch.ones(len(hidden), 1)], 1).double()
        target = target_fn(pts / spec.radius).double()
        # ridge least squares: the density row that best reproduces the analytic blob from the
        # decoder's own last hidden features (a random decoder is not monotonic in its input)
        gram = feats.T @ feats
        ridge = 1e-4 * float(torch.diagonal(gram).mean()) * torch.eye(len(gram), dtype=torch.float64)
        beta = torch.linalg.solve(gram + ridge, feats.T @ target)
        pred = (feats @ beta).float()
        cut = float(torch.quantile(pred, 1.0 - SURFACE_INSIDE_FRACTION))
        alpha = SURFACE_RAW_STD / max(float(pred.std()), 1e-12)
        # raw' = alpha * (pred - cut) + level_raw: inside (raw' > level_raw) <=> pred > cut
        w[-1][0] = alpha * beta[:-1].float()
        b[-1][0] = alpha * (float(beta[-1]) - cut) + level_raw
        rgb = torch_ref.query_raw(surf.field(t0), pts)[:, 1:]
        rgb_std = float(rgb.std())
        if rgb_std > 0:  # spread the colours over the sigmoid's useful range
            w[-1][1:] *= 1.5 / rgb_std
            b[-1][1:] *= 1.5 / rgb_std
        raw2 = torch_ref.query_raw(surf.field(t0), pts)[:, 0].reshape(tune_res, tune_res, tune_res)
    inside = raw2 > level_raw
    border = torch.zeros_like(inside)
    border[[0, -1]] = True
    border[:, [0, -1]] = True
    border[:, :, [0, -1]] = True
    surf.info = {
        "kind": "synthetic",
        "description": "analytic blob planes (centred Gaussian bumps matched through the decoder's first layer) "
                       "+ %.2f x tanh(network triplane / its std); decoder density row "
                       "tuned so %.0f%% of the box is inside with raw-density std %.1f" %
                       (SURFACE_DETAIL, 100 * SURFACE_INSIDE_FRACTION, SURFACE_RAW_STD),
        "inside_fraction_at_%d" % tune_res: round(float(inside.float().mean()), 4),
        "touches_box_boundary": bool((inside & border).any()),
    }
    if note:
        surf.info["note"] = note
    return surf


# ------------------------------------------------------------------------------------------- backends

@dataclass
class NetEntry:
    name: str
    precision: str
    make: Callable[["ModelContext"], Any]  # -> NetworkBackend; raises Unavailable


@dataclass
class FieldEntry:
    name: str
    make: Callable[["ModelContext"], Tuple[Any, str, str]]  # -> (FieldBackend, field device, mc backend)


def cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# CPU instructions that give torch real (not emulated) reduced-precision arithmetic. Without them a
# bf16/fp16 network runs through conversions, often many times slower than fp32 (fp16 matmuls on an
# AVX-512 CPU without avx512_fp16 were measured ~100x slower), which would stall a full-size run.
NATIVE_CPU_FLAGS = {"bf16": {"avx512_bf16", "amx_bf16", "bf16"}, "fp16": {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}}


def _torch_net(precision: str) -> Callable:
    def make(ctx: "ModelContext"):
        from lrm_rt.network_backends import TorchNetworkBackend

        if precision != "fp32" and ctx.device == "cpu" and not ctx.explicit_net \
                and not (cpu_flags() & NATIVE_CPU_FLAGS[precision]):
            raise Unavailable(f"this CPU has no native {precision} arithmetic ({'/'.join(sorted(NATIVE_CPU_FLAGS[precision]))}); "
                              f"pass --network-backends torch-{precision} to run it anyway")
        model = ctx.src.load()
        return TorchNetworkBackend(model.network, ctx.device, precision, in_place=True)  # loaded for it alone

    return make


def _exported(kind: str, precision: str) -> Callable:
    """ONNX Runtime / TensorRT: ``lrm_rt.export.export_model`` into a scratch folder, then the runtime's
    backend over it (``lrm_rt.pipeline.exported_network_backend``). The one-time export/engine build is
    recorded as ``build_seconds``, not timed as inference."""

    def make(ctx: "ModelContext"):
        need = "onnxruntime" if kind == "onnxruntime" else "tensorrt"
        if importlib.util.find_spec(need) is None:
            raise Unavailable(f"python package {need!r} is not installed")
        if kind == "tensorrt" and not ctx.device.startswith("cuda"):
            raise Unavailable("TensorRT needs a CUDA GPU (run with --device cuda on a GPU machine)")
        if kind == "onnxruntime" and precision == "fp16" and ctx.device == "cpu" and not ctx.explicit_net:
            raise Unavailable("fp16 ONNX graphs run through casts on a CPU (no fp16 kernels); pass "
                              "--network-backends onnxruntime-fp16 to run it anyway")
        try:
            from lrm_rt.export import export_model
            from lrm_rt.pipeline import exported_network_backend
        except ImportError as exc:
            raise Unavailable(f"lrm_rt export support is not importable ({exc})") from None
        from lrm_rt.errors import LrmError

        workdir = ctx.scratch / f"export-{kind}-{precision}"
        t0 = time.perf_counter()
        try:
            export_model(ctx.src.load(), workdir, fp16=precision == "fp16", tensorrt=kind == "tensorrt",
                         max_batch=max(ctx.batches), check_batch=1, threads=ctx.threads, log=lambda m: None)
            backend = exported_network_backend(workdir, kind, ctx.device, precision, ctx.threads)
        except LrmError as exc:
            raise Unavailable(f"{kind} export/load failed: {str(exc).splitlines()[0]}") from None
        backend.build_seconds = time.perf_counter() - t0
        return backend

    return make


def _field_backend(name: str) -> Callable:
    def make(ctx: "ModelContext"):
        from lrm_rt.errors import LrmError
        from lrm_rt.pipeline import field_backend

        if name.startswith("cuda") and not ctx.device.startswith("cuda"):
            raise Unavailable("no CUDA GPU (run with --device cuda on a GPU machine)")
        try:
            fb = field_backend(name, ctx.device)
        except (LrmError, ImportError, OSError) as exc:
            raise Unavailable(str(exc).splitlines()[0]) from None
        if name == "torch":
            return fb, ctx.device, "pymcubes"
        if name == "native":
            return fb, "cpu", _fast_mc("native")
        return fb, ctx.device, _fast_mc("cuda")

    return make


def _fast_mc(preferred: str) -> str:
    try:
        mc = importlib.import_module("lrm_rt.mc")
    except ImportError:
        return "pymcubes"
    if preferred == "native":
        from lrm_rt.kernels import native_available

        return "native" if native_available() else "pymcubes"
    return preferred if preferred in getattr(mc, "BACKENDS", ()) else "auto"


def default_network_entries() -> Dict[str, NetEntry]:
    return {
        "torch-fp32": NetEntry("torch-fp32", "fp32", _torch_net("fp32")),
        "torch-bf16": NetEntry("torch-bf16", "bf16", _torch_net("bf16")),
        "torch-fp16": NetEntry("torch-fp16", "fp16", _torch_net("fp16")),
        "onnxruntime": NetEntry("onnxruntime", "fp32", _exported("onnxruntime", "fp32")),
        "onnxruntime-fp16": NetEntry("onnxruntime-fp16", "fp16", _exported("onnxruntime", "fp16")),
        "tensorrt": NetEntry("tensorrt", "fp16", _exported("tensorrt", "fp16")),
    }


def default_field_entries() -> Dict[str, FieldEntry]:
    return {n: FieldEntry(n, _field_backend(n)) for n in FIELD_BACKENDS}


def marching_cubes(grid: Any, level: float, backend: str) -> Tuple[np.ndarray, np.ndarray]:
    if backend == "pymcubes":  # the baseline: PyMCubes directly, as OpenLRM calls it
        import mcubes

        g = grid.detach().cpu().numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid)
        v, f = mcubes.marching_cubes(g, level)
        return np.asarray(v, np.float32), np.asarray(f, np.int64)
    from lrm_rt.mc import marching_cubes as mc

    v, f = mc(grid, level, backend=backend)
    return np.asarray(v, np.float32), np.asarray(f, np.int64)


def reference_mc_checks(mesh, grid: Any, level: float, mc_backend: str, radius: float,
                        voxel: float) -> List[Dict[str, Any]]:
    """The fast path's mesh against PyMCubes (else the native CPU kernel, unless that is the path under test)
    run on the fast path's own grid: checks marching cubes, vertex placement and winding where no baseline
    mesh exists."""
    from lrm_rt.mesh import Mesh, grid_to_world

    ref_backend = "pymcubes" if importlib.util.find_spec("mcubes") else ("native" if mc_backend != "native" else None)
    if ref_backend is None:
        return [{"check": "mesh_vs_reference_mc", "value": "not compared: no PyMCubes, and the path under test is "
                 "the native kernel", "limit": None, "ok": True}]
    g = to_numpy(grid)
    v, f = marching_cubes(g, level, ref_backend)
    del g
    ref = Mesh(grid_to_world(np.asarray(v, np.float64), grid.shape[0], radius), f, None)
    return [dict(c, check=f"{c['check']}_vs_{ref_backend}_mc") for c in mesh_checks(mesh, ref, voxel,
                                                                                   TOLERANCES["same_triplane"])]


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------- parity

def chamfer(va: np.ndarray, vb: np.ndarray) -> Tuple[float, float]:
    """(symmetric mean Chamfer, Hausdorff) between vertex sets: lrm_rt.meshcompare, else a local cKDTree."""
    try:
        from lrm_rt.meshcompare import chamfer as mc_chamfer

        c = mc_chamfer(va, vb)
        return float(c.mean), float(c.max)
    except ImportError:
        from scipy.spatial import cKDTree

        if len(va) == 0 or len(vb) == 0:
            return (0.0, 0.0) if len(va) == len(vb) else (math.inf, math.inf)
        dab = cKDTree(vb).query(va)[0]
        dba = cKDTree(va).query(vb)[0]
        return float(0.5 * (dab.mean() + dba.mean())), float(max(dab.max(), dba.max()))


def _check(checks: List[Dict[str, Any]], name: str, value: float, limit: float) -> None:
    checks.append({"check": name, "value": _round(value, 9), "limit": _round(limit, 9),
                   "ok": bool(math.isfinite(value) and value <= limit)})


def parity_result(checks: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"passed": all(c["ok"] for c in checks), "checks": checks}


def triplane_checks(t: torch.Tensor, ref: torch.Tensor, precision: str) -> List[Dict[str, Any]]:
    t, ref = t.detach().float().cpu(), ref.detach().float().cpu()
    checks: List[Dict[str, Any]] = []
    if t.shape != ref.shape:
        checks.append({"check": "triplane_shape", "value": str(tuple(t.shape)), "limit": str(tuple(ref.shape)), "ok": False})
        return checks
    err = float((t - ref).abs().max()) if torch.isfinite(t).all() else math.inf
    scale = float(ref.abs().max()) or 1.0
    checks.append({"check": "triplane_max_abs_err", "value": _round(err, 9), "limit": None, "ok": True})
    _check(checks, "triplane_rel_err", err / scale, TOLERANCES["triplane_rel"][precision])
    return checks


def area_and_volume(mesh) -> Tuple[float, float]:
    """Surface area and signed enclosed volume (positive for outward faces) of a triangle mesh."""
    if not mesh.num_faces:
        return 0.0, 0.0
    v = np.asarray(mesh.vertices, np.float64)[np.asarray(mesh.faces)]
    cross = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return float(np.linalg.norm(cross, axis=1).sum() / 2), float(np.einsum("ij,ij->", v[:, 0], cross) / 6)


def mesh_checks(mesh, ref, voxel: float, tol: Dict[str, float]) -> List[Dict[str, Any]]:
    checks: List[Dict[str, Any]] = []
    cm, hd = chamfer(mesh.vertices, ref.vertices)
    _check(checks, "chamfer_voxels", cm / voxel, tol["chamfer_vox"])
    checks.append({"check": "hausdorff_voxels", "value": _round(hd / voxel, 6), "limit": None, "ok": True})
    nf, nr = mesh.num_faces, ref.num_faces
    _check(checks, "face_count_diff", abs(nf - nr), max(tol["face_abs"], tol["face_rel"] * nr))
    (area, volume), (ref_area, ref_volume) = area_and_volume(mesh), area_and_volume(ref)
    _check(checks, "area_rel_diff", abs(area - ref_area) / max(ref_area, 1e-12), tol["area_rel"])
    _check(checks, "volume_rel_diff", abs(volume - ref_volume) / max(abs(ref_volume), 1e-12), tol["volume_rel"])
    if mesh.vertex_colors is not None and ref.vertex_colors is not None and len(mesh.vertices) and len(ref.vertices):
        from scipy.spatial import cKDTree

        idx = cKDTree(ref.vertices).query(mesh.vertices)[1]
        cerr = float(np.abs(mesh.vertex_colors - ref.vertex_colors[idx]).max())
        _check(checks, "vertex_color_max_err", cerr, tol["color"])
    return checks


def grid_sign_checks(grid: np.ndarray, ref: np.ndarray, level: float, sampled: bool = False) -> List[Dict[str, Any]]:
    """Cells whose side of the iso-level differs from the reference (coarse-to-fine grids may hold
    approximate values away from the surface, but must keep every value's side); values within float
    rounding of the level are ignored. ``sampled``: the arrays are a subset of the grid (x-slabs)."""
    near = np.abs(ref - level) <= 1e-4 * max(abs(level), 1.0)
    bad = int((((grid > level) != (ref > level)) & ~near).sum())
    checks: List[Dict[str, Any]] = []
    _check(checks, "grid_sign_mismatch" + ("_sampled" if sampled else ""), bad, TOLERANCES["grid_sign_mismatch"])
    return checks


# ------------------------------------------------------------------------------------------- running

@dataclass
class ModelContext:
    src: ModelSource
    device: str
    scratch: Path
    explicit_net: bool = False
    batches: List[int] = field(default_factory=lambda: [1])
    threads: Optional[int] = None


def _status_row(kind: str, model: str, **kw) -> Dict[str, Any]:
    row = {"kind": kind, "model": model}
    row.update(kw)
    return row


class Runner:
    def __init__(self, settings: Settings, extra_network: Optional[Dict[str, NetEntry]] = None,
                 extra_field: Optional[Dict[str, FieldEntry]] = None, log: Callable[[str], None] = print):
        self.s = settings
        self.log = log
        self.device = settings.device
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net_entries = default_network_entries()
        self.field_entries = default_field_entries()
        self.net_entries.update(extra_network or {})
        self.field_entries.update(extra_field or {})
        self.rows: Dict[str, List[Dict[str, Any]]] = {"network": [], "extraction": [], "render": [], "end_to_end": []}
        self.unavailable: List[Dict[str, str]] = []
        self.models: List[Dict[str, Any]] = []
        self.model_errors: List[Dict[str, str]] = []

    # -- selection --------------------------------------------------------------------------
    def _selected(self, requested: Optional[List[str]], entries: Dict[str, Any], baseline: str, extra) -> List[str]:
        names = list(requested) if requested else list(entries)
        if not requested:
            names += [n for n in (extra or {}) if n not in names]
        unknown = [n for n in names if n not in entries]
        if unknown:
            _usage_error(f"unknown backend(s) {', '.join(unknown)}; known: {', '.join(entries)}")
        return [baseline] + [n for n in names if n != baseline]

    # -- one measured configuration ---------------------------------------------------------
    def measure(self, run: Callable[[], Tuple[Dict[str, float], Any]], check: Callable[[Any], List[Dict[str, Any]]],
                baseline: bool) -> Tuple[Dict[str, Any], Any]:
        """Parity run -> gate -> warm-ups -> timed repeats. Returns (row fields, parity-run output).

        The parity run is the first warm-up (``--warmup N`` = N untimed runs in all). A baseline run
        of >= BASELINE_REUSE_S seconds is also its first timed run: first-call overheads are
        milliseconds there, and a dense 512^3 torch grid should not be computed twice for nothing.
        """
        repeats = self.s.baseline_repeats if baseline else self.s.repeats
        mem = PeakMemory(self.device)
        out: Any = None
        with mem:
            try:
                first, out = run()
                checks = check(out)
            except Exception as exc:  # a backend crashing is a result to report, not a suite failure
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                return {"status": "error", "reason": msg}, None
            parity = parity_result(checks)
            if not parity["passed"]:
                return {"status": "FAILING", "parity": parity,
                        "reason": "; ".join(f"{c['check']} {c['value']} > {c['limit']}" for c in checks if not c["ok"])}, out
            total = next((first[k] for k in ("total", "extraction", "network") if k in first), sum(first.values()))
            reuse = baseline and total >= BASELINE_REUSE_S
            runs = [first] if reuse else []
            if not reuse:
                for _ in range(self.s.warmup - 1):
                    run()
            runs += [run()[0] for _ in range(repeats - len(runs))]
        return {"status": "ok", "parity": parity, "repeats": repeats, "warmup": 0 if reuse else max(self.s.warmup, 1),
                "first_run_timed": reuse, "timings": summarise(runs), **mem.as_dict()}, out

    # -- per model --------------------------------------------------------------------------
    def run_model(self, spec: str, scratch: Path) -> None:
        s = self.s
        self.log(f"== model {spec}")
        src = resolve_model(spec, s.seed)
        cfg = src.config
        explicit_net = s.network_backends is not None
        ctx = ModelContext(src, self.device, scratch, explicit_net, sorted(set(s.batches + s.e2e_batches)), s.threads)
        from lrm_rt.pipeline import preprocess_config
        from lrm_rt.preprocess import preprocess

        pcfg = preprocess_config(cfg)
        images = [synthetic_image(320, i) for i in range(max(s.batches + s.e2e_batches))]
        level = float(cfg.mc_threshold)

        def prep(batch: int) -> torch.Tensor:
            return torch.cat([preprocess(images[i], pcfg).pixel_values for i in range(batch)])

        net_names = self._selected(s.network_backends, self.net_entries, BASELINE_NET, None)
        field_names = self._selected(s.field_backends, self.field_entries, BASELINE_FIELD, None)
        minfo: Dict[str, Any] = {"name": src.name, "shape": release_shape(cfg), "family": cfg.family,
                                 "version": cfg.version, "source": src.source,
                                 "random_weights": src.random, "input_size": cfg.input_size,
                                 "mc_threshold": level, "radius": cfg.field_spec.radius}
        self.models.append(minfo)
        # One network in memory at a time (so peak RSS is per backend): the baseline first, whose
        # triplanes and meshes are the parity references, then each fast network with its end-to-end runs.
        ref_triplanes: Dict[int, torch.Tensor] = {}
        e2e_refs: Dict[int, Any] = {}
        surface = None
        fields: Dict[str, Tuple[Any, str, str]] = {}
        for name in net_names:
            entry = self.net_entries[name]
            try:
                backend = entry.make(ctx)
            except Unavailable as exc:
                if name == BASELINE_NET:
                    raise
                self._unavailable("network", name, str(exc), src.name)
                continue
            if name == BASELINE_NET:
                minfo["parameters"] = count_params(backend.network)
            self._network_rows(src, name, entry, backend, prep, ref_triplanes)
            if name == BASELINE_NET:
                tri0 = ref_triplanes[s.batches[0]][0]
                minfo["triplane_shape"] = list(tri0.shape)
                surface = make_surface(src, backend.weights, backend.biases, tri0, level, s.seed)
                minfo["surface"] = surface.info
                for fname in field_names:
                    try:
                        fields[fname] = self.field_entries[fname].make(ctx)
                    except Unavailable as exc:
                        self._unavailable("field", fname, str(exc), src.name)
                # extraction and rendering do not need the network: free it so their peak RSS is theirs
                del backend
                self._extraction(src, surface, fields, tri0, level, scratch)
                self._render(src, surface, fields, tri0)
                backend = entry.make(ctx)
            if name == BASELINE_NET or self._passed(src.name, name):
                self._end_to_end(src, surface, name, entry, backend, fields, prep, level, scratch, e2e_refs)
            del backend

    def _network_rows(self, src: ModelSource, name: str, entry: NetEntry, backend, prep, ref_triplanes) -> None:
        for b in self.s.batches:
            pixels = prep(b)

            def run(backend=backend, pixels=pixels, b=b):
                t = StageTimer(self.device)
                with t("preprocess"):
                    prep(b)
                tri, nt = backend.run(pixels)
                sync(self.device)
                for k, v in nt.items():
                    t.add(k, v)
                t.add("network", sum(nt.values()))
                return t.times, tri

            base = name == BASELINE_NET
            check = (lambda tri: []) if base else \
                (lambda tri, b=b, p=entry.precision: triplane_checks(tri, ref_triplanes[b], p))
            res, tri = self.measure(run, check, base)
            if base:
                if tri is None:
                    raise RuntimeError(f"the baseline network failed on {src.name}: {res.get('reason')}")
                ref_triplanes[b] = tri.detach().float().cpu()
            row = _status_row("network", src.name, network_backend=name, precision=entry.precision, batch=b,
                              total_key="network", **res)
            if getattr(backend, "build_seconds", None) is not None:
                row["build_seconds"] = _round(backend.build_seconds, 3)
            self.rows["network"].append(row)
            self._log_row(row)

    def _passed(self, model: str, net: str) -> bool:
        rows = [r for r in self.rows["network"] if r["model"] == model and r["network_backend"] == net]
        return bool(rows) and all(r["status"] == "ok" for r in rows)

    def _unavailable(self, kind: str, name: str, reason: str, model: str) -> None:
        if not any(u["kind"] == kind and u["name"] == name and u["reason"] == reason for u in self.unavailable):
            self.unavailable.append({"kind": kind, "name": name, "reason": reason, "model": model})
            self.log(f"   unavailable {kind} backend {name}: {reason}")

    def _log_row(self, row: Dict[str, Any]) -> None:
        what = "/".join(str(row[k]) for k in ("network_backend", "field_backend") if row.get(k))
        where = " ".join(f"{k}={row[k]}" for k in ("batch", "resolution") if row.get(k) is not None)
        tail = ""
        if row["status"] == "ok":
            tot = row["timings"].get(row.get("total_key", "total"), {}) or {}
            if tot.get("median") is not None:
                tail = f"{tot['median'] * 1000:.1f} ms"
        elif row["status"] == "extrapolated":
            tail = f"~{row['timings'][row['total_key']]['median'] * 1000:.1f} ms (extrapolated)"
        else:
            tail = row.get("reason", "")
        self.log(f"   {row['kind']:<10} {what:<28} {where:<22} {row['status']:<12} {tail}")

    # -- extraction -------------------------------------------------------------------------
    def _extract(self, fb, mc_backend: str, fld, res: int, level: float, timer: StageTimer, export_path: Optional[Path],
                 dense_reference: bool):
        from lrm_rt.mesh import Mesh, export_mesh, grid_to_world

        with timer("density_grid"):
            grid = fb.density_grid(fld, res) if dense_reference else fb.density_grid(fld, res, level=level)
        with timer("marching_cubes"):
            v, f = marching_cubes(grid, level, mc_backend)
        verts = grid_to_world(np.asarray(v, np.float64), res, fld.spec.radius)
        colors = None
        if len(verts):
            with timer("vertex_colors"):
                _, rgb = fb.query(fld, torch.from_numpy(verts))
                colors = to_numpy(rgb).astype(np.float32)
        else:
            timer.add("vertex_colors", 0.0)
        mesh = Mesh(verts, f, colors)
        if export_path is not None:
            with timer("export"):
                export_mesh(mesh, export_path, "glb")
        return mesh, grid

    def _extraction(self, src: ModelSource, surface: Surface, fields, tri0: torch.Tensor, level: float, scratch: Path):
        s = self.s
        resolutions = sorted(set(s.resolutions) | {s.e2e_resolution})
        for res in resolutions:
            voxel = 2 * surface.spec.radius / (res - 1)
            ref_mesh, ref_grid = None, None
            for name, (fb, fdev, mc) in fields.items():
                base = name == BASELINE_FIELD
                fld = surface.field(tri0, fdev)
                if base and s.baseline_max_resolution and res > s.baseline_max_resolution:
                    row = self._extrapolate_extraction(src.name, res)
                    self.rows["extraction"].append(row)
                    self._log_row(row)
                    continue
                outs: Dict[str, Any] = {}

                def run(fb=fb, mc=mc, fld=fld, base=base):
                    t = StageTimer(self.device)
                    mesh, grid = self._extract(fb, mc, fld, res, level, t, scratch / f"{name}-{res}.glb", base)
                    t.add("extraction", sum(t.times[k] for k in EXTRACTION_STAGES))
                    outs["mesh"], outs["grid"] = mesh, grid
                    return t.times, (mesh, grid)

                def check(out, base=base):
                    mesh, grid = out
                    if base:
                        return []
                    if ref_mesh is not None:
                        return (mesh_checks(mesh, ref_mesh, voxel, TOLERANCES["same_triplane"]) +
                                grid_sign_checks(to_numpy(grid), ref_grid, level))
                    # no baseline mesh (above the cap, or the baseline failed): the grid's sides against torch on
                    # sampled slabs, and the mesh against a reference marching cubes of that grid
                    return (self._sampled_sign_checks(fld, grid, res, level) +
                            reference_mc_checks(mesh, grid, level, mc, fld.spec.radius, voxel))

                res_row, out = self.measure(run, check, base)
                mesh = out[0] if out is not None else None
                row = _status_row("extraction", src.name, field_backend=name, mc_backend=mc, resolution=res,
                                  total_key="extraction", **res_row)
                if mesh is not None:
                    row["mesh"] = {"vertices": mesh.num_vertices, "faces": mesh.num_faces}
                if base and out is not None:
                    ref_mesh, ref_grid = mesh, to_numpy(out[1])
                self.rows["extraction"].append(row)
                self._log_row(row)
                outs.clear()
            for p in scratch.glob("*.glb"):
                p.unlink()

    def _sampled_sign_checks(self, fld, grid, res: int, level: float) -> List[Dict[str, Any]]:
        """Above the baseline cap there is no dense reference mesh: compare the side of the level on a
        few full x-slabs evaluated with the torch reference instead."""
        from lrm_rt.field import torch_ref

        rng = np.random.default_rng(res)
        xs = np.sort(rng.choice(res, size=min(8, res), replace=False))
        ref_fld = dataclasses.replace(fld, planes=fld.planes.cpu(), weights=[w.cpu() for w in fld.weights],
                                      biases=[b.cpu() for b in fld.biases])
        a = torch_ref.grid_axis(res, fld.spec)
        yy, zz = torch.meshgrid(a, a, indexing="ij")
        ref = []
        for i in xs:
            pts = torch.stack([torch.full_like(yy, float(a[i])), yy, zz], -1).reshape(-1, 3)
            ref.append(torch_ref.query(ref_fld, pts)[0].reshape(res, res).numpy())
        return grid_sign_checks(to_numpy(grid)[xs], np.stack(ref), level, sampled=True)

    def _extrapolate_extraction(self, model: str, res: int) -> Dict[str, Any]:
        """Baseline above the cap: per stage, a power law through the measured baseline rows (log-log least
        squares over all measured grids >= 64, or the two largest). Labelled 'extrapolated' everywhere."""
        pts = [(r["resolution"], r["timings"]) for r in self.rows["extraction"]
               if r["model"] == model and r["field_backend"] == BASELINE_FIELD and r["status"] == "ok"]
        pts = [p for p in pts if p[0] >= 64] or pts
        if not pts:
            return _status_row("extraction", model, field_backend=BASELINE_FIELD, mc_backend="pymcubes", resolution=res,
                               status="error", reason="no measured baseline resolution to extrapolate from")
        timings, slopes = {}, {}
        for stage in EXTRACTION_STAGES + ["export"]:
            rs = np.array([p[0] for p in pts], float)
            ts = np.array([max(p[1][stage]["median"], 1e-9) for p in pts], float)
            if len(rs) >= 2:
                k, c = np.polyfit(np.log(rs), np.log(ts), 1)
            else:  # one point: dense grid and PyMCubes visit R^3 cells, colours/export scale with the surface
                k = 3.0 if stage in ("density_grid", "marching_cubes") else 2.0
                c = math.log(ts[0]) - k * math.log(rs[0])
            slopes[stage] = round(float(k), 3)
            timings[stage] = {"median": _round(math.exp(c + k * math.log(res))), "p90": None, "runs": []}
        timings["extraction"] = {"median": _round(sum(timings[k]["median"] for k in EXTRACTION_STAGES)), "p90": None, "runs": []}
        return _status_row("extraction", model, field_backend=BASELINE_FIELD, mc_backend="pymcubes", resolution=res,
                           total_key="extraction", status="extrapolated", timings=timings,
                           reason=f"above --baseline-max-resolution {self.s.baseline_max_resolution}: power law "
                                  f"fitted over measured grids {sorted(int(p[0]) for p in pts)}, slopes {slopes}")

    # -- rendering --------------------------------------------------------------------------
    def _render(self, src: ModelSource, surface: Surface, fields, tri0: torch.Tensor) -> None:
        from lrm_rt import render as R

        s, cfg = self.s, src.config
        size, n = s.render_size, s.render_views
        if cfg.family == "triposr":
            rays = R.spherical_cameras(n, 0.0, 1.9, 40.0, size, size)
            cams = [(rays[0][i], rays[1][i], None) for i in range(n)]
        else:
            cams = []
            for cam in R.surrounding_cameras(n + (cfg.version == "1.1"), version=cfg.version)[:n]:
                o, d = R.openlrm_rays(cam, size)
                opts = R.OpenLRMRenderOptions(n_coarse=cfg.samples_per_ray // 2, n_fine=cfg.samples_per_ray // 2,
                                              version=cfg.version)
                cams.append((o, d, opts))
        ref = None
        for name, (fb, fdev, _) in fields.items():
            fld = surface.field(tri0, fdev)

            def run(fb=fb, fld=fld):
                t = StageTimer(self.device)
                imgs = []
                with t("render"):
                    for o, d, opts in cams:
                        out = fb.render(fld, o.to(fdev), d.to(fdev), opts)
                        imgs.append(out.rgb.detach().float().cpu())
                return t.times, torch.stack(imgs)

            def check(imgs, name=name):
                if name == BASELINE_FIELD:
                    return []
                checks: List[Dict[str, Any]] = []
                _check(checks, "render_max_abs_err", float((imgs - ref).abs().max()), TOLERANCES["render_max_abs"])
                return checks

            res_row, imgs = self.measure(run, check, name == BASELINE_FIELD)
            if name == BASELINE_FIELD:
                ref = imgs
            row = _status_row("render", src.name, field_backend=name, views=n, size=size, total_key="render", **res_row)
            self.rows["render"].append(row)
            self._log_row(row)

    # -- end to end -------------------------------------------------------------------------
    def _end_to_end(self, src: ModelSource, surface: Surface, net_name: str, entry: NetEntry, net, fields, prep,
                    level: float, scratch: Path, refs: Dict[int, Any]) -> None:
        """image -> GLB for one network with every field backend; the baseline pair runs first and its
        meshes (``refs[batch]``) gate the others."""
        s = self.s
        res = s.e2e_resolution
        voxel = 2 * surface.spec.radius / (res - 1)
        reduced = entry.precision != "fp32"
        for batch in s.e2e_batches:
            for field_name, (fb, fdev, mc) in fields.items():
                base = net_name == BASELINE_NET and field_name == BASELINE_FIELD
                if base and s.baseline_max_resolution and res > s.baseline_max_resolution:
                    row = self._extrapolate_e2e(src.name, batch, res)
                    refs[batch] = "extrapolated"
                    self.rows["end_to_end"].append(row)
                    self._log_row(row)
                    continue

                def run(fb=fb, fdev=fdev, mc=mc, base=base, batch=batch):
                    t = StageTimer(self.device)
                    t0 = time.perf_counter()
                    with t("preprocess"):
                        pixels = prep(batch)
                    tri, nt = net.run(pixels)
                    sync(self.device)
                    for k, v in nt.items():
                        t.add(k, v)
                    meshes = []
                    for i in range(batch):
                        ts = time.perf_counter()
                        fld = surface.field(tri[i], fdev)  # benchmark artefact: not counted
                        sync(self.device)
                        t.add("surface_setup", time.perf_counter() - ts)
                        mesh, _ = self._extract(fb, mc, fld, res, level, t, scratch / f"e2e-{i}.glb", base)
                        meshes.append(mesh)
                    t.add("total", time.perf_counter() - t0 - t.times["surface_setup"])
                    t.add("per_image", t.times["total"] / batch)
                    del t.times["surface_setup"]
                    return t.times, meshes

                def check(meshes, base=base, batch=batch):
                    if base:
                        return []
                    if isinstance(refs.get(batch), str):  # said in the row, not passed over in silence
                        return [{"check": "meshes_vs_baseline", "value": f"not compared: {refs[batch]}",
                                 "limit": None, "ok": True}]
                    tol = TOLERANCES["e2e_reduced" if reduced else "e2e_fp32"]
                    checks: List[Dict[str, Any]] = []
                    _check(checks, "mesh_count_diff", abs(len(meshes) - len(refs[batch])), 0)
                    for m, r in zip(meshes, refs[batch]):
                        checks += mesh_checks(m, r, voxel, tol)
                    return checks

                res_row, meshes = self.measure(run, check, base)
                if base:
                    if meshes is None:
                        raise RuntimeError(f"the baseline pipeline failed on {src.name}: {res_row.get('reason')}")
                    refs[batch] = meshes
                row = _status_row("end_to_end", src.name, network_backend=net_name, field_backend=field_name,
                                  mc_backend=mc, batch=batch, resolution=res, total_key="total", **res_row)
                if isinstance(refs.get(batch), str) and not base and row["status"] == "ok":
                    row["parity_note"] = ("no baseline mesh at this grid (baseline extrapolated): gated by the "
                                          "network and extraction rows only")
                if meshes:
                    row["mesh"] = {"vertices": meshes[0].num_vertices, "faces": meshes[0].num_faces}
                self.rows["end_to_end"].append(row)
                self._log_row(row)
                for p in scratch.glob("e2e-*.glb"):
                    p.unlink()

    def _extrapolate_e2e(self, model: str, batch: int, res: int) -> Dict[str, Any]:
        """Baseline end to end above the cap = measured network row + extrapolated extraction row (per image x batch)."""
        net = next((r for r in self.rows["network"] if r["model"] == model and r["network_backend"] == BASELINE_NET
                    and r["batch"] == batch and r["status"] == "ok"), None)
        ext = next((r for r in self.rows["extraction"] if r["model"] == model and r["field_backend"] == BASELINE_FIELD
                    and r["resolution"] == res), None)
        if net is None or ext is None or ext["status"] not in ("ok", "extrapolated"):
            return _status_row("end_to_end", model, network_backend=BASELINE_NET, field_backend=BASELINE_FIELD,
                               mc_backend="pymcubes", batch=batch, resolution=res, status="error",
                               reason="cannot extrapolate the baseline: missing network or extraction row")
        t = {k: net["timings"][k]["median"] for k in ("preprocess", "encoder", "transformer")}
        for k in EXTRACTION_STAGES + ["export"]:
            t[k] = ext["timings"][k]["median"] * batch
        t["total"] = sum(t.values())
        t["per_image"] = t["total"] / batch
        return _status_row("end_to_end", model, network_backend=BASELINE_NET, field_backend=BASELINE_FIELD,
                           mc_backend="pymcubes", batch=batch, resolution=res, total_key="total", status="extrapolated",
                           timings={k: {"median": _round(v), "p90": None, "runs": []} for k, v in t.items()},
                           reason="measured baseline network + extrapolated baseline extraction (see extraction rows)")


# ------------------------------------------------------------------------------------------- speedups, targets

def add_speedups(rows: Dict[str, List[Dict[str, Any]]]) -> None:
    keys = {"network": ("batch",), "extraction": ("resolution",), "render": ("size",),
            "end_to_end": ("batch", "resolution")}
    for kind, ks in keys.items():
        base = {}
        for r in rows[kind]:
            is_base = r.get("network_backend", BASELINE_NET) == BASELINE_NET and r.get("field_backend", BASELINE_FIELD) == BASELINE_FIELD
            if is_base and r["status"] in ("ok", "extrapolated"):
                base[(r["model"],) + tuple(r[k] for k in ks)] = r
        for r in rows[kind]:
            b = base.get((r["model"],) + tuple(r[k] for k in ks))
            tk = r.get("total_key", "network" if kind == "network" else "total")
            r.setdefault("total_key", tk)
            if r["status"] != "ok" or b is None:
                continue
            tb, tr = b["timings"][tk]["median"], r["timings"][tk]["median"]
            if tb and tr:
                r["speedup_vs_baseline"] = _round(tb / tr, 3)
                if b["status"] == "extrapolated":
                    r["speedup_note"] = "baseline extrapolated"


def loglog_slope(points: List[Tuple[float, float]]) -> Optional[float]:
    pts = [(r, t) for r, t in points if t and t > 0]
    if len(pts) < 2:
        return None
    k, _ = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)
    return float(k)


def scaling_fits(rows: Dict[str, List[Dict[str, Any]]], lo: int = 128, hi: int = 512) -> List[Dict[str, Any]]:
    out = []
    groups: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
    for r in rows["extraction"]:
        if r["status"] == "ok":
            groups.setdefault((r["model"], r["field_backend"]), []).append((r["resolution"], r["timings"]["extraction"]["median"]))
    for (model, fb), pts in groups.items():
        sel = [p for p in pts if lo <= p[0] <= hi]
        window = f"{lo}..{hi}"
        if len(sel) < 2:
            sel, window = pts, "all measured"
        k = loglog_slope(sel)
        out.append({"model": model, "field_backend": fb, "window": window,
                    "resolutions": sorted(p[0] for p in sel), "slope": _round(k, 3) if k is not None else None})
    return out


def _best(rows: List[Dict[str, Any]], models: set, **match) -> Optional[Dict[str, Any]]:
    cand = [r for r in rows if r["status"] == "ok" and r.get("speedup_vs_baseline") and r["model"] in models
            and all(r.get(k) == v for k, v in match.items())
            and not (r.get("network_backend", BASELINE_NET) == BASELINE_NET and r.get("field_backend") == BASELINE_FIELD)]
    return max(cand, key=lambda r: r["speedup_vs_baseline"]) if cand else None


def evaluate_targets(rows, fits, machine: Dict[str, Any], models: Optional[List[Dict[str, Any]]] = None
                     ) -> List[Dict[str, Any]]:
    """The issue's targets, evaluated on the models with TripoSR's architecture (release name or a
    real checkpoint of that shape)."""
    tsr = {m["name"] for m in models if m.get("shape") == "triposr"} if models is not None else {"triposr"}
    on_gpu = "gpu" in machine
    cores = machine.get("usable_cores")
    core_note = "" if on_gpu or cores == 2 else f"measured on {cores} usable cores; the target is stated for 2 (run under `taskset -c 0,1`)"
    targets = []

    def add(tid, desc, measured, required, met, row=None, note=""):
        targets.append({"id": tid, "description": desc, "measured": measured, "required": required, "met": met,
                        "path": None if row is None else "/".join(x for x in (row.get("network_backend"), row.get("field_backend")) if x),
                        "note": note})

    e2e = _best(rows["end_to_end"], tsr, resolution=256, batch=1)
    if on_gpu:
        add("cpu_e2e_15x", "TripoSR @256, end to end >= 15x the PyTorch fp32 baseline (2 CPU cores)", None, ">= 15x",
            None, note="not applicable: measured on a GPU")
    elif e2e is None:
        add("cpu_e2e_15x", "TripoSR @256, end to end >= 15x the PyTorch fp32 baseline (2 CPU cores)", None, ">= 15x",
            None, note="not measured: needs model triposr at --e2e-resolution 256, batch 1, a passing fast path")
    else:
        sp = e2e["speedup_vs_baseline"]
        add("cpu_e2e_15x", "TripoSR @256, end to end >= 15x the PyTorch fp32 baseline (2 CPU cores)", f"{sp:.1f}x",
            ">= 15x", sp >= 15, e2e, "; ".join(x for x in (core_note, e2e.get("speedup_note", "")) if x))
    ext = _best(rows["extraction"], tsr, resolution=256)
    desc = "TripoSR @256, extraction (grid + MC + colours) >= 20x dense torch"
    if ext is None:
        add("extract_20x", desc, None, ">= 20x", None, note="not measured: needs model triposr at resolution 256 and a passing fast field backend")
    else:
        sp = ext["speedup_vs_baseline"]
        add("extract_20x", desc, f"{sp:.1f}x", ">= 20x", sp >= 20, ext,
            "; ".join(x for x in (core_note if not on_gpu else "", ext.get("speedup_note", "")) if x))
        fit = next((f for f in fits if f["model"] == ext["model"] and f["field_backend"] == ext["field_backend"]), None)
        dslope = "extraction cost ~R^2: log-log slope of extraction time over R = 128..512"
        if fit is None or fit["slope"] is None or fit["window"] != "128..512" or len(fit["resolutions"]) < 3:
            add("extract_r2", dslope, None, "<= 2.4", None, ext, "not measured: needs >= 3 resolutions in 128..512")
        else:
            add("extract_r2", dslope, f"{fit['slope']:.2f}", "<= 2.4", fit["slope"] <= 2.4, ext,
                f"fitted over {fit['resolutions']}")
    gdesc = "TripoSR @256 on an H100, image -> GLB <= 50 ms"
    if not on_gpu:
        add("gpu_e2e_50ms", gdesc, None, "<= 50 ms", None, note="reported only on a GPU")
    else:
        cand = [r for r in rows["end_to_end"] if r["status"] == "ok" and r["model"] in tsr
                and r["resolution"] == 256 and r["batch"] == 1]
        if not cand:
            add("gpu_e2e_50ms", gdesc, None, "<= 50 ms", None, note="not measured: needs model triposr at 256, batch 1")
        else:
            best = min(cand, key=lambda r: r["timings"]["total"]["median"])
            ms = best["timings"]["total"]["median"] * 1000
            gpu = machine.get("gpu", "")
            add("gpu_e2e_50ms", gdesc, f"{ms:.1f} ms", "<= 50 ms", ms <= 50, best,
                "" if "H100" in gpu else f"measured on {gpu}, not an H100")
    return targets


# ------------------------------------------------------------------------------------------- entry

ROW_KINDS = ("network", "extraction", "render", "end_to_end")


def any_measured(rows: Mapping[str, Any]) -> bool:
    """Whether any row of ``rows`` (the runner's rows or a results dict) passed its gate and was timed."""
    return any(r["status"] == "ok" for k in ROW_KINDS for r in rows[k])


def default_out(slug: str, quick: bool) -> Path:
    """results/<machine>, the committed tables; a --quick smoke run goes to results/<machine>-quick (git-ignored)
    so that it never replaces a full run's results."""
    return BENCH_DIR / "results" / (f"{slug}-quick" if quick else slug)


def run_suite(settings: Settings, extra_network: Optional[Dict[str, NetEntry]] = None,
              extra_field: Optional[Dict[str, FieldEntry]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run everything, write results.json / results.md / plots; returns the results dict."""
    from . import report

    if settings.threads:
        torch.set_num_threads(settings.threads)
    runner = Runner(settings, extra_network, extra_field, log)
    machine = machine_info(runner.device)
    out = Path(settings.out) if settings.out else default_out(machine["slug"], settings.quick)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _usage_error(f"cannot create --out directory {out}: {exc.strerror or exc}")
    log(f"lrm-rt bench: {machine['cpu']} ({machine['usable_cores']} usable cores)"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + f"; device {runner.device}; results -> {out}")
    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="lrm-bench-"))
    interrupted = None
    try:
        for spec in settings.models:
            try:
                runner.run_model(spec, scratch)
            except KeyboardInterrupt:  # Ctrl-C or `timeout -s INT`: keep what finished (GPU time is scarce)
                interrupted = spec
                log(f"   interrupted during {spec}: writing the rows measured so far")
                break
            except SystemExit:
                raise
            except Exception as exc:  # one model failing (OOM, bad checkpoint) must not lose the others
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                runner.model_errors.append({"model": spec, "error": msg})
                log(f"   model {spec} aborted: {msg}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    add_speedups(runner.rows)
    fits = scaling_fits(runner.rows)
    results = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": settings.command,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "baseline": BASELINE_DESCRIPTION,
        "tolerances": TOLERANCES,
        "models": runner.models,
        "unavailable": runner.unavailable,
        **runner.rows,
        "scaling": fits,
        "targets": evaluate_targets(runner.rows, fits, machine, runner.models),
        "model_errors": runner.model_errors,
        "interrupted": interrupted,
    }
    if any_measured(runner.rows) or not (out / "results.json").exists():
        report.write_all(results, out, plots=settings.plots, log=log)
    else:  # every model failed: an earlier run's results (committed ones, by default) are worth more than this
        log(f"   nothing was measured: the results already in {out} are left as they were")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import report

    settings = settings_from_args(argv)
    try:
        results = run_suite(settings)
    except KeyboardInterrupt:
        return 130
    print(report.targets_text(results))
    if results["interrupted"]:
        return 130
    rows = [r for k in ROW_KINDS for r in results[k]]
    bad = [r for r in rows if r["status"] in ("FAILING", "error")] + results["model_errors"]
    if bad:
        print(f"{len(bad)} configuration(s) FAILING or erroring: see results.md")
    if not any_measured(results):  # e.g. every model unloadable: nothing measured, nothing written
        for e in results["model_errors"]:
            print(f"  {e['model']}: {e['error']}", file=sys.stderr)
        print(f"error: no configuration ran successfully ({len(bad)} FAILING or erroring)", file=sys.stderr)
        return 2
    return 1 if bad and settings.strict else 0


if __name__ == "__main__":
    sys.exit(main())
