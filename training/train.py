"""Train lrm-tiny from scratch with the LRM objective on the synthetic dataset (data_gen.py).

One input view (OpenLRM's canonical source camera) -> triplane -> OpenLRM's differentiable
importance renderer (lrm_rt.render.render_openlrm's arithmetic, batched over the objects of a step in
batched.py) on a random subset of rays of the input view
and of novel views -> MSE on RGB (white background) + MSE of rendered opacity vs ground-truth alpha
(+ with ``--depth-weight``, L1 of the rendered depth vs the ray caster's hit distance on the object's
pixels; with ``--occupancy-weight``, binary cross-entropy of the field's density against inside/outside labels
of points near the surface, with the marching-cubes level as the decision boundary).

    python training/train.py --minutes 118                       # fresh run (see the model card)
    python training/train.py --minutes 118 --resume              # continue from --ckpt
    python training/train.py --ckpt training/data/ckpt/b.pt ...  # a second run beside the first
    python training/train.py --resume --new-stage --minutes 100  # warm restart: a fresh schedule

One thread by default (``--threads``), so two runs can share a 2-core machine; ``--device cuda`` trains on
a GPU (data, rays and rendering on the device too). The LR schedule
(warmup, cosine) runs over ``--steps`` or ``--minutes``, whichever is further along; training stops at
either (both counted across resumes, from the start of the run or of the last ``--new-stage``) and
always saves a checkpoint.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from lrm_rt.field import torch_ref  # noqa: E402
from lrm_rt.field.spec import OPENLRM_FIELD, TriplaneField  # noqa: E402
from lrm_rt.models.network import LRMNetwork, default_source_camera  # noqa: E402
from batched import pixel_rays, query_batch, render_batch  # noqa: E402
from evaluate import require_input_size, require_split  # noqa: E402
from model_def import INFER, model_config  # noqa: E402

DATA = HERE / "data"
CKPT = DATA / "ckpt"


def load_split(names: str):
    """One split file, or several (comma-separated, e.g. two ``data_gen.py`` runs with different seeds)
    concatenated object-wise."""
    for n in names.split(","):
        require_split(n, DATA)
    parts = [np.load(DATA / f"{n}.npz") for n in names.split(",")]

    def merged(key):  # each array is read once (an npz file reads its member again on every access)
        arrays = [z[key] for z in parts]
        if key == "pixels":
            for n, a in zip(names.split(","), arrays):
                require_input_size(a, INFER["source_size"], n)
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    return {k: merged(k) for k in parts[0].files}


def differentiable_field(net: LRMNetwork, planes: torch.Tensor) -> TriplaneField:
    """Like ``net.triplane_field`` but keeping the graph to the planes and the decoder weights; planes may be
    one object's (3, C, H, W) or a batch's (B, 3, C, H, W) (a batched field, see ``batched.py``)."""
    layers = net.decoder_layers()
    return TriplaneField(planes, [l.weight for l in layers], [l.bias for l in layers], OPENLRM_FIELD)


def foreground_boxes(alpha: np.ndarray, margin: int = 2, chunk: int = 256) -> np.ndarray:
    """(N, V, 4) int32 half-open boxes [y0, y1) x [x0, x1): each view's foreground (alpha > 0) bounding box
    grown by ``margin`` pixels on every side and clipped to the image; all zero for an empty view."""
    n, v, res = alpha.shape[0], alpha.shape[1], alpha.shape[2]
    out = np.zeros((n, v, 4), np.int32)
    for s in range(0, n, chunk):  # the boolean mask of 13,200 objects x 10 views would be 540 MB at once
        fg = alpha[s:s + chunk] > 0
        for axis, col in ((3, 0), (2, 2)):  # rows (any over columns), then columns
            hit = fg.any(axis)
            first, last = hit.argmax(-1), res - 1 - hit[..., ::-1].argmax(-1)
            some = hit.any(-1)
            out[s:s + chunk, :, col] = np.where(some, np.maximum(first - margin, 0), 0)
            out[s:s + chunk, :, col + 1] = np.where(some, np.minimum(last + margin + 1, res), 0)
    return out


class DeviceData:
    """A training split as tensors on the training device (zero-copy views of the arrays on the CPU), plus
    each view's foreground box for ray sampling."""

    def __init__(self, data: dict, device: torch.device):
        def put(k):
            return torch.from_numpy(np.ascontiguousarray(data[k])).to(device) if k in data else None
        self.pixels, self.views, self.depths, self.cams = put("pixels"), put("views"), put("depths"), put("cams")
        self.occ_points, self.occ = put("occ_points"), put("occ")
        self.boxes = torch.from_numpy(foreground_boxes(data["views"][..., 3])).to(device)
        self.n_objects, self.n_views, self.res = self.views.shape[0], self.views.shape[1], self.views.shape[2]


