"""``lrm-rt`` command line: reconstruct, eval, export, serve, info, bench."""
from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from .errors import LrmError, is_out_of_memory


def int_in(lo: int, hi: int = 1 << 30):
    """argparse type (also the server's parameter check): an integer in [lo, hi], else ArgumentTypeError."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v
    return parse


def _texture_size(text: str) -> int:
    """--texture's optional SIZE; an image path after a bare --texture was taken for it, so say where it goes."""
    try:
        return int_in(64, 8192)(text)
    except argparse.ArgumentTypeError as e:
        if not text.lstrip("+-").isdigit():
            raise argparse.ArgumentTypeError(f"{e}: a bare --texture takes the next word as its SIZE, so put it "
                                             f"after the images (or write --texture 1024)") from None
        raise


def finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return v


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# mesh.FORMATS, spelled out so the CLI starts without importing torch (a test keeps the two equal)
MESH_FORMATS = ("glb", "obj", "ply")


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct",
                       help="image(s) -> coloured mesh(es): vertex colours, or a baked texture with --texture")
    p.add_argument("images", nargs="+", help="input image files (RGBA, or RGB on a plain background), or folders "
                                             "of them (their image files, sorted by name)")
    p.add_argument("--model", default=None,
                   help="built-in name (default lrm-tiny), a release name (e.g. triposr), a model directory "
                        "or a Hugging Face repo id")
    p.add_argument("--out", default="out", type=_nonempty,
                   help="output directory (default: out), or with one image a mesh file name (out/chair.obj)")
    p.add_argument("--format", default=None, choices=MESH_FORMATS,
                   help="mesh format (default: from an --out file name, else glb)")
    p.add_argument("--mc-resolution", type=int_in(2, 4096), default=None,
                   help="marching-cubes grid size (family default)")
    p.add_argument("--mc-threshold", type=finite, default=None, help="density iso-level (family default)")
    p.add_argument("--render-views", type=int_in(0, 1000), default=0, help="also render N novel views as PNG")
    p.add_argument("--render-size", type=int_in(8, 4096), default=None, help="novel-view size in pixels")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--network-backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="auto: onnxruntime for an export directory (lrm-rt export), torch otherwise")
    p.add_argument("--field-backend", default="auto", choices=["auto", "torch", "native", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="network precision. auto (default): the fastest verified path -- bf16 on CPUs with "
                        "native bf16 where a short probe measures it faster (mesh within 1%% Chamfer of fp32, "
                        "tests/test_precision.py), fp32 elsewhere; "
                        "fp32: exact reference parity; fp16 with an export directory runs its fp16 graphs")
    p.add_argument("--orientation", default="native", choices=["native", "y_up"],
                   help="native: the model's z-up frame, as the reference writes it; y_up: rotated for glTF")
    p.add_argument("--foreground-ratio", type=finite, default=None,
                   help="scale the object so its longer side fills this share of the frame (default: the "
                        "model's setting: TripoSR 0.85, lrm-tiny 0.5; OpenLRM releases take the image as framed)")
    p.add_argument("--no-vertex-colors", action="store_true")
    p.add_argument("--faces", type=int_in(4, 1 << 30), default=None, metavar="N",
                   help="simplify the mesh to about N faces (quadric decimation; colours queried at the new "
                        "vertices); needs fast-simplification")
    p.add_argument("--texture", type=_texture_size, nargs="?", const=1024, default=None, metavar="SIZE",
                   help="bake a SIZE x SIZE UV texture (default 1024) instead of vertex colours; glb or obj "
                        "(obj: + .mtl + _texture.png); needs xatlas")
    p.add_argument("--threads", type=int_in(1, 1024), default=None)
    p.add_argument("--quiet", action="store_true")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="encoder + transformer -> ONNX (validated in ONNX Runtime) [+ TensorRT]")
    p.add_argument("--model", required=True, help="model directory, release name or repo id (as reconstruct)")
    p.add_argument("--out", required=True, help="export directory to write (empty or an earlier export)")
    p.add_argument("--fp16", action="store_true",
                   help="also write fp16 graphs (LayerNorm/Softmax/exp kept fp32); with --tensorrt: FP16 engines")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs TensorRT + a GPU)")
    p.add_argument("--aoti", action="store_true",
                   help="also write network.pt2 (AOTInductor package) for the C/C++ library (liblrm_rt)")
    p.add_argument("--aoti-device", default="cpu", choices=["cpu", "cuda"],
                   help="device the AOTInductor package is compiled for (default cpu)")
    p.add_argument("--opset", type=int_in(1, 1000), default=None, help="ONNX opset (default 17)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights for a release name")
    # the bounds export_model checks (its module imports torch, which the parser should not wait for)
    p.add_argument("--max-batch", type=int_in(1, 64), default=4,
                   help="largest batch of the TensorRT profile (default 4)")
    p.add_argument("--check-batch", type=int_in(1, 16), default=2,
                   help="batch size of the built-in validation (default 2)")
    p.add_argument("--threads", type=int_in(1, 1024), default=None)
    p.add_argument("--quiet", action="store_true")


