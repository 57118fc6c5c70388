"""Cameras and volume renderers (torch reference) against the fixtures' rays, depths and renders."""
from __future__ import annotations

import pytest
import torch

from lrm_rt.errors import ConfigError
from lrm_rt.field.spec import OPENLRM_FIELD, TRIPOSR_FIELD, TriplaneField
from lrm_rt.field.torch_ref import TorchFieldBackend, query
from lrm_rt.render import (
    OpenLRMRenderOptions,
    TripoSRRenderOptions,
    openlrm_ray_limits,
    openlrm_rays,
    render_field,
    render_openlrm,
    render_triposr,
    spherical_cameras,
    surrounding_cameras,
    triposr_ray_box,
)

from conftest import OPENLRM_VERSIONS, make_field

ATOL = 1e-4



def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=ATOL, rtol=0.0)


# ------------------------------------------------------------------------------------ TripoSR


@pytest.fixture(scope="module")
def triposr_field(triposr_io, triposr_weights) -> TriplaneField:
    return make_field(triposr_io, triposr_weights, TRIPOSR_FIELD)


@pytest.fixture(scope="module")
def triposr_rays():
    rays_o, rays_d = spherical_cameras(1, elevation_deg=20.0, distance=1.9, fovy_deg=40.0, height=32, width=32)
    return rays_o[0], rays_d[0]


def test_spherical_cameras(triposr_io, triposr_rays):
    rays_o, rays_d = triposr_rays
    close(rays_o, triposr_io["render_rays_o"])
    close(rays_d, triposr_io["render_rays_d"])