def sample_pixels(boxes: torch.Tensor, res: int, n: int, gen: torch.Generator, fg_frac: float = 0.5) -> torch.Tensor:
    """(M, n) flat pixel indices (row * res + col) for M views with foreground boxes (M, 4): ``fg_frac`` of
    them inside the box (uniform over the image for an empty view), the rest uniform, so small objects still
    get most rays where the shape is decided."""
    m, dev = boxes.shape[0], boxes.device
    n_fg = int(n * fg_frac)
    uniform = torch.randint(0, res * res, (m, n), generator=gen, device=dev)
    if n_fg == 0:
        return uniform
    y0, y1, x0, x1 = (boxes[:, i, None] for i in range(4))
    u = torch.rand((m, n_fg, 2), generator=gen, device=dev)
    ys = y0 + (u[..., 0] * (y1 - y0)).long().clamp_max(y1 - y0 - 1)
    xs = x0 + (u[..., 1] * (x1 - x0)).long().clamp_max(x1 - x0 - 1)
    inside = torch.where(y1 > y0, ys * res + xs, uniform[:, :n_fg])
    return torch.cat([uniform[:, n_fg:], inside], 1)


def gather_pixels(images: torch.Tensor, pix: torch.Tensor) -> torch.Tensor:
    """Values (M, R, C) of flattened images (M, H*W, C) at flat pixel indices (M, R)."""
    return images.gather(1, pix[..., None].expand(-1, -1, images.shape[-1]))


def ray_losses(rgb: torch.Tensor, opacity: torch.Tensor, depth: torch.Tensor, px: torch.Tensor,
               gt_depth: Optional[torch.Tensor] = None):
    """Losses of B objects' renders at R rays each, rgb (B, R, 3), opacity and depth (B, R), against the ground
    truth px (B, R, 4) RGBA in [0, 1] and the ray caster's hit distances gt_depth (B, R): MSE of RGB on white,
    MSE of opacity vs alpha, and L1 of depth on the object's pixels only (elsewhere the ray caster has no depth;
    meaned per object, then over the batch; zero without gt_depth)."""
    a = px[..., 3]
    loss_rgb = F.mse_loss(rgb, px[..., :3] * a[..., None] + (1 - a[..., None]))
    loss_mask = F.mse_loss(opacity, a)
    if gt_depth is None:
        return loss_rgb, loss_mask, torch.zeros((), device=rgb.device)
    hit = (a > 0.5).float()
    err = (depth - gt_depth).abs() * hit
    return loss_rgb, loss_mask, (err.sum(1) / hit.sum(1).clamp_min(1)).mean()


