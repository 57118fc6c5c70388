"""Device check for the TensorRT path (needs a CUDA GPU, TensorRT 10.x and CuPy; not run in CI).

For each fixture checkpoint: export with FP16 engines, run the engines and ONNX Runtime (fp32, CPU) on
the fixture's reference input, and compare the triplanes and the 64^3 meshes. Prints one line per model
and exits non-zero when a triplane is off by more than 2 % of its peak or the mesh Chamfer exceeds 1 % of
the bbox diagonal (the fp16 budget of tests/test_precision.py).

    python export/verify_tensorrt.py [--fixtures ../shared/fixtures] [--out /tmp/trt-check]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CKPTS = ["triposr-tiny", "openlrm-tiny-1.1", "openlrm-tiny-1.0"]


def _chamfer(a, b):
    from scipy.spatial import cKDTree

    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def main() -> int:
    import numpy as np

    from lrm_rt.checkpoint import load_model
    from lrm_rt.export import export_model
    from lrm_rt.pipeline import Reconstructor

    ap = argparse.ArgumentParser()
    default_fx = Path(os.environ.get("LRM_RT_SHARED", ROOT.parent / "shared")) / "fixtures"
    ap.add_argument("--fixtures", type=Path, default=default_fx)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="trt-check-"))
    ok = True
    for name in CKPTS:
        ckpt = args.fixtures / "checkpoints" / name
        d = out / name
        t0 = time.perf_counter()
        man = export_model(load_model(str(ckpt)), d, fp16=True, tensorrt=True, log=lambda m: None)
        build = time.perf_counter() - t0
        image = str(ckpt / "input.png")
        # The engines run on the GPU either way; device "cpu" brings the triplane back for the CPU field kernels.
        trt_rec = Reconstructor(str(d), network_backend="tensorrt", device="cpu")
        ort_rec = Reconstructor(str(d), network_backend="onnxruntime")
        pre = ort_rec.preprocess(image)
        a, ta = trt_rec.network.run(pre.pixel_values)
        a, ta = trt_rec.network.run(pre.pixel_values)  # second run: no lazy init in the timing
        b, _ = ort_rec.network.run(pre.pixel_values)
        a = a.float().cpu()
        rel = float((a - b).abs().max() / b.abs().max())
        ma = trt_rec.reconstruct(pre, mc_resolution=64).mesh
        mb = ort_rec.reconstruct(pre, mc_resolution=64).mesh
        diag = float(np.linalg.norm(mb.vertices.max(0) - mb.vertices.min(0)))
        ch = _chamfer(ma.vertices, mb.vertices) / diag
        good = rel < 0.02 and ch < 0.01
        ok &= good
        print(f"{name}: trt {man['tensorrt']['tensorrt_version']} on {man['tensorrt']['gpu_name']}  "
              f"triplane max err / peak {rel:.2e}  faces {ma.num_faces} vs {mb.num_faces}  chamfer/diag {ch:.2e}  "
              f"encoder {ta['encoder'] * 1e3:.2f} ms transformer {ta['transformer'] * 1e3:.2f} ms  "
              f"build {build:.0f} s  {'ok' if good else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
