"""The lrm-tiny training recipe (training/train.py): the geometric start and a resumable loop."""
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import batched as B  # noqa: E402
import train as T  # noqa: E402
from model_def import INFER, model_config  # noqa: E402

SIZE = INFER["source_size"]  # the model's input size

from lrm_rt.models.network import LRMNetwork, default_source_camera  # noqa: E402
from lrm_rt.render import source_view_camera  # noqa: E402


def _head0_attention(net: LRMNetwork, pixels: torch.Tensor) -> torch.Tensor:
    """Layer-0 cross-attention weights of head 0 over the image patches: (B, tokens, patches)."""
    with torch.no_grad():
        cond = net.encode(pixels)
        mod = net.camera_embedder(default_source_camera(2.0, len(pixels)))
        layer = net.transformer.layers[0]
        h = layer.norm1(net.pos_embed.expand(len(pixels), -1, -1), mod)
        d = h.shape[-1]
        hd = d // net.config.transformer_heads
        w = layer.cross_attn.in_proj_weight
        q, k = h @ w[:hd].T, cond @ w[d:d + hd].T
        return torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5, -1)[:, :, 1:]  # drop the CLS token


def _xz_targets(low: int, grid: int) -> torch.Tensor:
    """Patch index each x-z plane cell projects to from the source camera."""
    c = -1 + (2 * torch.arange(low, dtype=torch.float32) + 1) / low
    z, x = torch.meshgrid(c, c, indexing="ij")
    col = (grid * (0.5 + 0.375 * x) - 0.5).round().clamp(0, grid - 1)
    row = (grid * (0.5 - 0.375 * z) - 0.5).round().clamp(0, grid - 1)
    return (row * grid + col).reshape(-1).long(), row.reshape(-1), col.reshape(-1)