def cmd_export(args) -> int:
    from .checkpoint import load_model
    from .export import DEFAULT_OPSET, export_model, require_onnx

    require_onnx()  # before loading the model
    if args.threads:
        from .pipeline import set_torch_threads

        set_torch_threads(args.threads)
    if args.aoti:  # before the ONNX export, which takes minutes
        from .export.aoti import check_aoti_device

        check_aoti_device(args.aoti_device)
    _log(args, f"loading {args.model} ...")
    loaded = load_model(args.model, random_weights=args.random_weights)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    export_model(loaded, args.out, opset=opset, fp16=args.fp16, tensorrt=args.tensorrt,
                 max_batch=args.max_batch, check_batch=args.check_batch, threads=args.threads,
                 log=lambda m: _log(args, m))
    if args.aoti:
        from .export.aoti import export_aoti

        export_aoti(loaded, args.out, device=args.aoti_device, log=lambda m: _log(args, m))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="metrics of a reconstruction: mesh vs ground-truth mesh, or render vs image",
                       description="Chamfer distance, F-score and volume IoU of two meshes in one frame (no "
                                   "alignment is searched for; --normalize gt keeps the prediction's scale), or "
                                   "PSNR, SSIM and silhouette IoU of two images of one size.")
    p.add_argument("pred", help="predicted mesh (glb/obj/ply/...) or rendered image (png/jpg)")
    p.add_argument("gt", help="ground-truth mesh or image (RGBA: alpha gives the silhouette)")
    p.add_argument("--tau", type=finite, default=0.05, help="F-score distance, in normalised units (default 0.05)")
    p.add_argument("--normalize", default="gt", choices=["gt", "each", "none"],
                   help="gt: both meshes by the ground truth's unit box (shared frame); each: every mesh by its own")
    p.add_argument("--points", type=int, default=20000, help="surface samples per mesh")
    # No alignment is searched for: the meshes must share a frame (as an LRM's prediction and its object do).
    for side in ("pred", "gt"):
        p.add_argument(f"--{side}-orientation", default="native", choices=["native", "y_up"],
                       help=f"frame of the {'predicted' if side == 'pred' else 'ground-truth'} mesh: native "
                            "(z up, as lrm-rt writes by default) or y_up (written with --orientation y_up, or a "
                            "glTF-convention asset), rotated to native before comparing")


