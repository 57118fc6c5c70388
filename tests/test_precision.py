"""Reduced-precision networks without TensorRT: fp16 ONNX graphs in ONNX Runtime (lrm_rt.export.fp16) and
torch bf16 on CPU. The mesh from the reduced-precision triplane must match the fp32 mesh within 1 % of the
bounding-box diagonal (symmetric mean Chamfer), and the triplane hand-off, decoder and density activation
stay float32."""
import json

import numpy as np
import pytest
import torch

from lrm_rt.checkpoint import load_model
from lrm_rt.export import export_model
from lrm_rt.network_backends import TorchNetworkBackend, resolve_precision
from lrm_rt.pipeline import Reconstructor

CKPTS = ["triposr-tiny", "openlrm-tiny-1.1", "openlrm-tiny-1.0"]
CHAMFER_FRACTION = 0.01


@pytest.fixture(scope="module")
def fp16_exports(fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    out = {}
    for name in CKPTS:
        out[name] = root / name
        man = export_model(load_model(str(fixtures_dir / "checkpoints" / name)), out[name], fp16=True,
                           log=lambda m: None)
        assert all(r["passed"] for r in man["validation"]["fp16"].values())
    return out


@pytest.fixture(scope="module")
def fp32_meshes(fixtures_dir):
    meshes = {}
    for name in CKPTS:
        d = fixtures_dir / "checkpoints" / name
        rec = Reconstructor(str(d), network_backend="torch", precision="fp32")
        meshes[name] = rec.reconstruct(str(d / "input.png"), mc_resolution=64).mesh
    return meshes


def _chamfer(a, b):
    from scipy.spatial import cKDTree

    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def _check_close(mesh, ref):
    diag = float(np.linalg.norm(ref.vertices.max(0) - ref.vertices.min(0)))
    assert mesh.num_faces > 0
    assert _chamfer(mesh.vertices, ref.vertices) < CHAMFER_FRACTION * diag
    assert abs(mesh.num_faces - ref.num_faces) < 0.01 * ref.num_faces


def _check_fp32_handoff(rec, triplane):
    assert triplane.dtype == torch.float32
    fld = rec.network.triplane_field(triplane)
    assert fld.planes.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in fld.weights + fld.biases)


@pytest.mark.parametrize("name", CKPTS)
def test_fp16_onnx_mesh_matches_fp32(name, fp16_exports, fp32_meshes, fixtures_dir):
    rec = Reconstructor(str(fp16_exports[name]), network_backend="onnxruntime", precision="fp16")
    assert rec.network.precision == "fp16"
    res = rec.reconstruct(str(fixtures_dir / "checkpoints" / name / "input.png"), mc_resolution=64)
    _check_fp32_handoff(rec, res.triplane)
    _check_close(res.mesh, fp32_meshes[name])


@pytest.mark.parametrize("name", CKPTS)
def test_bf16_torch_mesh_matches_fp32(name, fp32_meshes, fixtures_dir):
    d = fixtures_dir / "checkpoints" / name
    rec = Reconstructor(str(d), network_backend="torch", precision="bf16")
    assert next(rec.network.network.parameters()).dtype == torch.bfloat16
    res = rec.reconstruct(str(d / "input.png"), mc_resolution=64)
    _check_fp32_handoff(rec, res.triplane)
    _check_close(res.mesh, fp32_meshes[name])


def test_fp16_graph_keeps_fragile_ops_in_fp32(fp16_exports):
    import onnx
    from onnx import TensorProto

    from lrm_rt.export.fp16 import FP32_OPS, _float_types

    for graph in ("encoder", "transformer"):
        model = onnx.load(str(fp16_exports["triposr-tiny"] / f"{graph}.fp16.onnx"))
        types = _float_types(model)
        ops = {}
        for node in model.graph.node:
            dt = {types.get(i) for i in node.input if types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
            ops.setdefault(node.op_type, set()).update(dt)
        for op in FP32_OPS & set(ops):
            assert ops[op] == {TensorProto.FLOAT}, op  # LayerNorm, Softmax, InstanceNorm, ConvTranspose, ...
        assert ops["MatMul"] == {TensorProto.FLOAT16}
        io = list(model.graph.input) + list(model.graph.output)
        assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in io)
    assert "ConvTranspose" in ops and "InstanceNormalization" in ops  # the TripoSR transformer has both


def test_fp16_requires_fp16_graphs(fixtures_dir, tmp_path):
    from lrm_rt.errors import BackendError

    d = tmp_path / "x"
    export_model(load_model(str(fixtures_dir / "checkpoints" / "triposr-tiny")), d, log=lambda m: None)
    with pytest.raises(BackendError, match="--fp16"):
        Reconstructor(str(d), precision="fp16")