def render_loss(net, batch_idx: torch.Tensor, data: DeviceData, args, gen: torch.Generator):
    """Mean losses over the batch: RGB MSE, opacity MSE, depth L1 (object pixels), occupancy BCE."""
    b, dev = len(batch_idx), batch_idx.device
    planes = net(data.pixels[batch_idx].float(), default_source_camera(2.0, b).to(dev))  # (B, 3, C, H, W)
    fld = differentiable_field(net, planes)
    # always the input view (reconstruction) + random novel views, per object
    others = torch.rand((b, data.n_views - 1), generator=gen, device=dev).argsort(1)[:, :args.views - 1] + 1
    views = torch.cat([torch.zeros_like(others[:, :1]), others], 1)  # (B, V)
    obj = batch_idx[:, None].expand_as(views)
    pix = sample_pixels(data.boxes[obj, views].reshape(-1, 4), data.res, args.rays, gen)  # (B*V, R)
    o, d = pixel_rays(data.cams[obj, views].reshape(-1, 25), pix, data.res)
    rgb, opacity, depth = render_batch(fld, o.reshape(b, -1, 3), d.reshape(b, -1, 3), args.samples // 2,
                                       args.samples // 2, generator=gen)

    def at_rays(images):  # (B, V, H, W, C) -> (B, V*R, C) at the sampled pixels
        c = images.shape[-1]
        return gather_pixels(images.reshape(b * args.views, -1, c), pix).reshape(b, -1, c)
    px = at_rays(data.views[obj, views]).float() / 255.0
    gt_depth = at_rays(data.depths[obj, views][..., None])[..., 0].float() if args.depth_weight > 0 else None
    loss_rgb, loss_mask, loss_depth = ray_losses(rgb, opacity, depth, px, gt_depth)
    loss_occ = torch.zeros((), device=dev)
    if args.occupancy_weight > 0:
        k = min(args.occupancy_points, data.occ.shape[1])
        sel = torch.rand((b, data.occ.shape[1]), generator=gen, device=dev).argsort(1)[:, :k]
        loss_occ = occupancy_loss(fld, data.occ_points[batch_idx], data.occ[batch_idx], sel, args)
    return loss_rgb, loss_mask, loss_depth, loss_occ


def occupancy_loss(fld: TriplaneField, points: torch.Tensor, inside: torch.Tensor, sel: torch.Tensor,
                   args) -> torch.Tensor:
    """BCE of (density - level) / temperature against the ground truth's inside/outside labels at the points
    ``sel`` (B, k) of each object: direct 3-D supervision of the surface marching cubes extracts (level = the
    shipped mesh threshold). Labels -1 (meshes that are not watertight) contribute nothing; the mean is over
    each object's known labels, then over the batch."""
    pts = points.gather(1, sel[..., None].expand(-1, -1, 3)).float()
    labels = inside.gather(1, sel)
    density = torch_ref.activate_density(query_batch(fld, pts)[..., 0], fld.spec)
    logits = (density - args.occupancy_level) / args.occupancy_temperature
    known = (labels >= 0).float()
    if args.occupancy_region == "far":  # only the half the source camera cannot see
        known = known * (pts[..., 1] > 0).float()
    bce = F.binary_cross_entropy_with_logits(logits, labels.clamp_min(0).float(), reduction="none") * known
    return (bce.sum(1) / known.sum(1).clamp_min(1)).mean()


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


def save(path: Path, net, opt, step, args, gen, minutes, origin, torch_gen=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = {"np_rng": gen.bit_generator.state, "torch_rng": torch.get_rng_state()}
    if torch_gen is not None:  # views, rays, jitter: a resumed run continues the same stream
        rng["torch_gen"], rng["torch_gen_device"] = torch_gen.get_state(), torch_gen.device.type
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step, "minutes": minutes, "origin": origin,
                "args": vars(args), **rng}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--stop-minutes", type=float, default=None,
                    help="stop once the stage has trained this long, the schedule still spanning --minutes "
                         "(stage 1 of the model card stopped at minute 115 of 128)")
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
    ap.add_argument("--occupancy-region", default="all", choices=["all", "far"],
                    help="far: labels only behind the object's centre plane (y > 0), the side the input hides")
    ap.add_argument("--init-weights", default=None,
                    help="start from a shipped model folder's model.safetensors (fresh optimiser state)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--new-stage", action="store_true",
                    help="with --resume: keep weights and optimiser state, restart warmup + cosine schedule "
                         "and the --steps / --minutes budget from here")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the network, renderer and data live")
    ap.add_argument("--attn-scale", type=float, default=1.5,
                    help="initial sharpness of the geometric cross-attention (0: random init, no geometry)")
    ap.add_argument("--ckpt", default=str(CKPT / "last.pt"), help="checkpoint file (written, and read by --resume)")
    ap.add_argument("--data", default="train", help="dataset split file(s) under training/data/, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: this torch sees no CUDA GPU")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt = Path(args.ckpt)
    if args.resume and not ckpt.is_file():  # it would quietly start from scratch under a later stage's settings
        sys.exit(f"--resume: no checkpoint at {ckpt}")
    if args.new_stage and not args.resume:
        sys.exit("--new-stage restarts the schedule of a resumed run: it needs --resume")
    if args.init_weights and not (Path(args.init_weights) / "model.safetensors").is_file():
        sys.exit(f"--init-weights: no model.safetensors in {args.init_weights}")
    torch.manual_seed(args.seed)

    data = load_split(args.data)
    if not 1 <= args.batch <= len(data["pixels"]):
        sys.exit(f"--batch {args.batch}: {args.data} holds {len(data['pixels'])} objects")
    if args.depth_weight > 0 and "depths" not in data:
        sys.exit(f"--depth-weight needs ray-hit depths, which {args.data} lacks: regenerate it with data_gen.py")
    if args.occupancy_weight > 0 and "occ" not in data:
        sys.exit(f"--occupancy-weight needs occupancy samples, which {args.data} lacks: regenerate it with data_gen.py")
    if not 1 <= args.views <= data["views"].shape[1]:
        sys.exit(f"--views {args.views}: {args.data} holds {data['views'].shape[1]} views per object")
    data = DeviceData(data, device)
    net = LRMNetwork(model_config()).train()
    init_from_scratch(net, args.attn_scale)  # overwritten by the checkpoint when resuming
    if args.init_weights:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(Path(args.init_weights) / "model.safetensors")))
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = np.random.default_rng(args.seed)
    step, prev_minutes, origin = 0, 0.0, (0, 0.0)  # origin: (step, minutes) where this stage began
    if args.resume:
        ck = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        prev_minutes = ck.get("minutes", 0.0)
        origin = (step, prev_minutes) if args.new_stage else tuple(ck.get("origin", (0, 0.0)))
        gen.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"].cpu())
        print(f"resumed at step {step}", flush=True)
    torch_gen = torch.Generator(device).manual_seed(args.seed + step)  # views, rays, jitter, occupancy points
    if args.resume and "torch_gen" in ck:  # checkpoints before 2026-11-28 lack it: reseeded as above
        if ck.get("torch_gen_device", "cpu") == device.type:
            torch_gen.set_state(ck["torch_gen"].cpu())
        else:  # a generator's state is device-specific (a GPU checkpoint resumed on the CPU)
            print(f"the checkpoint's random stream is a {ck.get('torch_gen_device')} one: reseeded", flush=True)
    # Ctrl-C / SIGTERM (a job's time limit) end the run at the next step, with a checkpoint; a second one goes to
    # the handler before (Ctrl-C: KeyboardInterrupt). Python handles signals in the main thread only.
    stop, previous = [], {}

    def on_signal(num, frame):
        stop.append(num)
        signal.signal(num, previous[num])
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start_step = step
        t_start = last_save = time.time()

        def minutes_done() -> float:  # across resumed runs
            return prev_minutes + (time.time() - t_start) / 60

        def stage_progress():  # (steps, minutes) since the stage's origin
            return step - origin[0], minutes_done() - origin[1]

        def lr_now() -> float:
            steps, minutes = stage_progress()
            return lr_at(steps, args, minutes)
        ema = None  # running means of the four losses, a device tensor (read every 25 steps: no GPU sync)
        end_minutes = args.minutes if args.stop_minutes is None else min(args.minutes, args.stop_minutes)
        while stage_progress()[0] < args.steps and stage_progress()[1] < end_minutes and not stop:
            for g in opt.param_groups:
                g["lr"] = lr_now()
            batch_idx = torch.from_numpy(gen.choice(data.n_objects, args.batch, replace=False)).to(device)
            l_rgb, l_mask, l_depth, l_occ = render_loss(net, batch_idx, data, args, torch_gen)
            loss = l_rgb + args.mask_weight * l_mask + args.depth_weight * l_depth + args.occupancy_weight * l_occ
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            cur = torch.stack([x.detach() for x in (l_rgb, l_mask, l_depth, l_occ)])
            ema = cur if ema is None else 0.98 * ema + 0.02 * cur
            if step % 25 == 0:
                avg = ema.tolist()
                el = time.time() - t_start
                print(f"step {step} rgb {avg[0]:.4f} mask {avg[1]:.4f} depth {avg[2]:.4f} occ {avg[3]:.4f} "
                      f"lr {lr_now():.2e} "
                      f"{el / 60:.1f} min ({el / (step - start_step):.2f} s/step)",
                      flush=True)
            if time.time() - last_save > args.save_every * 60:
                save(ckpt, net, opt, step, args, gen, minutes_done(), origin, torch_gen)
                last_save = time.time()
        save(ckpt, net, opt, step, args, gen, minutes_done(), origin, torch_gen)
        print(f"{'stopped by a signal' if stop else 'done'}: step {step}, {minutes_done():.1f} min of training, "
              f"saved to {ckpt}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
