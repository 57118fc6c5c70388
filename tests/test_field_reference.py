"""The PyTorch field reference against the fixtures' triplane lookups, decoder outputs and density grids."""
from __future__ import annotations

import pytest
import torch

from lrm_rt.errors import CheckpointError
from lrm_rt.field.base import FieldBackend
from lrm_rt.field.spec import OPENLRM_FIELD, TRIPOSR_FIELD
from lrm_rt.field.torch_ref import (
    TorchFieldBackend,
    activate,
    decode,
    decoder_from_state_dict,
    density_grid,
    grid_points,
    query,
    query_raw,
    sample_triplane,
)

from conftest import make_field

ATOL = RTOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=ATOL, rtol=rtol)




# ------------------------------------------------------------------------------------ decoder loading


def test_decoder_from_state_dict_triposr(triposr_weights):
    ws, bs = decoder_from_state_dict(triposr_weights, "triposr")
    assert [tuple(w.shape) for w in ws] == [(16, 24), (16, 16), (16, 16), (4, 16)]
    assert torch.equal(ws[-1], triposr_weights["decoder.layers.6.weight"])
    assert torch.equal(bs[0], triposr_weights["decoder.layers.0.bias"])


def test_decoder_from_state_dict_openlrm(openlrm_weights):
    ws, bs = decoder_from_state_dict(openlrm_weights, "openlrm")
    assert [tuple(w.shape) for w in ws] == [(64, 24), (64, 64), (64, 64), (4, 64)]
    assert torch.equal(bs[2], openlrm_weights["synthesizer.decoder.net.4.bias"])


def test_decoder_layers_sorted_numerically_and_prefix_tolerated():
    # 10 layers as in the real TripoSR: "layers.10" must come after "layers.8", not after "layers.1"
    sd = {}
    dims = [6] + [5] * 9 + [4]
    for i in range(10):
        sd[f"model.decoder.layers.{2 * i}.weight"] = torch.zeros(dims[i + 1], dims[i])
        sd[f"model.decoder.layers.{2 * i}.bias"] = torch.zeros(dims[i + 1])
    ws, _ = decoder_from_state_dict(sd, "triposr")
    assert [tuple(w.shape) for w in ws] == [(dims[i + 1], dims[i]) for i in range(10)]


@pytest.mark.parametrize(
    "sd",
    [
        {},
        {"decoder.layers.0.weight": torch.zeros(4, 3)},  # no bias
        {"decoder.layers.0.weight": torch.zeros(5, 3), "decoder.layers.0.bias": torch.zeros(5)},  # not 4 outputs
        {
            "decoder.layers.0.weight": torch.zeros(5, 3),
            "decoder.layers.0.bias": torch.zeros(5),
            "decoder.layers.2.weight": torch.zeros(4, 6),  # 6 inputs after a 5-wide layer
            "decoder.layers.2.bias": torch.zeros(4),
        },
    ],
)
def test_decoder_from_state_dict_rejects_bad_checkpoints(sd):
    with pytest.raises(CheckpointError):
        decoder_from_state_dict(sd, "triposr")


def test_decoder_keys_are_family_specific(openlrm_weights):
    with pytest.raises(CheckpointError):
        decoder_from_state_dict(openlrm_weights, "triposr")


# ------------------------------------------------------------------------------------ TripoSR field


def test_triposr_sampled_features(triposr_io, triposr_field):
    feats = sample_triplane(triposr_field.planes, triposr_io["query_points"], TRIPOSR_FIELD)
    close(feats, triposr_io["decoder_input_features"])


def test_triposr_decoder_and_activations(triposr_io, triposr_field):
    raw = decode(triposr_field, triposr_io["decoder_input_features"])
    close(raw[:, :1], triposr_io["decoder_density_raw"])
    close(raw[:, 1:], triposr_io["decoder_features_raw"])
    density, rgb = activate(raw, TRIPOSR_FIELD)
    close(density, triposr_io["decoder_density_act"][:, 0], rtol=RTOL)  # exp densities reach ~1e4
    close(rgb, triposr_io["decoder_color"])


def test_triposr_query(triposr_io, triposr_field):
    density, rgb = query(triposr_field, triposr_io["query_points"])
    close(density, triposr_io["decoder_density_act"][:, 0], rtol=RTOL)
    close(rgb, triposr_io["decoder_color"])
    raw_density, _ = query(triposr_field, triposr_io["query_points"], raw_density=True)
    close(raw_density, triposr_io["decoder_density_raw"][:, 0])


def test_triposr_grid_points(triposr_io):
    close(grid_points(32, TRIPOSR_FIELD), triposr_io["mc_grid_points"])


def test_triposr_density_grid(triposr_io, triposr_field):
    grid = density_grid(triposr_field, 32, chunk=3000)  # small chunk: several x-slab batches
    assert grid.shape == (32, 32, 32)
    close(grid, triposr_io["density_grid"], rtol=RTOL)


# ------------------------------------------------------------------------------------ OpenLRM field


def test_openlrm_sampled_features(openlrm_case):
    io, field = openlrm_case
    feats = sample_triplane(field.planes, io["query_points"], OPENLRM_FIELD)
    n, c = io["query_points"].shape[0], field.channels
    close(feats.reshape(n, 3, c).permute(1, 0, 2), io["sampled_plane_features"])


def test_openlrm_decoder_and_query(openlrm_case):
    io, field = openlrm_case
    raw = query_raw(field, io["query_points"])
    close(raw, io["decoder_net_out"])
    density, rgb = query(field, io["query_points"])
    close(density, io["decoder_sigma_act"][:, 0])
    close(rgb, io["decoder_rgb"])
    raw_sigma, _ = query(field, io["query_points"], raw_density=True)
    close(raw_sigma, io["decoder_sigma_raw"][:, 0])


def test_openlrm_density_grid(openlrm_case):
    io, field = openlrm_case
    close(density_grid(field, 32, chunk=5000), io["density_grid"])


def test_openlrm_grid_points_are_ij_linspace():
    pts = grid_points(5, OPENLRM_FIELD).reshape(5, 5, 5, 3)
    axis = torch.linspace(-1, 1, 5)
    assert torch.equal(pts[2, 3, 4], torch.stack([axis[2], axis[3], axis[4]]))


# ------------------------------------------------------------------------------------ chunking, backend


def test_chunked_query_matches_unchunked(triposr_io, triposr_field):
    pts = triposr_io["query_points"]
    whole = query_raw(triposr_field, pts, chunk=1 << 20)
    torch.testing.assert_close(query_raw(triposr_field, pts, chunk=1000), whole, atol=1e-6, rtol=1e-6)


def test_torch_backend(openlrm_io, openlrm_weights):
    field = make_field(openlrm_io, openlrm_weights, OPENLRM_FIELD)
    backend = TorchFieldBackend(chunk=1000)
    assert isinstance(backend, FieldBackend)
    density, rgb = backend.query(field, openlrm_io["query_points"])
    close(density, openlrm_io["decoder_sigma_act"][:, 0])
    close(rgb, openlrm_io["decoder_rgb"])
    close(backend.density_grid(field, 32), openlrm_io["density_grid"])
    close(backend.density_grid(field, 32, level=3.0), openlrm_io["density_grid"])