@pytest.mark.parametrize("scale", [1.5, 0.0])
def test_geometric_start_points_cross_attention_at_the_projected_patch(scale):
    torch.manual_seed(0)
    net = LRMNetwork(model_config())
    T.init_from_scratch(net, attn_scale=scale)
    pixels = torch.rand(2, 3, SIZE, SIZE)
    att = _head0_attention(net, pixels)
    low, grid = net.config.triplane_low_res, 8
    xz = att[:, low * low:2 * low * low]  # plane 1 = (x, z), the one facing the source camera
    tgt, row, col = _xz_targets(low, grid)
    best = xz.argmax(-1)
    off = torch.maximum((best // grid - row).abs(), (best % grid - col).abs())
    if scale > 0:
        assert xz.max(-1).values.mean() > 0.5  # concentrated ...
        assert (off <= 1).float().mean() > 0.95  # ... on the patch the cell projects to (rounding aside)
        # x-y plane cells read the whole image column of their x
        xy = att[:, :low * low].reshape(2, low * low, grid, grid).sum(2)
        assert xy.gather(2, col.long().reshape(1, -1, 1).expand(2, -1, 1)).mean() > 0.6
    else:  # the plain start: no geometry, near-uniform attention
        assert xz.max(-1).values.mean() < 0.1


def _tiny_dataset(path: Path, n_obj=3, views=3, res=8, occupancy=False, size=SIZE):
    rng = np.random.default_rng(0)
    cams = np.broadcast_to(source_view_camera().numpy(), (n_obj, views, 25))
    vw = rng.integers(0, 255, (n_obj, views, res, res, 4), dtype=np.uint8)
    depths = np.where(vw[..., 3] > 127, rng.uniform(1.2, 2.8, vw.shape[:-1]), 0.0).astype(np.float16)
    extra = {}
    if occupancy:  # a ball of radius 0.5; the last object's labels are unknown (a mesh that is not watertight)
        pts = rng.uniform(-1, 1, (n_obj, 64, 3))
        occ = (np.linalg.norm(pts, axis=-1) < 0.5).astype(np.int8)
        occ[-1] = -1
        extra = {"occ_points": pts.astype(np.float16), "occ": occ}
    np.savez(path, pixels=rng.random((n_obj, 3, size, size)).astype(np.float16), views=vw, depths=depths,
             cams=cams.astype(np.float32), labels=np.array(["shape"] * n_obj), **extra)


def test_training_loop_runs_saves_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    ckpt = tmp_path / "ck.pt"
    args = ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16", "--samples", "8",
            "--ckpt", str(ckpt), "--warmup", "1"]
    monkeypatch.setattr(sys, "argv", args + ["--steps", "2"])
    T.main()
    first = torch.load(ckpt, weights_only=False)
    assert first["step"] == 2
    assert all(torch.isfinite(v).all() for v in first["model"].values())
    monkeypatch.setattr(sys, "argv", args + ["--steps", "3", "--resume"])
    T.main()
    second = torch.load(ckpt, weights_only=False)
    assert second["step"] == 3
    changed = [k for k in first["model"] if not torch.equal(first["model"][k], second["model"][k])]
    assert changed  # the resumed step trained the restored weights
    monkeypatch.setattr(sys, "argv", args + ["--views", "4"])  # the split holds 3 views per object
    with pytest.raises(SystemExit, match="holds 3 views"):
        T.main()


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Weights, AdamW state, step and every random stream (batches, views, rays, jitter) are restored: 2 + 2
    steps give bit for bit what 4 steps give."""
    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    base = ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16", "--samples", "8",
            "--warmup", "1", "--minutes", "1000"]
    monkeypatch.setattr(sys, "argv", base + ["--ckpt", str(tmp_path / "a.pt"), "--steps", "4"])
    T.main()
    for steps in ("2", "4"):
        monkeypatch.setattr(sys, "argv", base + ["--ckpt", str(tmp_path / "b.pt"), "--steps", steps]
                            + (["--resume"] if steps == "4" else []))
        T.main()
    a, b = (torch.load(tmp_path / n, weights_only=False) for n in ("a.pt", "b.pt"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("extra, message", [
    (["--resume", "--ckpt", "{tmp}/none.pt"], "--resume: no checkpoint at"),
    (["--new-stage"], "--new-stage restarts the schedule of a resumed run"),
    (["--init-weights", "{tmp}/nowhere"], "--init-weights: no model.safetensors"),
    (["--batch", "50"], "--batch 50: mini holds 3 objects"),
    (["--data", "mini,nope"], "no split 'nope'"),
])
def test_bad_training_options_stop_with_one_line(tmp_path, monkeypatch, extra, message):
    """A wrong --ckpt with --resume quietly started from scratch under a later stage's settings; the others gave
    tracebacks or were ignored."""
    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    args = ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16", "--samples", "8",
            "--steps", "1", "--ckpt", str(tmp_path / "ck.pt")] + [e.replace("{tmp}", str(tmp_path)) for e in extra]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit, match=re.escape(message)):
        T.main()
    assert not (tmp_path / "ck.pt").exists() and not (tmp_path / "none.pt").exists()


def test_a_signal_stops_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (a job's time limit) ends the run at the next step boundary and saves it (the run lost
    everything since its last periodic save, or all of its first 5 minutes)."""
    import signal

    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    real_loss = T.render_loss
    calls = []

    def loss_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_loss(*a, **k)
    monkeypatch.setattr(T, "render_loss", loss_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16",
                                      "--samples", "8", "--steps", "100", "--ckpt", str(tmp_path / "ck.pt")])
    T.main()
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["step"] == 2 and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are put back