def test_spherical_cameras_orbit():
    rays_o, rays_d = spherical_cameras(4, elevation_deg=0.0, distance=2.0, fovy_deg=40.0, height=8, width=6)
    assert rays_o.shape == rays_d.shape == (4, 8, 6, 3)
    # azimuth 0, 90, 180, 270 degrees (360 excluded), all at distance 2 on the equator
    expected = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [-2.0, 0, 0], [0, -2.0, 0]])
    torch.testing.assert_close(rays_o[:, 0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(rays_d.norm(dim=-1), torch.ones(4, 8, 6))


def test_triposr_ray_box(triposr_io, triposr_rays):
    t_near, t_far, valid = triposr_ray_box(*triposr_rays, radius=0.87)
    assert torch.equal(valid, triposr_io["render_ray_valid"].bool())
    close(t_near, triposr_io["render_t_near"])
    close(t_far, triposr_io["render_t_far"])


def test_triposr_render(triposr_io, triposr_field, triposr_rays):
    out = render_triposr(triposr_field, *triposr_rays, options=TripoSRRenderOptions(chunk_rays=100))
    assert out.rgb.shape == (32, 32, 3)
    close(out.rgb, triposr_io["render_rgb"])


def test_triposr_render_through_backend(triposr_io, triposr_field, triposr_rays):
    out = TorchFieldBackend().render(triposr_field, *triposr_rays)
    close(out.rgb, triposr_io["render_rgb"])


def test_triposr_invalid_rays_are_white(triposr_field):
    rays_o = torch.tensor([[0.0, 0.0, 5.0]])
    rays_d = torch.tensor([[0.0, 0.0, 1.0]])  # pointing away from the box
    out = render_triposr(triposr_field, rays_o, rays_d)
    assert torch.equal(out.rgb, torch.ones(1, 3))
    assert out.weight.item() == 0.0


# ------------------------------------------------------------------------------------ OpenLRM


@pytest.fixture(scope="module", params=OPENLRM_VERSIONS, ids=["v1.1", "v1.0"])
def openlrm_case(request):
    version, io_name, w_name = request.param
    io, weights = request.getfixturevalue(io_name), request.getfixturevalue(w_name)
    return version, io, make_field(io, weights, OPENLRM_FIELD)


def _fixture_rays(io: dict):
    return openlrm_rays(io["render_camera"][0], 32)


def _check_render(out, io: dict, prefix: str) -> None:
    close(out.rgb, io[f"{prefix}_rgb"].permute(1, 2, 0))
    close(out.depth, io[f"{prefix}_depth"][0])
    close(out.weight, io[f"{prefix}_weight"][0])
    close(out.extras["depths_coarse"], io[f"{prefix}_depths_coarse"][..., 0])
    close(out.extras["depths_fine"], io[f"{prefix}_depths_fine"][..., 0])


def test_openlrm_surrounding_camera(openlrm_case):
    version, io, _ = openlrm_case
    cams = surrounding_cameras(8, radius=2.0, height=0.8, version=version)
    assert cams.shape == (8, 25)
    close(cams[1], io["render_camera"][0])


def test_openlrm_orbit_versions_differ():
    # v1.1 spaces 8 views over [-π/2, 3π/2] inclusive (first = last); v1.0 uses 2πi/8 - π/2
    v11, v10 = surrounding_cameras(8, version="1.1"), surrounding_cameras(8, version="1.0")
    torch.testing.assert_close(v11[0], v11[-1], atol=1e-6, rtol=0)
    assert not torch.allclose(v10[0], v10[-1])
    torch.testing.assert_close(v11[0], v10[0])
    pos = v10[0].reshape(-1)[:16].reshape(4, 4)[:3, 3]
    torch.testing.assert_close(pos, torch.tensor([0.0, -(4 - 0.64) ** 0.5, 0.8]), atol=1e-6, rtol=0)


def test_openlrm_rays(openlrm_case):
    _, io, _ = openlrm_case
    rays_o, rays_d = _fixture_rays(io)
    assert rays_o.shape == rays_d.shape == (32, 32, 3)
    # bit-exact: deterministic sampling puts the first sample on the box face, where the last bit decides in/out
    assert torch.equal(rays_o.reshape(-1, 3), io["render_ray_origins"])
    assert torch.equal(rays_d.reshape(-1, 3), io["render_ray_directions"])


def test_openlrm_render_deterministic(openlrm_case):
    version, io, field = openlrm_case
    out = render_openlrm(field, *_fixture_rays(io), options=OpenLRMRenderOptions(version=version, chunk_rays=300))
    _check_render(out, io, "render_det")


def test_openlrm_render_injected_draws(openlrm_case):
    version, io, field = openlrm_case
    opt = OpenLRMRenderOptions(
        version=version, stratified_u=io["render_rand_stratified"], importance_u=io["render_rand_pdf_u"]
    )
    _check_render(render_openlrm(field, *_fixture_rays(io), options=opt), io, "render")


def test_openlrm_render_seeded_generator_reproduces_reference(openlrm_case):
    # the fixtures were rendered after torch.manual_seed(1234); drawing in the reference's order reproduces them
    version, io, field = openlrm_case
    opt = OpenLRMRenderOptions(version=version, generator=torch.Generator().manual_seed(1234))
    out = TorchFieldBackend().render(field, *_fixture_rays(io), options=opt)
    close(out.rgb, io["render_rgb"].permute(1, 2, 0))
    close(out.depth, io["render_depth"][0])


def test_openlrm_render_with_custom_query(openlrm_io, openlrm_weights):
    # the renderer only sees the query callable: a wrapper that records calls must give the same image
    field = make_field(openlrm_io, openlrm_weights, OPENLRM_FIELD)
    calls = []

    def counting_query(f, points, raw_density=False):
        calls.append(points.shape[0])
        return query(f, points, raw_density=raw_density)

    out = render_openlrm(field, *_fixture_rays(openlrm_io), query=counting_query)
    assert calls and sum(calls) <= 1024 * 96  # only in-box samples are queried
    close(out.rgb, openlrm_io["render_det_rgb"].permute(1, 2, 0))


def test_openlrm_ray_limits_fill_missing_rays():
    rays_o = torch.tensor([[0.0, -3.0, 0.0], [0.5, -3.0, 0.0], [0.0, -3.0, 5.0]])
    rays_d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # third ray misses the box
    start, end = openlrm_ray_limits(rays_o, rays_d)
    torch.testing.assert_close(start, torch.tensor([2.0, 2.0, 2.0]))
    # a missing ray ends at the largest valid *start* (reference behaviour), not the largest end
    torch.testing.assert_close(end, torch.tensor([4.0, 4.0, 2.0]))
    # no ray hits: the reference's miss markers
    start, end = openlrm_ray_limits(rays_o[2:], rays_d[2:])
    assert start.tolist() == [-1.0] and end.tolist() == [-2.0]
    # a leading batch dimension: each row is a call of its own (its misses filled from its own rays)
    both = torch.stack([rays_o, rays_o]), torch.stack([rays_d, rays_d])
    both[0][1, :2, 1] = -2.5  # the second call's hits start at 1.5
    start, end = openlrm_ray_limits(*both)
    torch.testing.assert_close(start, torch.tensor([[2.0, 2.0, 2.0], [1.5, 1.5, 1.5]]))
    torch.testing.assert_close(end, torch.tensor([[4.0, 4.0, 2.0], [3.5, 3.5, 1.5]]))


def test_openlrm_depth_gradient_is_finite_with_empty_rays(openlrm_io, openlrm_weights):
    # where the field is empty enough that every sample's alpha underflows, Σw = 0 and the depth is NaN
    # -> the far end (reference); training on depths must still get finite gradients there (a plain
    # 0/0 in the graph puts NaN into every weight)
    field = make_field(openlrm_io, openlrm_weights, OPENLRM_FIELD)
    planes = field.planes.detach().clone().requires_grad_(True)
    bias = field.biases[-1].detach().clone()
    bias[0] = -200.0  # raw density: softplus underflows to exactly 0 on the near rays
    field = TriplaneField(planes, field.weights, field.biases[:-1] + [bias], OPENLRM_FIELD)
    rays_o, rays_d = _fixture_rays(openlrm_io)
    out = render_openlrm(field, rays_o[:4, :4], rays_d[:4, :4])
    assert float(out.weight.detach().abs().max()) == 0.0
    out.depth.sum().backward()
    assert planes.grad is not None and torch.isfinite(planes.grad).all()


def test_render_field_rejects_other_family_options(triposr_field, triposr_rays):
    with pytest.raises(ConfigError):
        render_field(triposr_field, *triposr_rays, options=OpenLRMRenderOptions())


def test_openlrm_injected_draws_must_match_ray_count(openlrm_io, openlrm_weights):
    field = make_field(openlrm_io, openlrm_weights, OPENLRM_FIELD)
    rays_o = torch.full((4, 3), -3.0)
    rays_d = torch.full((4, 3), 3**-0.5)
    with pytest.raises(ConfigError):
        render_openlrm(field, rays_o, rays_d, options=OpenLRMRenderOptions(stratified_u=torch.zeros(3, 48)))