def cmd_eval(args) -> int:
    import json

    from . import eval as E

    kinds = {Path(args.pred).suffix.lower() in IMAGE_SUFFIXES, Path(args.gt).suffix.lower() in IMAGE_SUFFIXES}
    if len(kinds) != 1:
        raise LrmError("eval compares two meshes or two images, not one of each")
    for f in (args.pred, args.gt):
        if not Path(f).exists():
            raise LrmError(f"file not found: {f}")
        if not Path(f).is_file():
            raise LrmError(f"not a regular file: {f}")
    if Path(args.pred).suffix.lower() in IMAGE_SUFFIXES:
        (prgb, pa), (grgb, ga) = E.load_image01(args.pred), E.load_image01(args.gt)
        if prgb.shape != grgb.shape:
            raise LrmError(f"image sizes differ: {prgb.shape[:2]} vs {grgb.shape[:2]}")
        out = E.image_metrics(prgb, grgb, pa, ga)
        for path, alpha in ((args.pred, pa), (args.gt, ga)):
            if alpha is None:
                _log(args, f"silhouette_iou left out: {path} has no alpha channel")
    else:
        from .mesh import native_vertices

        (pv, pf), (gv, gf) = E.load_mesh(args.pred), E.load_mesh(args.gt)
        pred = native_vertices(pv, args.pred_orientation), pf
        gt = native_vertices(gv, args.gt_orientation), gf
        out = E.metrics_dict(E.mesh_metrics(pred, gt, tau=args.tau, n_points=args.points, normalize=args.normalize))
    # JSON has no infinity: identical images' PSNR is written "inf" (float("inf") reads it back)
    print(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in out.items()},
                     indent=1))
    return 0


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def cmd_reconstruct(args) -> int:
    from .pipeline import DEFAULT_MODEL, Reconstructor

    model = args.model or DEFAULT_MODEL
    if args.render_size is not None and not args.render_views:
        raise LrmError("--render-size sets the size of the novel views: add --render-views N (none are rendered)")
    args.images = _expand_folders(args.images)
    out_dir, out_name, fmt = _output_target(args)
    # missing optional packages fail before minutes of work, not after
    if args.texture:
        from .mesh import TEXTURED_FORMATS
        from .texture import require_xatlas

        if fmt not in TEXTURED_FORMATS:
            raise LrmError(f"--texture writes {' or '.join(TEXTURED_FORMATS)}; {fmt} has no standard texture reference")
        require_xatlas()
    if args.faces:
        from .mesh import require_simplifier

        require_simplifier()
    _log(args, f"loading {model} ...")
    rec = Reconstructor(model, device=args.device, network_backend=args.network_backend,
                        field_backend_name=args.field_backend, precision=args.precision, threads=args.threads)
    _log(args, f"  {rec.config.name} ({rec.config.family} {rec.config.version}) from {rec.model.source}; "
               f"network {rec.network.name} {getattr(rec.network, 'precision', '')}; field backend {rec.field.name}; "
               f"{rec.load_seconds:.2f} s")  # the precision: auto may pick bf16 (a slightly different mesh)
    # Read and preprocess every image before writing anything, so a bad input leaves --out untouched; only the
    # model inputs are kept (a batch of large photos would otherwise hold ~100 MB each).
    pres, pre_seconds = [], []
    for img in args.images:
        t0 = time.perf_counter()
        pre = rec.preprocess(img, args.foreground_ratio)
        pres.append(pre.model_inputs_only())
        pre_seconds.append(time.perf_counter() - t0)
        for w in pre.warnings:
            _log(args, f"  warning: {w}")
    names = [out_name] if out_name else _unique_names(args.images)
    created = _prepare_out_dir(out_dir)
    try:
        totals: dict = {}
        for img, pre, name, pre_s in zip(args.images, pres, names, pre_seconds):
            _log(args, f"[{name}] reconstructing {img}")
            t0 = time.perf_counter()
            res = rec.reconstruct(pre, mc_resolution=args.mc_resolution, mc_threshold=args.mc_threshold,
                                  vertex_colors=not args.no_vertex_colors, render_views=args.render_views,
                                  render_size=args.render_size, target_faces=args.faces or 0,
                                  texture_size=args.texture or 0)
            t1 = time.perf_counter()
            paths = rec.save(res, out_dir, name, fmt, args.orientation)
            res.timings["export"] = time.perf_counter() - t1
            res.timings["preprocess"] = pre_s  # done up front (above), so reconstruct's own figure is ~0
            res.timings["total"] = time.perf_counter() - t0 + pre_s
            m = res.mesh
            _log(args, f"  mesh: {m.num_vertices} vertices, {m.num_faces} faces -> {', '.join(str(p) for p in paths)}")
            _log(args, "  " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in res.timings.items()))
            for k, v in res.timings.items():
                totals[k] = totals.get(k, 0.0) + v
    except BaseException:  # leave no empty directories behind a failed run
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty: something was written, keep it
                break
        raise
    if len(args.images) > 1:
        _log(args, "total: " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in totals.items()))
    return 0


