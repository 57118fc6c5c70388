"""The lrm-tiny training recipe (training/train.py): the geometric start and a resumable loop."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import train as T  # noqa: E402
from model_def import model_config  # noqa: E402

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
    pixels = torch.rand(2, 3, 112, 112)
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


def _tiny_dataset(path: Path, n_obj=3, views=3, res=8, occupancy=False):
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
    np.savez(path, pixels=rng.random((n_obj, 3, 112, 112)).astype(np.float16), views=vw, depths=depths,
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
    _, _, l_depth, _ = T.render_loss(net, np.array([0, 1]), data, T.RayCache(data["cams"], 8), args,
                                  np.random.default_rng(0), torch.Generator().manual_seed(0))
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
                           occupancy_points=40, occupancy_level=7.0, occupancy_temperature=2.0)
    planes = net(torch.from_numpy(data["pixels"][:1].astype(np.float32)), default_source_camera(2.0, 1))
    fld = T.differentiable_field(net, planes[0])
    loss = T.occupancy_loss(fld, data["occ_points"][0], data["occ"][0], args, np.random.default_rng(1))
    sel = np.random.default_rng(1).choice(64, 40, replace=False)  # the same draw
    density, _ = T.torch_ref.query(fld, torch.from_numpy(data["occ_points"][0][sel].astype(np.float32)))
    p = torch.sigmoid((density - 7.0) / 2.0).double()
    y = torch.from_numpy(data["occ"][0][sel].astype(np.float64))
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert float(net.decoder_layers()[0].weight.grad.abs().sum()) > 0
    assert float(net.pos_embed.grad.abs().sum()) > 0  # through the triplane into the transformer
    # unknown labels (-1) contribute nothing
    assert float(T.occupancy_loss(fld, data["occ_points"][2], data["occ"][2], args, np.random.default_rng(1))) == 0

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


def test_ray_cache_is_bounded_and_returns_the_renderer_rays():
    cams = np.broadcast_to(source_view_camera().numpy(), (5, 2, 25)).astype(np.float32)
    cache = T.RayCache(cams, 8, max_views=3)
    o, d = cache.get(0, 0)
    ref_o, ref_d = T.openlrm_rays(torch.from_numpy(cams[0, 0]), 8)
    assert torch.equal(o, ref_o.reshape(-1, 3)) and torch.equal(d, ref_d.reshape(-1, 3))
    for obj in range(5):
        cache.get(obj, 1)
        cache.get(0, 0)  # recently used: kept
    assert len(cache.cache) == 3 and (0, 0) in cache.cache and (4, 1) in cache.cache and (1, 1) not in cache.cache
