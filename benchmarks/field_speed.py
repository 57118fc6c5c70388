"""Density-grid speed on the CPU: PyTorch reference (dense) vs native dense vs native coarse-to-fine.

Field: TripoSR-size (planes 3x40x64x64, decoder 120 -> 64 x 9 -> 4, SiLU, exp density) with random weights
tuned so that ~10 % of the box is above the iso-level 25 (an object-like surface). The coarse-to-fine grid
is checked against the dense one with PyMCubes (face counts).

    python benchmarks/field_speed.py --resolutions 128 256 [--threads 2] [--skip-torch]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrm_rt.field import torch_ref  # noqa: E402
from lrm_rt.field.native import NativeFieldBackend  # noqa: E402
from lrm_rt.field.spec import TRIPOSR_FIELD, TriplaneField  # noqa: E402

LEVEL = 25.0
MACS_PER_POINT = 120 * 64 + 8 * 64 * 64 + 64 * 4


def triposr_size_field(seed: int = 0) -> TriplaneField:
    """Smooth random planes + random decoder; density row rescaled (std 1.5 raw, 10 % above the level)."""
    g = torch.Generator().manual_seed(seed)
    planes = F.interpolate(torch.randn(3, 40, 4, 4, generator=g), size=(64, 64), mode="bicubic", align_corners=False)
    planes = (planes + 0.05 * torch.randn(3, 40, 64, 64, generator=g)).contiguous()
    dims = [120] + [64] * 9 + [4]
    ws = [torch.randn(o, i, generator=g) / math.sqrt(i) for i, o in zip(dims[:-1], dims[1:])]
    bs = [0.1 * torch.randn(o, generator=g) for o in dims[1:]]
    field = TriplaneField(planes, ws, bs, TRIPOSR_FIELD)
    raw = torch_ref.query_raw(field, torch_ref.grid_points(32, TRIPOSR_FIELD))[:, 0]
    scale = 1.5 / raw.std()
    q = torch.quantile((raw - raw.mean()) * scale, 0.9)
    ws[-1][0] *= scale
    bs[-1][0] = (bs[-1][0] - raw.mean()) * scale + (math.log(LEVEL) + 1.0 - q)
    return field


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def faces(grid: torch.Tensor) -> int:
    import mcubes

    return len(mcubes.marching_cubes(grid.numpy(), LEVEL)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch.get_num_threads())")
    ap.add_argument("--repeat", type=int, default=1, help="best of N for the native runs")
    ap.add_argument("--skip-torch", action="store_true", help="skip the (slow) PyTorch reference")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    field = triposr_size_field()
    backend = NativeFieldBackend(threads=threads)
    print(f"threads {threads}, decoder {MACS_PER_POINT} MACs/point, level {LEVEL}")
    for r in args.resolutions:
        t_dense, dense = timed(lambda: backend.density_grid(field, r, mode="dense"), args.repeat)
        t_c2f, c2f = timed(lambda: backend.density_grid(field, r, level=LEVEL, mode="coarse_to_fine"), args.repeat)
        stats = backend.last_grid_stats
        gmacs = r ** 3 * MACS_PER_POINT / t_dense / 1e9
        print(f"R={r}: native dense {t_dense:.2f} s ({gmacs:.1f} GMAC/s), coarse-to-fine {t_c2f:.2f} s "
              f"({100 * stats['fraction']:.1f} % of points decoded, coarse stride {stats['coarse_stride']})")
        f_dense, f_c2f = faces(dense), faces(c2f)
        print(f"  marching cubes faces: dense {f_dense}, coarse-to-fine {f_c2f}")
        if not args.skip_torch:
            t_torch, ref = timed(lambda: torch_ref.density_grid(field, r), 1)
            err = ((ref - dense).abs() / ref.abs().clamp_min(1e-6)).max().item()
            print(f"  torch dense {t_torch:.2f} s (max rel diff to native {err:.1e}); speed-up: native dense "
                  f"{t_torch / t_dense:.1f}x, coarse-to-fine {t_torch / t_c2f:.1f}x")


if __name__ == "__main__":
    main()
