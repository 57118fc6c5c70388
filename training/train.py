"""Train lrm-tiny from scratch with the LRM objective on the synthetic dataset (data_gen.py).

One input view (OpenLRM's canonical source camera) -> triplane -> OpenLRM's differentiable
importance renderer (lrm_rt.render.render_openlrm) on a random subset of rays of the input view
and of novel views -> MSE on RGB (white background) + MSE of rendered opacity vs ground-truth alpha
(+ with ``--depth-weight``, L1 of the rendered depth vs the ray caster's hit distance on the object's
pixels; with ``--occupancy-weight``, binary cross-entropy of the field's density against inside/outside labels
of points near the surface, with the marching-cubes level as the decision boundary).

    python training/train.py --minutes 118                       # fresh run (see the model card)
    python training/train.py --minutes 118 --resume              # continue from --ckpt
    python training/train.py --ckpt training/data/ckpt/b.pt ...  # a second run beside the first
    python training/train.py --resume --new-stage --minutes 100  # warm restart: a fresh schedule

One thread by default (``--threads``), so two runs can share a 2-core machine. The LR schedule
(warmup, cosine) runs over ``--steps`` or ``--minutes``, whichever is further along; training stops at
either (both counted across resumes, from the start of the run or of the last ``--new-stage``) and
always saves a checkpoint.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lrm_rt.field import torch_ref  # noqa: E402
from lrm_rt.field.spec import OPENLRM_FIELD, TriplaneField  # noqa: E402
from lrm_rt.models.network import LRMNetwork, default_source_camera  # noqa: E402
from lrm_rt.render import OpenLRMRenderOptions, openlrm_rays, render_openlrm  # noqa: E402
from model_def import model_config  # noqa: E402

DATA = HERE / "data"
CKPT = DATA / "ckpt"


def load_split(names: str):
    """One split file, or several (comma-separated, e.g. two ``data_gen.py`` runs with different seeds)
    concatenated object-wise."""
    parts = [np.load(DATA / f"{n}.npz") for n in names.split(",")]
    return {k: np.concatenate([z[k] for z in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0].files}


def differentiable_field(net: LRMNetwork, planes: torch.Tensor) -> TriplaneField:
    """Like ``net.triplane_field`` but keeping the graph to the planes and the decoder weights."""
    layers = net.decoder_layers()
    return TriplaneField(planes, [l.weight for l in layers], [l.bias for l in layers], OPENLRM_FIELD)


class RayCache:
    """Per-camera ray bundles (openlrm_rays takes a few ms and the same cameras recur every epoch), at most
    ``max_views`` of them, least recently used dropped first: every view of 13,200 objects would be 13 GB."""

    def __init__(self, cams: np.ndarray, res: int, max_views: int = 16384):
        self.cams, self.res, self.max_views, self.cache = cams, res, max_views, OrderedDict()

    def get(self, obj: int, view: int):
        key = (obj, view)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        o, d = openlrm_rays(torch.from_numpy(self.cams[obj, view]), self.res)
        self.cache[key] = (o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous())
        if len(self.cache) > self.max_views:
            self.cache.popitem(last=False)
        return self.cache[key]


def sample_rays(alpha: np.ndarray, n: int, gen: np.random.Generator, fg_frac: float = 0.5) -> np.ndarray:
    """Pixel indices: ``fg_frac`` from the object's (slightly grown) bounding box, the rest uniform,
    so small objects still get most rays where the shape is decided."""
    res = alpha.shape[0]
    ys, xs = np.nonzero(alpha > 0)
    n_fg = int(n * fg_frac) if len(ys) else 0
    idx = gen.integers(0, res * res, n - n_fg)
    if n_fg:
        y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, res)
        x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, res)
        idx = np.concatenate([idx, gen.integers(y0, y1, n_fg) * res + gen.integers(x0, x1, n_fg)])
    return idx


def render_loss(net, batch_idx, data, rays, args, gen, torch_gen):
    pixels = torch.from_numpy(data["pixels"][batch_idx].astype(np.float32))
    cam = default_source_camera(2.0, len(batch_idx))
    planes = net(pixels, cam)  # (B, 3, C, H, W)
    fld_opts = OpenLRMRenderOptions(n_coarse=args.samples // 2, n_fine=args.samples // 2, generator=torch_gen,
                                    chunk_rays=1 << 20)
    loss_rgb, loss_mask, loss_depth, loss_occ = 0.0, 0.0, torch.zeros(()), torch.zeros(())
    use_depth = args.depth_weight > 0
    n_views = data["views"].shape[1]
    for b, obj in enumerate(batch_idx):
        # always the input view (reconstruction) + random novel views
        views = [0] + list(gen.choice(np.arange(1, n_views), args.views - 1, replace=False))
        os_, ds_, rgb_gt, a_gt, t_gt = [], [], [], [], []
        for v in views:
            img = data["views"][obj, v]
            sel = sample_rays(img[..., 3], args.rays, gen)
            o, d = rays.get(obj, v)
            os_.append(o[sel])
            ds_.append(d[sel])
            px = img.reshape(-1, 4)[sel].astype(np.float32) / 255.0
            a = px[:, 3:]
            rgb_gt.append(px[:, :3] * a + (1 - a))  # ground truth on the renderer's white background
            a_gt.append(a[:, 0])
            if use_depth:
                t_gt.append(data["depths"][obj, v].reshape(-1)[sel].astype(np.float32))
        fld = differentiable_field(net, planes[b])
        out = render_openlrm(fld, torch.cat(os_), torch.cat(ds_), options=fld_opts)
        if args.occupancy_weight > 0:
            loss_occ = loss_occ + occupancy_loss(fld, data["occ_points"][obj], data["occ"][obj], args, gen)
        loss_rgb = loss_rgb + F.mse_loss(out.rgb, torch.from_numpy(np.concatenate(rgb_gt)))
        a_gt = torch.from_numpy(np.concatenate(a_gt))
        loss_mask = loss_mask + F.mse_loss(out.weight, a_gt)
        if use_depth:  # on the object's pixels only: elsewhere the ray caster has no depth
            hit = a_gt > 0.5
            if hit.any():
                loss_depth = loss_depth + F.l1_loss(out.depth[hit], torch.from_numpy(np.concatenate(t_gt))[hit])
    n = len(batch_idx)
    return loss_rgb / n, loss_mask / n, loss_depth / n, loss_occ / n


def occupancy_loss(fld: TriplaneField, points: np.ndarray, inside: np.ndarray, args, gen) -> torch.Tensor:
    """BCE of (density - level) / temperature against the ground truth's inside/outside labels: direct 3-D
    supervision of the surface marching cubes extracts (level = the shipped mesh threshold). Objects whose
    labels are unknown (-1: meshes that are not watertight) contribute nothing."""
    known = np.nonzero(inside >= 0)[0]
    if len(known) == 0:
        return torch.zeros(())
    sel = gen.choice(known, min(args.occupancy_points, len(known)), replace=False)
    density, _ = torch_ref.query(fld, torch.from_numpy(points[sel].astype(np.float32)))
    logits = (density - args.occupancy_level) / args.occupancy_temperature
    return F.binary_cross_entropy_with_logits(logits, torch.from_numpy(inside[sel].astype(np.float32)))


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position code (rows, then columns)."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    freqs = 1.0 / (100.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    parts = [f(c.reshape(-1, 1) * freqs) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


def _axis_code(c: torch.Tensor, n_freq: int) -> torch.Tensor:
    """(N,) patch coordinates -> (N, 2 n_freq) sin/cos code whose dot product peaks at equal coordinates
    and falls off within about one patch (frequencies 0.25..1.6 rad per patch)."""
    f = torch.exp(torch.linspace(math.log(0.25), math.log(1.6), n_freq))
    a = c.reshape(-1, 1) * f
    return torch.cat([a.sin(), a.cos()], 1)


def _geometric_cross_attention(net: LRMNetwork, grid: int, attn_scale: float, code_dims: int) -> None:
    enc, cfg = net.encoder.model, net.config
    d_tok, d_enc = net.pos_embed.shape[-1], enc.pos_embed.shape[-1]  # triplane / image token widths
    assert code_dims == d_tok // cfg.transformer_heads and code_dims % 4 == 0, "the code fills one attention head"
    nf, low = code_dims // 4, cfg.triplane_low_res
    # image side: patch (row, col) -> [code(row), code(col)] in the first channels, generic sin-cos after
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    enc.pos_embed.zero_()
    enc.pos_embed[0, 1:, :code_dims] = torch.cat([_axis_code(rows, nf), _axis_code(cols, nf)], 1)
    enc.pos_embed[0, 1:, code_dims:] = sincos_2d(grid, d_enc - code_dims)
    # triplane side: cell centres of each plane; a world axis the source view does not see (depth y)
    # gets a zero code, so that token matches the whole image row/column.
    centre = -1 + (2 * torch.arange(low, dtype=torch.float32) + 1) / low
    v, u = torch.meshgrid(centre, centre, indexing="ij")  # plane row (v axis), column (u axis)
    # Seen from the source camera (0, -2, 0), f = 0.75, at depth 2: image column = 0.5 + 0.375 x and
    # row = 0.5 - 0.375 z, here in patch units.
    col_of_x = _axis_code(grid * (0.5 + 0.375 * u) - 0.5, nf)  # planes 0 and 1 have x along u
    row_of_z_v = _axis_code(grid * (0.5 - 0.375 * v) - 0.5, nf)  # plane 1 has z along v
    row_of_z_u = _axis_code(grid * (0.5 - 0.375 * u) - 0.5, nf)  # plane 2 has z along u
    zero = torch.zeros_like(col_of_x)
    net.pos_embed[0, :, :code_dims] = torch.cat([  # OpenLRM planes: (u, v) = (x, y), (x, z), (z, y)
        torch.cat([zero, col_of_x], 1), torch.cat([row_of_z_v, col_of_x], 1), torch.cat([row_of_z_u, zero], 1)])
    for layer in net.transformer.layers:
        attn = layer.cross_attn
        if attn.in_proj_weight is not None:  # packed q/k/v (image and triplane tokens equally wide)
            w_q, w_k = attn.in_proj_weight[:d_tok], attn.in_proj_weight[d_tok:2 * d_tok]
        else:
            w_q, w_k = attn.q_proj_weight, attn.k_proj_weight
        w_q[:code_dims].zero_()
        w_k[:code_dims].zero_()
        w_q[:code_dims, :code_dims] = attn_scale * torch.eye(code_dims)
        w_k[:code_dims, :code_dims] = attn_scale * torch.eye(code_dims)
        for norm in (layer.norm1, layer.norm2, layer.norm3):  # start with an unmodulated LayerNorm
            norm.mlp[-1].weight.zero_()
            norm.mlp[-1].bias.zero_()
    for blk in enc.blocks:  # near-identity encoder at the start, so the position code reaches its output
        blk.ls1.gamma.fill_(0.1)
        blk.ls2.gamma.fill_(0.1)


def init_from_scratch(net: LRMNetwork, attn_scale: float = 1.5, code_dims: int = 48) -> None:
    """Initialise what the published modules leave at zero (they expect loaded weights), and start the
    cross-attention looking where the geometry says.

    With zero position embeddings the encoder sees a bag of patches and all triplane query tokens are
    identical, so training collapses to one mean shape for every input. Random position embeddings fix
    the collapse, but learning *which* image patch each triplane token should read is then most of a
    short CPU training run (observed: a 24-minute run plateaued at an input-independent blob).

    So the first ``code_dims`` channels of both streams carry one shared position code, and head 0 of
    every cross-attention layer compares exactly those channels: a token of the x-z plane (the one facing
    the source camera) starts attending to the patch its cell projects to, a token of the x-y plane to
    the image column of its x, a token of the z-y plane to the image row of its z (depth is what the
    network has to learn). Everything stays trainable; only the starting point changes.
    """
    enc = net.encoder.model
    d_tok, d_enc = net.pos_embed.shape[-1], enc.pos_embed.shape[-1]
    grid = int(round((enc.pos_embed.shape[1] - 1) ** 0.5))
    with torch.no_grad():
        net.pos_embed.normal_(0.0, d_tok ** -0.5)
        enc.pos_embed[0, 1:] = sincos_2d(grid, d_enc)
        if attn_scale > 0:
            _geometric_cross_attention(net, grid, attn_scale, code_dims)
        # The encoder takes raw [0, 1] pixels on white (v1.1 convention): bias the patch embedding so a
        # white patch embeds to ~0 and object patches stand out (a fixed normalisation folded into the
        # init), and double the weights so content is as strong as the position code.
        w = enc.patch_embed.proj.weight
        w.mul_(2.0)
        enc.patch_embed.proj.bias.copy_(-w.sum(dim=(1, 2, 3)))
        enc.cls_token.normal_(0.0, 1e-6)
        if enc.register_tokens is not None:
            enc.register_tokens.normal_(0.0, 1e-6)


def lr_at(step: int, args, minutes: float = 0.0) -> float:
    """Warmup then cosine; progress is by steps or by time, whichever is further along, so the LR
    still anneals when a busy shared machine makes steps slower than planned."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = min(1.0, max((step - args.warmup) / max(1, args.steps - args.warmup), minutes / args.minutes))
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def save(path: Path, net, opt, step, args, gen, minutes, origin):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step, "minutes": minutes, "origin": origin,
                "args": vars(args), "np_rng": gen.bit_generator.state, "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--views", type=int, default=3, help="views per object per step (input view included)")
    ap.add_argument("--rays", type=int, default=256, help="rays per view")
    ap.add_argument("--samples", type=int, default=48, help="coarse + fine samples per ray")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--mask-weight", type=float, default=1.0)
    ap.add_argument("--depth-weight", type=float, default=0.0,
                    help="weight of the depth L1 loss (needs a split with depths; 0: RGB + mask only)")
    ap.add_argument("--occupancy-weight", type=float, default=0.0,
                    help="weight of the occupancy BCE (needs a split with occ_points / occ; 0: off)")
    ap.add_argument("--occupancy-points", type=int, default=1024, help="labelled points per object per step")
    ap.add_argument("--occupancy-level", type=float, default=7.0,
                    help="density at the decision boundary (the marching-cubes level the model ships with)")
    ap.add_argument("--occupancy-temperature", type=float, default=2.0, help="density units per logit")
    ap.add_argument("--init-weights", default=None,
                    help="start from a shipped model folder's model.safetensors (fresh optimiser state)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--new-stage", action="store_true",
                    help="with --resume: keep weights and optimiser state, restart warmup + cosine schedule "
                         "and the --steps / --minutes budget from here")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attn-scale", type=float, default=1.5,
                    help="initial sharpness of the geometric cross-attention (0: random init, no geometry)")
    ap.add_argument("--ckpt", default=str(CKPT / "last.pt"), help="checkpoint file (written, and read by --resume)")
    ap.add_argument("--data", default="train", help="dataset split file(s) under training/data/, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt)
    torch.manual_seed(args.seed)

    data = load_split(args.data)
    if args.depth_weight > 0 and "depths" not in data:
        sys.exit(f"--depth-weight needs ray-hit depths, which {args.data} lacks: regenerate it with data_gen.py")
    if args.occupancy_weight > 0 and "occ" not in data:
        sys.exit(f"--occupancy-weight needs occupancy samples, which {args.data} lacks: regenerate it with data_gen.py")
    rays = RayCache(data["cams"], data["views"].shape[2])
    net = LRMNetwork(model_config()).train()
    init_from_scratch(net, args.attn_scale)  # overwritten by the checkpoint when resuming
    if args.init_weights:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(Path(args.init_weights) / "model.safetensors")))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = np.random.default_rng(args.seed)
    step, prev_minutes, origin = 0, 0.0, (0, 0.0)  # origin: (step, minutes) where this stage began
    if args.resume and ckpt.is_file():
        ck = torch.load(ckpt, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        prev_minutes = ck.get("minutes", 0.0)
        origin = (step, prev_minutes) if args.new_stage else tuple(ck.get("origin", (0, 0.0)))
        gen.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    torch_gen = torch.Generator().manual_seed(args.seed + step)

    n_obj = len(data["pixels"])
    start_step = step
    t_start = last_save = time.time()

    def minutes_done() -> float:  # across resumed runs
        return prev_minutes + (time.time() - t_start) / 60

    def stage_progress():  # (steps, minutes) since the stage's origin
        return step - origin[0], minutes_done() - origin[1]

    def lr_now() -> float:
        steps, minutes = stage_progress()
        return lr_at(steps, args, minutes)
    ema = None
    while stage_progress()[0] < args.steps and stage_progress()[1] < args.minutes:
        for g in opt.param_groups:
            g["lr"] = lr_now()
        batch_idx = gen.choice(n_obj, args.batch, replace=False)
        l_rgb, l_mask, l_depth, l_occ = render_loss(net, batch_idx, data, rays, args, gen, torch_gen)
        loss = l_rgb + args.mask_weight * l_mask + args.depth_weight * l_depth + args.occupancy_weight * l_occ
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        cur = np.array([float(x.detach()) for x in (l_rgb, l_mask, l_depth, l_occ)])
        ema = cur if ema is None else 0.98 * ema + 0.02 * cur
        if step % 25 == 0:
            el = time.time() - t_start
            print(f"step {step} rgb {ema[0]:.4f} mask {ema[1]:.4f} depth {ema[2]:.4f} occ {ema[3]:.4f} "
                  f"lr {lr_now():.2e} "
                  f"{el / 60:.1f} min ({el / (step - start_step):.2f} s/step)",
                  flush=True)
        if time.time() - last_save > args.save_every * 60:
            save(ckpt, net, opt, step, args, gen, minutes_done(), origin)
            last_save = time.time()
    save(ckpt, net, opt, step, args, gen, minutes_done(), origin)
    print(f"done: step {step}, {minutes_done():.1f} min of training", flush=True)


if __name__ == "__main__":
    main()