def test_auto_precision_rule(monkeypatch):
    import lrm_rt.network_backends as nb

    monkeypatch.setattr(nb, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(nb, "cpu_bf16_is_faster", lambda width=1024: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(nb, "cpu_bf16_is_faster", lambda width=1024: False)  # native but measured slower
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(nb, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(nb, "cpu_bf16_is_faster", lambda width=1024: pytest.fail("no probe without native bf16"))
    assert resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("bf16_seconds, chosen", [(0.5, True), (0.9, False), (1.7, False)])
def test_bf16_probe_needs_a_clear_win_and_runs_once(monkeypatch, tmp_path, bf16_seconds, chosen):
    import lrm_rt.network_backends as nb

    calls = []

    def fake_times(width, tokens, rounds=5):
        calls.append(width)
        return 1.0, bf16_seconds
    monkeypatch.setenv("LRM_RT_CACHE", str(tmp_path))
    monkeypatch.setattr(nb, "_time_matmuls", fake_times)
    monkeypatch.setattr(nb, "_BF16_PROBES", {})
    assert nb.cpu_bf16_is_faster(384) is chosen
    assert nb.cpu_bf16_is_faster(384) is chosen
    assert calls == [384]  # cached: one probe per width (and thread count)
    nb.cpu_bf16_is_faster(192)
    assert calls == [384, 192]


def test_bf16_probe_decision_is_kept_between_processes(monkeypatch, tmp_path):
    """A later process (here: an emptied in-process cache) takes the stored decision instead of measuring again,
    so the default precision, and so the mesh, does not change from run to run on one machine."""
    import lrm_rt.network_backends as nb

    monkeypatch.setenv("LRM_RT_CACHE", str(tmp_path))
    monkeypatch.setattr(nb, "_BF16_PROBES", {})
    monkeypatch.setattr(nb, "_time_matmuls", lambda width, tokens, rounds=5: (1.0, 0.5))
    assert nb.cpu_bf16_is_faster(256) is True
    assert len(json.loads((tmp_path / "bf16_probe.json").read_text())) == 1
    monkeypatch.setattr(nb, "_BF16_PROBES", {})
    monkeypatch.setattr(nb, "_time_matmuls", lambda width, tokens, rounds=5: pytest.fail("measured again"))
    assert nb.cpu_bf16_is_faster(256) is True
    monkeypatch.setattr(nb, "_time_matmuls", lambda width, tokens, rounds=5: (1.0, 2.0))
    assert nb.cpu_bf16_is_faster(512) is False  # another width: its own probe
    (tmp_path / "bf16_probe.json").write_text("{not json")  # a damaged file: probe again, no error
    monkeypatch.setattr(nb, "_BF16_PROBES", {})
    assert nb.cpu_bf16_is_faster(256) is False


def test_bf16_probe_times_real_matmuls():
    import lrm_rt.network_backends as nb

    t32, t16 = nb._time_matmuls(64, 32, rounds=2)
    assert 0 < t32 < 1 and 0 < t16 < 1


def test_torch_backend_probes_at_the_networks_width(monkeypatch, fixtures_dir):
    import lrm_rt.network_backends as nb

    net = load_model(str(fixtures_dir / "checkpoints" / "triposr-tiny")).network
    widths = []
    monkeypatch.setattr(nb, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(nb, "cpu_bf16_is_faster", lambda width=1024: widths.append(width) or False)
    assert TorchNetworkBackend(net, precision="auto").precision == "fp32"
    assert widths == [net.config.transformer_dim]


def test_bf16_backend_returns_fp32_triplane(fixtures_dir, triposr_io):
    net = load_model(str(fixtures_dir / "checkpoints" / "triposr-tiny")).network
    ref = net(triposr_io["vit_pixel_values"]).detach()
    backend = TorchNetworkBackend(net, precision="bf16")
    triplane, _ = backend.run(triposr_io["vit_pixel_values"])
    assert triplane.dtype == torch.float32 and backend.weights[0].dtype == torch.float32
    rel = ((triplane - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel < 0.05  # bf16 really ran (not bit-exact) and stayed close


def test_reconstructors_sharing_a_model_keep_their_precisions(fixtures_dir):
    """A LoadedModel given to a Reconstructor is not converted under the caller: a bf16 Reconstructor built on
    the same model afterwards leaves the fp32 one running fp32 (it once turned its weights into bf16 too)."""
    d = fixtures_dir / "checkpoints" / "openlrm-tiny-1.1"
    model = load_model(str(d))
    fp32 = Reconstructor(model, network_backend="torch", precision="fp32")
    before = fp32.reconstruct(str(d / "input.png"), mc_resolution=32).triplane
    bf16 = Reconstructor(model, network_backend="torch", precision="bf16")
    assert next(bf16.network.network.parameters()).dtype == torch.bfloat16
    assert next(model.network.parameters()).dtype == torch.float32
    assert fp32.network.network is model.network  # fp32 on the CPU needed no copy
    torch.testing.assert_close(fp32.reconstruct(str(d / "input.png"), mc_resolution=32).triplane, before,
                               rtol=0, atol=0)
    bf16.reconstruct(str(d / "input.png"), mc_resolution=32)