# Extensions of files --out may name by mistake (other mesh / scene / image formats): refused rather than made a folder.
OTHER_FILE_FORMATS = {"stl", "gltf", "fbx", "usd", "usda", "usdc", "usdz", "3mf", "dae", "off", "x3d", "wrl", "vrml",
                      "abc", "blend", "3ds", "png", "jpg", "jpeg", "webp"}


def _output_target(args):
    """(directory, fixed mesh name or None, format) from --out / --format / the number of images."""
    out = Path(args.out)
    suffix = out.suffix.lower().lstrip(".")
    if suffix in OTHER_FILE_FORMATS and not _is_dir(out):  # meant as a file, not as a folder named "x.stl"
        raise LrmError(f"--out {args.out}: cannot write .{suffix} files; mesh formats are "
                       f"{', '.join('.' + f for f in MESH_FORMATS)} (or pass an output directory)")
    if suffix in MESH_FORMATS and not _is_dir(out):
        if len(args.images) != 1:
            raise LrmError(f"--out {args.out} names one mesh file but {len(args.images)} images were given: "
                           "pass an output directory")
        if args.format and args.format != suffix:
            raise LrmError(f"--format {args.format} contradicts the --out file name {args.out}")
        return out.parent, out.name, suffix  # the name as given ("Chair.GLB" stays so)
    return out, None, args.format or "glb"


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long: _prepare_out_dir says so
        return False


def _prepare_out_dir(out: Path) -> List[Path]:
    """Create the output directory up front, so an unwritable one fails before minutes of work; returns the
    directories it created, deepest first."""
    try:
        if out.exists() and not out.is_dir():
            raise LrmError(f"--out {out} exists and is not a directory")
        created = [d for d in [out, *out.parents] if not d.exists()]
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LrmError(f"cannot create output directory {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise LrmError(f"output directory is not writable: {out}")
    return created


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".tga", ".ppm", ".pgm", ".pam"}