def test_signal_handling_is_scoped_to_the_run(tmp_path, monkeypatch, capsys):
    """The handlers are put back when a run fails (Ctrl-C would otherwise be swallowed for the rest of the
    process), a run in another thread installs none (Python refuses there), and a checkpoint whose random stream
    is another device's is reseeded, not fed to this device's generator (a GPU checkpoint resumed on the CPU)."""
    import signal
    import threading

    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    args = ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16", "--samples", "8",
            "--ckpt", str(tmp_path / "ck.pt")]
    before = signal.getsignal(signal.SIGINT)
    real_loss = T.render_loss

    def failing(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(T, "render_loss", failing)
    monkeypatch.setattr(sys, "argv", args + ["--steps", "2"])
    with pytest.raises(RuntimeError, match="boom"):
        T.main()
    assert signal.getsignal(signal.SIGINT) == before
    monkeypatch.setattr(T, "render_loss", real_loss)
    errors = []
    thread = threading.Thread(target=_run_catching, args=(T.main, errors))
    thread.start()
    thread.join()
    assert errors == [] and torch.load(tmp_path / "ck.pt", weights_only=False)["step"] == 2
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    ck["torch_gen"], ck["torch_gen_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"  # a CUDA generator's
    torch.save(ck, tmp_path / "ck.pt")
    monkeypatch.setattr(sys, "argv", args + ["--steps", "3", "--resume"])
    T.main()
    assert "random stream is a cuda one: reseeded" in capsys.readouterr().out
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["step"] == 3


def _run_catching(fn, errors):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 (reported to the main thread)
        errors.append(e)


def test_several_split_files_are_concatenated_object_wise(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "a.npz", n_obj=3)
    _tiny_dataset(tmp_path / "b.npz", n_obj=2)
    a, both = T.load_split("a"), T.load_split("a,b")
    assert set(both) == set(a)
    assert all(len(both[k]) == 5 for k in both)
    np.testing.assert_array_equal(both["views"][:3], a["views"])
    np.testing.assert_array_equal(both["views"][3:], T.load_split("b")["views"])


def test_depth_loss_reaches_the_network_and_a_new_stage_restarts_the_schedule(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    data = T.load_split("mini")
    net = LRMNetwork(model_config()).train()
    T.init_from_scratch(net)
    args = SimpleNamespace(samples=8, views=2, rays=32, depth_weight=1.0, occupancy_weight=0.0)
    _, _, l_depth, _ = T.render_loss(net, torch.tensor([0, 1]), T.DeviceData(data, torch.device("cpu")), args,
                                     torch.Generator().manual_seed(0))
    assert float(l_depth.detach()) > 0
    l_depth.backward()
    assert float(net.decoder_layers()[0].weight.grad.abs().sum()) > 0  # depth depends on the density

    ckpt = tmp_path / "ck.pt"
    common = ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16", "--samples", "8",
              "--ckpt", str(ckpt), "--warmup", "1", "--depth-weight", "0.5"]
    monkeypatch.setattr(sys, "argv", common + ["--steps", "2"])
    T.main()
    assert torch.load(ckpt, weights_only=False)["origin"] == (0, 0.0)
    # a plain resume with --steps 2 has nothing left to do; a new stage gets 2 more steps
    monkeypatch.setattr(sys, "argv", common + ["--steps", "2", "--resume"])
    T.main()
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    monkeypatch.setattr(sys, "argv", common + ["--steps", "2", "--resume", "--new-stage"])
    T.main()
    ck = torch.load(ckpt, weights_only=False)
    assert ck["step"] == 4 and ck["origin"][0] == 2


def test_occupancy_samples_label_the_union_of_parts():
    import data_gen as D
    import trimesh

    rng = np.random.default_rng(0)
    parts = [D.Part(trimesh.creation.icosphere(4, radius=0.5), None),
             D.Part(trimesh.creation.box(extents=(0.4, 0.4, 0.4)).apply_translation((0.6, 0, 0)), None)]
    pts, inside = D.occupancy_samples(parts, rng, 2000, 1000)
    assert pts.shape == (3000, 3) and inside.dtype == np.int8 and np.abs(pts).max() <= 1
    ball = np.linalg.norm(pts, axis=1) < 0.5
    box = np.all(np.abs(pts - (0.6, 0, 0)) < 0.2, axis=1)
    # away from the surfaces (the icosphere's facets sit within 0.002 of the sphere) labels are exact
    clear = ((np.abs(np.linalg.norm(pts, axis=1) - 0.5) > 0.005)
             & (np.abs(np.abs(pts - (0.6, 0, 0)) - 0.2).min(1) > 1e-3))
    np.testing.assert_array_equal(inside[clear], (ball | box)[clear])
    assert 0.2 < inside.mean() < 0.8  # most points are near the surface: both labels well represented
    # a part that is not watertight gives unknown labels, never guessed ones
    open_part = D.Part(trimesh.Trimesh(parts[0].mesh.vertices, parts[0].mesh.faces[:-10]), None)
    assert (D.occupancy_samples([open_part], rng, 100, 50)[1] == -1).all()


def test_occupancy_loss_is_bce_at_the_mesh_level_and_trains_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "occ.npz", occupancy=True)
    data = T.load_split("occ")
    net = LRMNetwork(model_config()).train()
    T.init_from_scratch(net)
    args = SimpleNamespace(samples=8, views=2, rays=16, depth_weight=0.0, occupancy_weight=1.0,
                           occupancy_points=40, occupancy_level=7.0, occupancy_temperature=2.0,
                           occupancy_region="all")
    planes = net(torch.from_numpy(data["pixels"].astype(np.float32)), default_source_camera(2.0, 3))
    fld = T.differentiable_field(net, planes)
    sel = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:40] for i in range(3)])
    points, labels = torch.from_numpy(data["occ_points"]), torch.from_numpy(data["occ"])
    loss = T.occupancy_loss(fld, points, labels, sel, args)
    expected = []
    for i in range(2):  # object 2's labels are unknown (-1): it contributes nothing, but counts in the mean
        one = T.differentiable_field(net, planes[i])
        density, _ = T.torch_ref.query(one, points[i][sel[i]].float())
        p = torch.sigmoid((density - 7.0) / 2.0).double()
        y = labels[i][sel[i]].double()
        expected.append(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    assert float(loss.detach()) == pytest.approx(float(sum(expected).detach()) / 3, rel=1e-5)
    loss.backward()
    assert float(net.decoder_layers()[0].weight.grad.abs().sum()) > 0
    assert float(net.pos_embed.grad.abs().sum()) > 0  # through the triplane into the transformer
    unknown = T.occupancy_loss(T.differentiable_field(net, planes[2:]), points[2:], labels[2:], sel[2:], args)
    assert float(unknown.detach()) == 0
    # --occupancy-region far: only the labels behind the centre plane (y > 0) count, meaned over those
    far_args = SimpleNamespace(**{**vars(args), "occupancy_region": "far"})
    one = T.differentiable_field(net, planes[0])
    pts0 = points[0][sel[0]].float()
    far = pts0[:, 1] > 0
    assert 0 < int(far.sum()) < len(far)
    p = torch.sigmoid((T.torch_ref.query(one, pts0)[0] - 7.0) / 2.0).double()
    y = labels[0][sel[0]].double()
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    got = T.occupancy_loss(T.differentiable_field(net, planes[:1]), points[:1], labels[:1], sel[:1], far_args)
    assert float(got.detach()) == pytest.approx(float(bce[far].mean().detach()), rel=1e-5)

    # the loop: the occupancy loss runs and is logged; a split without labels is refused with a clear message
    ckpt = tmp_path / "ck.pt"
    common = ["train.py", "--batch", "2", "--views", "2", "--rays", "16", "--samples", "8", "--ckpt", str(ckpt),
              "--warmup", "1", "--steps", "2", "--occupancy-weight", "0.5", "--occupancy-points", "32"]
    monkeypatch.setattr(sys, "argv", common + ["--data", "occ"])
    T.main()
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    _tiny_dataset(tmp_path / "plain.npz")
    monkeypatch.setattr(sys, "argv", common + ["--data", "plain"])
    with pytest.raises(SystemExit, match="occupancy samples"):
        T.main()


def test_init_weights_starts_from_a_shipped_model(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "mini.npz")
    net = LRMNetwork(model_config())
    T.init_from_scratch(net)
    state = {k: v + 0.01 for k, v in net.state_dict().items()}
    (tmp_path / "shipped").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "shipped" / "model.safetensors"))
    ckpt = tmp_path / "ck.pt"
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", "mini", "--batch", "2", "--views", "2", "--rays", "16",
                                      "--samples", "8", "--ckpt", str(ckpt), "--steps", "1", "--lr", "1e-9",
                                      "--init-weights", str(tmp_path / "shipped")])
    T.main()
    trained = torch.load(ckpt, weights_only=False)["model"]
    # one step at a negligible learning rate: still the shipped weights, not a fresh initialisation
    assert all(torch.allclose(trained[k], state[k], atol=1e-6) for k in state)


