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


def _tiny_dataset(path: Path, n_obj=3, views=3, res=8):
    rng = np.random.default_rng(0)
    cams = np.broadcast_to(source_view_camera().numpy(), (n_obj, views, 25))
    vw = rng.integers(0, 255, (n_obj, views, res, res, 4), dtype=np.uint8)
    depths = np.where(vw[..., 3] > 127, rng.uniform(1.2, 2.8, vw.shape[:-1]), 0.0).astype(np.float16)
    np.savez(path, pixels=rng.random((n_obj, 3, 112, 112)).astype(np.float16), views=vw, depths=depths,
             cams=cams.astype(np.float32), labels=np.array(["shape"] * n_obj))


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
    args = SimpleNamespace(samples=8, views=2, rays=32, depth_weight=1.0)
    _, _, l_depth = T.render_loss(net, np.array([0, 1]), data, T.RayCache(data["cams"], 8), args,
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