def _expand_folders(paths: List[str]) -> List[str]:
    """Folders given as inputs stand for their image files (by suffix, sorted; not recursive)."""
    out: List[str] = []
    for p in paths:
        if _is_dir(Path(p)):
            found = sorted(str(f) for f in Path(p).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise LrmError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        else:
            out.append(p)
    return out


def _unique_names(images: List[str]) -> List[str]:
    """Output names from the image stems, suffixed _2, _3, ... so no two collide (a/chair.png, b/chair.png)."""
    names: List[str] = []
    used = set()
    for img in images:
        stem = Path(img).stem or "image"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        names.append(name)
    return names


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP server: POST /reconstruct an image, get the mesh back (model kept loaded)")
    p.add_argument("--model", default=None, help="as reconstruct (default lrm-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(0, 65535), default=8080, help="port (default 8080; 0: any free one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--network-backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    p.add_argument("--field-backend", default="auto", choices=["auto", "torch", "native", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="as reconstruct")
    p.add_argument("--threads", type=int_in(1, 1024), default=None)
    p.add_argument("--max-queue", type=int_in(1, 1024), default=None,
                   help="requests admitted at once, one running and the rest waiting with their bodies (default 8); "
                        "more get 503 with Retry-After")
    p.add_argument("--quiet", action="store_true", help="no request log")


def cmd_serve(args) -> int:
    from .pipeline import DEFAULT_MODEL, Reconstructor
    from .server import MAX_QUEUE, serve

    model = args.model or DEFAULT_MODEL
    _log(args, f"loading {model} ...")
    rec = Reconstructor(model, device=args.device, network_backend=args.network_backend,
                        field_backend_name=args.field_backend, precision=args.precision, threads=args.threads)
    try:
        serve(rec, args.host, args.port, args.quiet, args.max_queue or MAX_QUEUE)
    except OSError as e:  # address in use, permission denied for a low port, unknown host
        raise LrmError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0


def cmd_info(args) -> int:
    import numpy
    import torch

    from .config import NAMED_CONFIGS
    from . import shipped_models

    print(f"lrm_rt {__version__}  python {platform.python_version()}  {platform.platform()}")
    print(f"torch {torch.__version__}  numpy {numpy.__version__}  threads {torch.get_num_threads()}")
    print(f"cpu: {platform.processor() or platform.machine()}  capability {torch.backends.cpu.get_cpu_capability()}")
    cuda = torch.cuda.is_available()
    print("cuda (torch): " + (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                              if cuda else "no GPU"))
    for mod in ("cupy", "onnxruntime", "tensorrt", "trimesh", "mcubes", "rembg", "huggingface_hub"):
        try:
            m = __import__(mod)
            print(f"{mod}: {getattr(m, '__version__', 'available')}")
        except Exception:
            print(f"{mod}: not installed")
    from .kernels import native_unavailable_reason, simd_lanes

    reason = native_unavailable_reason()
    native = f"yes ({simd_lanes() or 'unknown'} float lanes)" if reason is None else f"no ({reason[:300]})"
    print(f"field backends: torch, native {native}, cuda {'yes' if cuda else 'no'}")
    print("network backends: torch, onnxruntime (export dirs), tensorrt (export dirs, needs tensorrt + cupy)")
    print(f"built-in models: {', '.join(shipped_models()) or 'none'}")
    print(f"release configs: {', '.join(sorted(NAMED_CONFIGS))}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``error: ...`` line and status 2, not the usage block first
    (``--help`` still shows it). Sub-command parsers inherit the class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e3" for an option name ("--mc-threshold: expected one argument"): numbers in exponent
        # form are values too (its own pattern covers -1 and -1.5 only)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lrm-rt", description="Fast inference for Large Reconstruction Models")
    parser.add_argument("--version", action="version", version=f"lrm_rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_reconstruct(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_serve(sub)
    sub.add_parser("info", help="versions, backends and devices")
    # Its options live in benchmarks/suite.py (a checkout folder); main() hands the argv over unparsed.
    sub.add_parser("bench", help="benchmark suite vs the PyTorch baseline (lrm-rt bench --help)", add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    # Library warnings (lrm_rt.* loggers) print like the CLI's own, once, and --quiet silences them here (the
    # handler's level: the server still hands them to its clients); the logger is restored afterwards, for callers
    # that run main() in their own process.
    lib_log = logging.getLogger("lrm_rt")
    saved = lib_log.handlers[:], lib_log.level, lib_log.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  warning: %(message)s"))
    handler.setLevel(logging.ERROR if getattr(args, "quiet", False) else logging.WARNING)
    lib_log.handlers[:] = [handler]
    lib_log.setLevel(logging.WARNING)
    lib_log.propagate = False
    try:
        return _run(args)
    finally:
        lib_log.handlers[:], lib_log.propagate = saved[0], saved[2]
        lib_log.setLevel(saved[1])  # setLevel, not the attribute: it also clears the loggers' level cache


def _run(args) -> int:
    try:
        commands = {"reconstruct": cmd_reconstruct, "export": cmd_export, "info": cmd_info, "eval": cmd_eval,
                    "serve": cmd_serve}
        return commands[args.command](args)
    except LrmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (try a smaller --mc-resolution or --render-size)", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0][:200]}); try a smaller --mc-resolution or "
              "--render-size", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command reads or writes (export, bench paths); named by the OS message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
