"""Evaluate a trained lrm-tiny on the held-out splits (or any split with ground truth).

Geometry: the mesh extracted at the model's mesh_size / mesh_thres against the ground-truth parts
(lrm_rt.eval, both normalised by the ground truth's unit box, tau = 0.05). Images: the stored novel
views (every view but the input camera's) rendered by the runtime's OpenLRM renderer at the dataset
resolution against the ray-cast ground truth: PSNR, SSIM, silhouette IoU; the input view's PSNR and
silhouette IoU are reported apart.

    python training/evaluate.py                      # the shipped model, val_shapes + val_meshes
    python training/evaluate.py --model DIR --splits val_shapes
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lrm_rt import eval as E  # noqa: E402
from lrm_rt.checkpoint import load_model  # noqa: E402
from lrm_rt.mc import marching_cubes  # noqa: E402
from lrm_rt.mesh import grid_to_world  # noqa: E402
from lrm_rt.models.network import default_source_camera  # noqa: E402
from lrm_rt.pipeline import field_backend  # noqa: E402
from lrm_rt.render import OpenLRMRenderOptions, openlrm_rays, render_openlrm  # noqa: E402

DATA = HERE / "data"


def require_split(split: str, data: Path = DATA) -> None:
    if not (data / f"{split}.npz").is_file():
        sys.exit(f"no split {split!r}: {data / f'{split}.npz'} is missing (make it with training/data_gen.py)")


def require_input_size(pixels: np.ndarray, size: int, split: str) -> None:
    """One line, not a quietly wrong score: a split made for another input size still runs (the encoder resizes its
    position table to whatever grid the image gives)."""
    if pixels.shape[-1] != size:
        sys.exit(f"split {split!r} holds {pixels.shape[-1]} px input views, the model takes {size} px: make it again "
                 "with training/data_gen.py (its --input-size follows the model's source_size)")


def load_model_or_exit(name: str):
    from lrm_rt.errors import LrmError

    try:
        return load_model(name)
    except LrmError as e:
        sys.exit(f"--model {name}: {e}")


def load_gt(split: str, i: int):
    z = np.load(DATA / "gt" / f"{split}_{i:04d}.npz")
    n = len([k for k in z.files if k.startswith("v")])
    return [(z[f"v{j}"].astype(np.float64), z[f"f{j}"].astype(np.int64)) for j in range(n)]


def object_planes(net, pixels: np.ndarray) -> torch.Tensor:
    """The triplane (3, C, H, W) the network predicts from one object's input pixels (3, S, S)."""
    with torch.no_grad():
        return net(torch.from_numpy(pixels.astype(np.float32))[None], default_source_camera(2.0))[0]


def object_fields(net, pixels: np.ndarray):
    return net.triplane_field(object_planes(net, pixels))


def meshes_at(fld, backend, resolution: int, thresholds):
    grid = backend.density_grid(fld, resolution)
    out = {}
    for t in thresholds:
        v, f = marching_cubes(grid, float(t))
        out[t] = (grid_to_world(np.asarray(v, np.float64), resolution, 1.0).astype(np.float64),
                  np.asarray(f, np.int64))
    return out


def render_views(fld, cams: np.ndarray, res: int, samples: int):
    opts = OpenLRMRenderOptions(n_coarse=samples // 2, n_fine=samples // 2)
    outs = []
    with torch.no_grad():
        for c in cams:
            o, d = openlrm_rays(torch.from_numpy(c), res)
            r = render_openlrm(fld, o, d, options=opts)
            outs.append((r.rgb.clamp(0, 1).numpy(), r.weight.numpy()))
    return outs


def evaluate_object(model, fld, split: str, i: int, views: np.ndarray, cams: np.ndarray,
                    iou_points: int = 30000) -> dict:
    """Object i of split, predicted as field fld: its mesh at the model's level against the ground truth
    (chamfer, fscore, volume_iou, faces) and per-view lists (psnr, ssim, silhouette_iou) of views (V, H, W, 4)
    uint8 seen from cams (V, 25) against renders of fld."""
    cfg = model.config
    pred = meshes_at(fld, field_backend("auto"), cfg.mc_resolution, [cfg.mc_threshold])[cfg.mc_threshold]
    m = E.mesh_metrics(pred, load_gt(split, i), tau=0.05, iou_points=iou_points)
    out = {"chamfer": m.chamfer, "fscore": m.fscore, "volume_iou": m.volume_iou, "faces": int(len(pred[1])),
           "psnr": [], "ssim": [], "silhouette_iou": []}
    views = views.astype(np.float64) / 255.0
    for v, (rgb, w) in enumerate(render_views(fld, cams, views.shape[1], cfg.samples_per_ray)):
        a = views[v, ..., 3]
        gt_rgb = views[v, ..., :3] * a[..., None] + (1 - a[..., None])
        for k, val in E.image_metrics(rgb, gt_rgb, w, a).items():
            out[k].append(val)
    return out


def evaluate_split(model, split: str, limit=None, iou_points: int = 30000):
    net = model.network
    z = dict(np.load(DATA / f"{split}.npz"))  # in memory: an npz file reads its member again on every access
    require_input_size(z["pixels"], model.config.input_size, split)
    rows = []
    n = len(z["pixels"]) if limit is None else min(limit, len(z["pixels"]))
    for i in range(n):
        r = evaluate_object(model, object_fields(net, z["pixels"][i]), split, i, z["views"][i], z["cams"][i],
                            iou_points)
        # view 0 is the input camera; the image metrics are over the novel views only
        rows.append({"label": str(z["labels"][i]), "chamfer": r["chamfer"], "fscore": r["fscore"],
                     "volume_iou": r["volume_iou"], "psnr": float(np.mean(r["psnr"][1:])),
                     "ssim": float(np.mean(r["ssim"][1:])),
                     "silhouette_iou": float(np.mean(r["silhouette_iou"][1:])),
                     "psnr_input_view": r["psnr"][0], "silhouette_iou_input_view": r["silhouette_iou"][0],
                     "faces": r["faces"]})
    keys = ["chamfer", "fscore", "volume_iou", "psnr", "ssim", "silhouette_iou", "psnr_input_view",
            "silhouette_iou_input_view"]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary["n"] = len(rows)
    return summary, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lrm-tiny")
    ap.add_argument("--splits", default="val_shapes,val_meshes")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=str(DATA / "eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for split in args.splits.split(","):
        require_split(split)
    model = load_model_or_exit(args.model)
    result = {}
    for split in args.splits.split(","):
        t0 = time.time()
        summary, rows = evaluate_split(model, split, args.limit)
        result[split] = {"summary": summary, "objects": rows}
        print(f"{split} ({summary['n']} objects, {time.time() - t0:.0f} s): "
              + "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k != "n"), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