def test_pixel_rays_are_the_renderer_rays_at_those_pixels():
    from lrm_rt.render import openlrm_rays, surrounding_cameras

    cams = torch.cat([source_view_camera().reshape(1, 25), surrounding_cameras(3)])
    pix = torch.randint(0, 64 * 64, (len(cams), 50), generator=torch.Generator().manual_seed(0))
    o, d = B.pixel_rays(cams, pix, 64)
    for m in range(len(cams)):
        ref_o, ref_d = openlrm_rays(cams[m], 64)
        torch.testing.assert_close(o[m], ref_o.reshape(-1, 3)[pix[m]], atol=1e-6, rtol=0)
        torch.testing.assert_close(d[m], ref_d.reshape(-1, 3)[pix[m]], atol=1e-6, rtol=0)


def test_batched_render_equals_the_runtime_renderer_per_object():
    """Values and gradients of render_batch over 3 objects equal render_openlrm called on each one."""
    from lrm_rt.render import OpenLRMRenderOptions, render_openlrm, surrounding_cameras

    torch.manual_seed(0)
    net = LRMNetwork(model_config())
    T.init_from_scratch(net)
    net.decoder_layers()[-1].bias.data[0] = 3.0  # a dense enough field that the rays see a surface
    pixels = torch.rand(3, 3, SIZE, SIZE)
    cams = surrounding_cameras(3)
    cams[:, [3, 7, 11]] *= 2.5  # from 5 units away a corner ray misses the box: empty, depth = the far end
    pix = torch.randint(0, 32 * 32, (3, 40), generator=torch.Generator().manual_seed(1))
    pix[:, 0] = 0
    o, d = B.pixel_rays(cams, pix, 32)  # one view per object
    u_c, u_f = torch.rand(3, 40, 12), torch.rand(3, 40, 12)

    def run(batched: bool):
        net.zero_grad()
        planes = net(pixels, default_source_camera(2.0, 3))
        if batched:
            outs = B.render_batch(T.differentiable_field(net, planes), o, d, 12, 12, u_coarse=u_c, u_fine=u_f)
        else:
            per = [render_openlrm(T.differentiable_field(net, planes[i]), o[i], d[i], options=OpenLRMRenderOptions(
                n_coarse=12, n_fine=12, stratified_u=u_c[i], importance_u=u_f[i])) for i in range(3)]
            outs = tuple(torch.stack(x) for x in zip(*[(r.rgb, r.weight, r.depth) for r in per]))
        sum(x.sum() for x in outs).backward()
        return [x.detach() for x in outs], [p.grad.clone() for p in (net.decoder_layers()[0].weight, net.pos_embed)]

    (rgb, opacity, depth), grads = run(True)
    (ref_rgb, ref_opacity, ref_depth), ref_grads = run(False)
    assert 0.05 < float(opacity.mean()) < 0.95  # neither empty nor solid: the comparison means something
    assert (opacity[:, 0] == 0).all()
    torch.testing.assert_close(rgb, ref_rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(opacity, ref_opacity, atol=1e-6, rtol=0)
    torch.testing.assert_close(depth, ref_depth, atol=1e-5, rtol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-4)


def test_ray_pixels_fall_in_the_foreground_box_and_ground_truth_is_gathered_there():
    alpha = np.zeros((2, 2, 16, 16), np.uint8)
    alpha[0, 0, 3:6, 10:12] = 255  # object view; the others are empty
    alpha[1, 1, 0, 15] = 7
    boxes = T.foreground_boxes(alpha)
    np.testing.assert_array_equal(boxes[0, 0], [1, 8, 8, 14])  # grown by 2, +1 past the last row/column
    np.testing.assert_array_equal(boxes[1, 1], [0, 3, 13, 16])  # clipped to the image
    assert not boxes[0, 1].any() and not boxes[1, 0].any()
    pix = T.sample_pixels(torch.from_numpy(boxes.reshape(-1, 4)), 16, 4000, torch.Generator().manual_seed(0))
    rows, cols = pix // 16, pix % 16
    assert pix.shape == (4, 4000) and int(pix.min()) >= 0 and int(pix.max()) < 256
    inside = (rows[0] >= 1) & (rows[0] < 8) & (cols[0] >= 8) & (cols[0] < 14)
    assert inside[2000:].all() and inside[:2000].float().mean() < 0.2  # half in the box, half uniform
    assert set(rows[0, 2000:].tolist()) == set(range(1, 8)) and set(cols[0, 2000:].tolist()) == set(range(8, 14))
    assert len(set(pix[1].tolist())) > 200  # an empty view: uniform over the whole image
    images = torch.arange(2 * 256 * 3).reshape(2, 256, 3)
    idx = torch.tensor([[0, 255, 17], [3, 3, 100]])
    np.testing.assert_array_equal(T.gather_pixels(images, idx).numpy(), images.numpy()[[[0], [1]], idx.numpy()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_the_gpu_and_renders_as_on_the_cpu(tmp_path, monkeypatch):
    # full fp32 for the comparison (cuDNN convolutions default to TF32); train.main turns TF32 on for speed:
    # both switches go back for the tests that follow
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _train_on_the_gpu(tmp_path, monkeypatch)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _train_on_the_gpu(tmp_path, monkeypatch):
    from lrm_rt.render import surrounding_cameras

    net = LRMNetwork(model_config())
    T.init_from_scratch(net)
    net.decoder_layers()[-1].bias.data[0] = 3.0
    pixels, cams = torch.rand(2, 3, SIZE, SIZE), surrounding_cameras(2)
    pix = torch.randint(0, 32 * 32, (2, 64), generator=torch.Generator().manual_seed(1))
    u_c, u_f = torch.rand(2, 64, 12), torch.rand(2, 64, 12)
    outs = {}
    for dev in ("cpu", "cuda"):
        net.to(dev)
        with torch.no_grad():
            planes = net(pixels.to(dev), default_source_camera(2.0, 2).to(dev))
            o, d = B.pixel_rays(cams.to(dev), pix.to(dev), 32)
            outs[dev] = [x.cpu() for x in B.render_batch(T.differentiable_field(net, planes), o, d, 12, 12,
                                                         u_coarse=u_c.to(dev), u_fine=u_f.to(dev))]
    for a, b in zip(outs["cuda"], outs["cpu"]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # fp32 both, different kernels

    monkeypatch.setattr(T, "DATA", tmp_path)
    _tiny_dataset(tmp_path / "occ.npz", occupancy=True)
    ckpt = tmp_path / "ck.pt"
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", "occ", "--batch", "2", "--views", "2", "--rays", "16",
                                      "--samples", "8", "--ckpt", str(ckpt), "--steps", "3", "--warmup", "1",
                                      "--depth-weight", "1", "--occupancy-weight", "0.5", "--device", "cuda"])
    T.main()
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_data_gen_writes_a_split_and_its_record(tmp_path, monkeypatch):
    import json

    import data_gen as D

    monkeypatch.setattr(D, "DATA_DIR", tmp_path)
    monkeypatch.setattr(sys, "argv", ["data_gen.py", "--splits", "train", "--n-shapes", "2", "--mesh-instances", "1",
                                      "--views", "3", "--res", "16", "--input-render", "64", "--occupancy", "8",
                                      "--seed", "5", "--train-name", "mini"])
    D.main()
    z = np.load(tmp_path / "mini.npz")
    n = 2 + len([m for m in D.MESH_FILES if m not in D.HELDOUT_MESHES])  # shapes + one pose of each training mesh
    assert z["views"].shape == (n, 3, 16, 16, 4) and z["depths"].shape == (n, 3, 16, 16)
    assert z["pixels"].shape == (n, 3, SIZE, SIZE) and z["cams"].shape == (n, 3, 25) and z["occ"].shape == (n, 12)
    assert (z["views"][..., 3] > 0).any(axis=(2, 3)).all()  # every view sees its object
    assert json.loads((tmp_path / "mini.json").read_text())["seed"] == 5


def test_data_gen_and_export_refuse_before_writing(tmp_path, monkeypatch):
    """Unknown splits were ignored (exit 0), missing meshes gave a trimesh traceback; export.py wrote the new
    weights with a placeholder threshold into --out (by default the shipped model) before it found its tuning
    data missing."""
    import data_gen as D
    import export as X

    monkeypatch.setattr(D, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(sys, "argv", ["data_gen.py", "--splits", "tain"])
    with pytest.raises(SystemExit, match="--splits: unknown tain"):
        D.main()
    monkeypatch.setattr(D, "MESH_DIR", tmp_path / "no_meshes")
    monkeypatch.setattr(sys, "argv", ["data_gen.py", "--splits", "val"])
    with pytest.raises(SystemExit, match="are not in .*LRM_RT_SHARED"):
        D.main()
    assert not (tmp_path / "data").exists()

    ckpt = tmp_path / "ck.pt"
    torch.save({"model": {}, "step": 0}, ckpt)
    out = tmp_path / "model"
    monkeypatch.setattr(X, "DATA", tmp_path / "data")
    for argv, message in ((["--ckpt", str(tmp_path / "none.pt")], "--ckpt: no checkpoint"),
                          (["--ckpt", str(ckpt)], "the threshold is tuned on .*tune.npz, which is missing")):
        monkeypatch.setattr(sys, "argv", ["export.py", *argv, "--out", str(out)])
        with pytest.raises(SystemExit, match=message):
            X.main()
    assert not out.exists()


def test_splits_of_another_input_size_are_refused(tmp_path, monkeypatch):
    """A 112 px split still runs through the 128 px model (its position table is resized to a 7x7 grid): training,
    evaluation and threshold tuning refuse it in one line instead of giving quietly wrong weights or scores."""
    import evaluate as EV
    import export as X

    _tiny_dataset(tmp_path / "old.npz", n_obj=1, size=112)
    monkeypatch.setattr(T, "DATA", tmp_path)
    with pytest.raises(SystemExit, match="'old' holds 112 px input views, the model takes 128 px"):
        T.load_split("old")
    monkeypatch.setattr(EV, "DATA", tmp_path)
    with pytest.raises(SystemExit, match="'old' holds 112 px"):
        EV.evaluate_split(SimpleNamespace(network=None, config=SimpleNamespace(input_size=128)), "old")
    (tmp_path / "gt").mkdir()
    for split in X.TUNE_SPLITS:
        _tiny_dataset(tmp_path / f"{split}.npz", n_obj=1, size=112)
    monkeypatch.setattr(X, "DATA", tmp_path)
    with pytest.raises(SystemExit, match="'tune' holds 112 px"):
        X.check_tuning_data()


def test_export_takes_the_highest_of_tying_levels():
    import export as X

    assert X.choose_level({5.0: 0.7, 7.0: 0.7695, 10.0: 0.7690, 15.0: 0.760}) == 10.0
    assert X.choose_level({5.0: 0.7, 7.0: 0.775, 10.0: 0.7690}) == 7.0


def test_export_tunes_first_then_writes_every_file(tmp_path, monkeypatch):
    import yaml
    from safetensors.torch import load_file

    import export as X

    shipped = REPO / "lrm_rt" / "models_data" / "lrm-tiny"
    ckpt = tmp_path / "ck.pt"
    torch.save({"model": load_file(str(shipped / "model.safetensors")), "step": 7}, ckpt)
    (tmp_path / "data" / "gt").mkdir(parents=True)
    for split in X.TUNE_SPLITS:
        _tiny_dataset(tmp_path / "data" / f"{split}.npz", n_obj=1)
        (tmp_path / "data" / "gt" / f"{split}_0000.npz").write_bytes(b"")
    monkeypatch.setattr(X, "DATA", tmp_path / "data")
    seen = []

    def fake_tune(model, resolution):
        seen.append(model.config.mc_threshold)
        return 5.0, {5.0: 0.5, 10.0: 0.4}
    monkeypatch.setattr(X, "tune_threshold", fake_tune)
    out = tmp_path / "model"
    monkeypatch.setattr(sys, "argv", ["export.py", "--ckpt", str(ckpt), "--out", str(out)])
    X.main()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "infer.yaml", "model.safetensors"]
    assert yaml.safe_load((out / "infer.yaml").read_text())["mesh_thres"] == 5.0 and seen
    assert (out / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()


def test_gpu_run_refuses_an_unknown_command(tmp_path):
    import subprocess

    run = subprocess.run(["bash", str(REPO / "training" / "gpu_run.sh"), "contnue", str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("usage: gpu_run.sh prepare | run OUTDIR | continue OUTDIR")
    assert not list(tmp_path.iterdir())


def test_fit_ceiling_fits_planes_that_render_unseen_views_better(tmp_path, monkeypatch):
    """training/fit_ceiling.py: planes fitted to 4 views of one object (decoder frozen) score better on 2
    other views than the network's prediction from the input image (object 0 of its split is one the shipped
    model gets wrong: F ~0.5)."""
    import data_gen as D
    import evaluate as EV
    import fit_ceiling as FC

    from lrm_rt.checkpoint import load_model

    for module, name in ((D, "DATA_DIR"), (EV, "DATA"), (FC, "DATA")):
        monkeypatch.setattr(module, name, tmp_path)
    FC.make_data(1, 6, seed=5000, res=32, input_render=64)  # small: without embreex trimesh casts rays slowly
    z = np.load(tmp_path / "ceiling_shapes.npz")
    assert z["views"].shape[:2] == (1, 6) and (tmp_path / "gt" / "ceiling_shapes_0000.npz").is_file()
    model = load_model("lrm-tiny")
    before = [p.detach().clone() for p in model.network.parameters()]
    row = FC.score_object(model, z, 0, SimpleNamespace(fit_views=4, steps=80, rays=1024, lr=0.05,
                                                        iou_points=2000))
    assert row["fitted"]["silhouette_iou"] > row["predicted"]["silhouette_iou"] + 0.05
    assert row["fitted"]["fscore"] > row["predicted"]["fscore"] + 0.15
    assert all(torch.equal(a, b) for a, b in zip(before, model.network.parameters()))  # decoder frozen


def _patchwise_upsample(img: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Each old x old patch of img (N, C, g*old, g*old) resized on its own to new x new (bicubic)."""
    n, c, h, _ = img.shape
    g = h // old
    patches = img.reshape(n, c, g, old, g, old).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, old, old)
    up = torch.nn.functional.interpolate(patches.double(), size=(new, new), mode="bicubic", align_corners=False)
    return up.reshape(n, g, g, c, new, new).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * new, g * new).float()


def test_resize_patch_kernel_keeps_every_patch_embedding():
    import resize_patches as R

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 3, 14, 14, generator=gen), torch.rand(5, 3, 14, 14, generator=gen)
    w16 = R.resize_patch_kernel(w, 16)
    up = torch.nn.functional.interpolate(x.double(), size=(16, 16), mode="bicubic", align_corners=False).float()
    old = torch.nn.functional.conv2d(x, w)
    assert w16.shape == (6, 3, 16, 16) and (torch.nn.functional.conv2d(up, w16) - old).abs().max() < 1e-4
    with pytest.raises(ValueError, match="growing"):
        R.resize_patch_kernel(w, 12)


def test_resize_patches_moves_a_112px_model_to_the_shipped_input_size(tmp_path, monkeypatch):
    """A model of the old layout (14 px patches, 112 px) converted by the script loads as the shipped architecture
    and gives the old network's triplane for a 128 px image made of its 112 px image's patches upsampled."""
    import yaml
    from safetensors.torch import save_file

    import export as X
    import model_def
    import resize_patches as R
    from lrm_rt.checkpoint import load_model
    from lrm_rt.config import openlrm_config

    old_cfg = openlrm_config({**model_def.KWARGS, "encoder_model_name": "dinov2_lrmtiny14_reg"}, "1.1", "lrm-tiny",
                             infer={**model_def.INFER, "source_size": 112})
    torch.manual_seed(0)
    old_net = LRMNetwork(old_cfg).eval()
    T.init_from_scratch(old_net)
    src, out = tmp_path / "old", tmp_path / "new"
    X.write_model(old_net.state_dict(), {**model_def.INFER, "source_size": 112, "mesh_thres": 4.5}, src)
    (src / "config.json").write_text(json.dumps({**model_def.KWARGS, "encoder_model_name": "dinov2_lrmtiny14_reg"}))
    monkeypatch.setattr(sys, "argv", ["resize_patches.py", "--src", str(src), "--out", str(out)])
    R.main()
    new = load_model(str(out))
    assert new.config.input_size == SIZE == 128 and new.config.mc_threshold == 4.5  # the tuned level is kept
    assert yaml.safe_load((out / "infer.yaml").read_text())["source_size"] == 128
    img = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    cam = default_source_camera(2.0, 2)
    with torch.no_grad():
        want = old_net(img, cam)
        got = new.network(_patchwise_upsample(img, 14, 16), cam)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    monkeypatch.setattr(sys, "argv", ["resize_patches.py", "--src", str(out), "--out", str(tmp_path / "again")])
    with pytest.raises(SystemExit, match="already has 16 px"):
        R.main()
    save_file({}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(sys, "argv", ["resize_patches.py", "--src", str(tmp_path), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no encoder.model.patch_embed"):
        R.main()


def test_resize_patches_refuses_what_it_cannot_convert(tmp_path, monkeypatch, fixtures_dir):
    """Another architecture (it wrote a folder that failed to load later), weights not fitting model_def.py, a
    kernel larger than the new one, a damaged file: one line each, nothing written."""
    from safetensors.torch import save_file

    import resize_patches as R

    def run(src):
        monkeypatch.setattr(sys, "argv", ["resize_patches.py", "--src", str(src), "--out", str(tmp_path / "out")])
        R.main()

    with pytest.raises(SystemExit, match="another architecture than model_def.py's .*transformer_dim"):
        run(fixtures_dir / "checkpoints" / "openlrm-tiny-1.1")
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({R.PATCH_WEIGHT: torch.zeros(192, 3, 14, 14)}, str(bare / "model.safetensors"))
    with pytest.raises(SystemExit, match="weights do not fit model_def.py's architecture: .*Missing key"):
        run(bare)
    save_file({R.PATCH_WEIGHT: torch.zeros(192, 3, 18, 18)}, str(bare / "model.safetensors"))
    with pytest.raises(SystemExit, match=r"\(18, 18\) patch kernel cannot become 16x16"):
        run(bare)
    (bare / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(SystemExit, match="cannot read .*model.safetensors"):
        run(bare)
    assert not (tmp_path / "out").exists()
