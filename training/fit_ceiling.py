"""How good can lrm-tiny's representation be? Fit one free triplane per object to many views of it.

The network predicts a triplane from one image; the shared decoder, the renderer and marching cubes turn it
into views and a mesh. This script removes the prediction: for each object it starts from the network's
triplane and optimises the planes alone (decoder frozen) against ``--fit-views`` ray-cast views with the
training losses (RGB + mask + depth), then scores the mesh at the shipped level and the views it was *not*
fitted to, exactly as ``evaluate.py`` does. The gap between "predicted" and "fitted" is what better prediction
(more training) could gain; where "fitted" itself stays under the targets, the representation is the limit.

    python training/fit_ceiling.py --make-data        # 20 procedural shapes x 24 views (own seed, seconds)
    python training/fit_ceiling.py                    # fit and score (~1.5 min per object, one thread)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lrm_rt.field.spec import TriplaneField  # noqa: E402
from batched import pixel_rays, render_batch  # noqa: E402
from evaluate import (DATA, evaluate_object, load_model_or_exit, object_planes, require_input_size,  # noqa: E402
                      require_split)
from model_def import INFER  # noqa: E402
from train import ray_losses  # noqa: E402

SPLIT = "ceiling_shapes"


def make_data(n: int, views: int, seed: int, res: int = 64, input_render: int = 224) -> None:
    """Procedural shapes of the training distribution (own seed) with ``views`` views each and their
    ground-truth meshes, as the split ``ceiling_shapes``."""
    import data_gen

    args = argparse.Namespace(views=views, res=res, input_render=input_render, input_size=INFER["source_size"],
                              seed=seed, occupancy=0)
    rng = np.random.default_rng(seed)
    objects = [("shape", data_gen.procedural_object(rng)) for _ in range(n)]
    (DATA / "gt").mkdir(parents=True, exist_ok=True)
    data_gen.build_split(SPLIT, objects, args, rng, DATA / "gt")


def fit_planes(net, planes0: torch.Tensor, views: np.ndarray, depths: np.ndarray, cams: np.ndarray, args):
    """Planes (3, C, H, W) fitted to the given views, the decoder frozen."""
    planes = torch.nn.Parameter(planes0.clone())
    w, b = net.decoder_params()  # detached copies: only the planes learn
    opt = torch.optim.Adam([planes], lr=args.lr)
    res = views.shape[1]
    rgba = torch.from_numpy(views.reshape(len(views), -1, 4)).float() / 255.0
    dep = torch.from_numpy(depths.reshape(len(views), -1)).float()
    cams_t = torch.from_numpy(cams)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        for g in opt.param_groups:  # cosine decay
            g["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        v = torch.randint(0, len(views), (args.rays,), generator=gen)
        pix = torch.randint(0, res * res, (args.rays,), generator=gen)
        o, d = pixel_rays(cams_t[v], pix[:, None], res)
        fld = TriplaneField(planes[None], w, b, net.config.field_spec)  # a batch of one (batched.py)
        rgb, opacity, depth = render_batch(fld, o.reshape(1, -1, 3), d.reshape(1, -1, 3), 24, 24, generator=gen)
        loss_rgb, loss_mask, loss_depth = ray_losses(rgb, opacity, depth, rgba[v, pix][None], dep[v, pix][None])
        loss = loss_rgb + 1.5 * loss_mask + 2.0 * loss_depth  # stage 6's weights
        opt.zero_grad()
        loss.backward()
        opt.step()
    return planes.detach()


def score_object(model, z, i: int, args) -> dict:
    """Object i of the split z: {"predicted": metrics, "fitted": metrics} on the views after the first
    ``args.fit_views`` (the fitted planes never saw them), means over those views."""
    net = model.network
    planes0 = object_planes(net, z["pixels"][i])
    fit, held = slice(0, args.fit_views), slice(args.fit_views, None)
    planes = fit_planes(net, planes0, z["views"][i][fit], z["depths"][i][fit].astype(np.float32),
                        z["cams"][i][fit], args)
    row = {}
    for name, p in (("predicted", planes0), ("fitted", planes)):
        r = evaluate_object(model, net.triplane_field(p[None]), SPLIT, i, z["views"][i][held], z["cams"][i][held],
                            args.iou_points)
        row[name] = {k: float(np.mean(v)) for k, v in r.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-data", action="store_true")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--views", type=int, default=24)
    ap.add_argument("--fit-views", type=int, default=20, help="views fitted to; the rest are scored")
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--rays", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--iou-points", type=int, default=30000, help="points of the volume IoU (as evaluate.py)")
    ap.add_argument("--model", default="lrm-tiny")
    ap.add_argument("--out", default=str(DATA / "ceiling.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.make_data:
        make_data(args.n, args.views, args.seed)
        return
    require_split(SPLIT)  # made by --make-data
    z = dict(np.load(DATA / f"{SPLIT}.npz"))  # read once, not once per object
    if not 0 < args.fit_views < z["views"].shape[1]:
        sys.exit(f"--fit-views {args.fit_views}: {SPLIT} holds {z['views'].shape[1]} views, and some must stay "
                 "unfitted")
    model = load_model_or_exit(args.model)
    require_input_size(z["pixels"], model.config.input_size, SPLIT)
    rows = []
    for i in range(len(z["pixels"])):
        rows.append(score_object(model, z, i, args))
        print(i, "  ".join(f"{k}: F {r['fscore']:.3f} sil {r['silhouette_iou']:.3f}" for k, r in rows[-1].items()),
              flush=True)
    summary = {k: {m: float(np.mean([r[k][m] for r in rows])) for m in rows[0][k]} for k in rows[0]}
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps({"summary": summary, "objects": rows}, indent=1))


if __name__ == "__main__":
    main()
