"""GPU probe of the field kernels' launch and source variants (needs CuPy and a CUDA device).

Times CudaFieldBackend.density_grid on the benchmark's TripoSR-shaped surface (random decoder
120 -> 64 x 9 -> 4, analytic blob planes 3 x 40 x 64 x 64, level 25) for every combination of
  source:  this checkout's cuda/ and, with --old-src, the kernels of an earlier revision
  block:   threads per block of the staged (shared-memory) kernels
  refine:  in-place coarse-to-fine refinement or compacted (CudaFieldBackend(compact=True))
and checks that all of them produce the same grid, bit for bit. Also reports, for decoders too large
to stage, how far torch's renderer on the GPU and the render kernel are from torch on the CPU (float64
for TripoSR; the OpenLRM renderer is float32 only).

    mkdir old && git archive f5fc796 cuda | tar -x -C old
    python benchmarks/probe_field_kernels.py --old-src old/cuda --out probe.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from lrm_rt.field import cuda as cuda_field  # noqa: E402
from lrm_rt.field.spec import TRIPOSR_FIELD, TriplaneField  # noqa: E402


def triposr_surface(seed: int = 0, device: str = "cuda") -> TriplaneField:
    from suite import make_surface

    g = torch.Generator().manual_seed(seed)
    dims = [120] + [64] * 9 + [4]
    ws = [torch.randn(o, i, generator=g) / i ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
    bs = [0.1 * torch.randn(o, generator=g) for o in dims[1:]]
    src = SimpleNamespace(config=SimpleNamespace(field_spec=TRIPOSR_FIELD), random=True)
    t0 = torch.randn(3, 40, 64, 64, generator=g)
    return make_surface(src, ws, bs, t0, 25.0, seed).field(t0, device)


def old_kernel_source(src_dir: Path) -> str:
    """kernel_source() of the kernel files in src_dir (e.g. an earlier revision's cuda/ folder)."""
    from lrm_rt import kernels

    real = kernels.cuda_source_dir
    kernels.cuda_source_dir = lambda: src_dir
    try:
        return cuda_field.kernel_source()
    finally:
        kernels.cuda_source_dir = real


def time_grid(backend, field, r: int, repeats: int):
    out = None
    for _ in range(2):
        out = backend.density_grid(field, r, level=25.0)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = backend.density_grid(field, r, level=25.0)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), out


def grid_variants(args) -> list:
    field = triposr_surface()
    sources = {"new": cuda_field.kernel_source()}
    if args.old_src:
        sources["old"] = old_kernel_source(Path(args.old_src))
    rows, ref = [], {}
    real_source = cuda_field.kernel_source
    for name, text in sources.items():
        cuda_field.kernel_source = lambda text=text: text
        try:
            for block in args.blocks:
                for compact in (False, True):
                    rt = cuda_field.CupyRuntime(staged_block=block)
                    be = cuda_field.CudaFieldBackend(runtime=rt, compact=compact)
                    for r in args.resolutions:
                        ms, grid = time_grid(be, field, r, args.repeats)
                        same = None
                        if r in ref:
                            same = bool(torch.equal(grid, ref[r]))
                        else:
                            ref[r] = grid.clone()
                        row = dict(source=name, block=block, refine="compact" if compact else "in-place", R=r,
                                   ms=round(ms, 2), same_grid_as_first=same)
                        print(row, flush=True)
                        rows.append(row)
        finally:
            cuda_field.kernel_source = real_source
    return rows


def render_check() -> dict:
    """Decoders too large to stage (TripoSR-size): torch on CUDA and the kernel vs torch on the CPU."""
    from test_render_kernels import _wide_field

    from lrm_rt.field.torch_ref import TorchFieldBackend
    from lrm_rt.render import OpenLRMRenderOptions, openlrm_rays, spherical_cameras, surrounding_cameras

    out = {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for family in ("triposr", "openlrm"):
        field = _wide_field(family)
        if family == "triposr":
            o, d = (t[0] for t in spherical_cameras(1, 10.0, 1.9, 40.0, 16, 16))
            opt = None
        else:
            o, d = openlrm_rays(surrounding_cameras(1, 2.0, 0.3, "1.1")[0], 16)
            opt = OpenLRMRenderOptions(version="1.1")

        def moved(dtype, device):
            return TriplaneField(field.planes.to(device, dtype), [w.to(device, dtype) for w in field.weights],
                                 [b.to(device, dtype) for b in field.biases], field.spec)

        cpu_f32 = TorchFieldBackend().render(field, o, d, opt).rgb
        try:
            ref = TorchFieldBackend().render(moved(torch.float64, "cpu"), o.double(), d.double(), opt).rgb.double()
        except RuntimeError:  # the OpenLRM renderer is float32 only: then the reference is torch fp32 on the CPU
            ref = cpu_f32.double()
            out[f"{family}_reference"] = "torch float32 on the CPU"
        results = {
            "torch_cpu_f32": cpu_f32,
            "torch_cuda_f32": TorchFieldBackend().render(moved(torch.float32, "cuda"), o.cuda(), d.cuda(), opt).rgb,
            "kernel_cuda": cuda_field.CudaFieldBackend(render_kernel="always").render(
                moved(torch.float32, "cuda"), o.cuda(), d.cuda(), opt).rgb,
        }
        for k, v in results.items():
            out[f"{family}_{k}_max_abs_err"] = float((v.detach().cpu().double() - ref).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", default=None, help="a folder with an earlier revision's cuda/*.cu(h) files")
    ap.add_argument("--blocks", default="512,1024")
    ap.add_argument("--resolutions", default="256,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.blocks = [int(x) for x in args.blocks.split(",")]
    args.resolutions = [int(x) for x in args.resolutions.split(",")]
    report = {"device": torch.cuda.get_device_name(0)}
    report["render"] = render_check()
    print(report["render"], flush=True)
    report["grids"] = grid_variants(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
