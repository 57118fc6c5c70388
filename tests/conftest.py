"""Shared pytest fixtures: paths to ../shared and loaders for the reference tensors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LRM_RT_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def _load_st(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES} (set LRM_RT_SHARED)")
    return FIXTURES


@pytest.fixture(scope="session")
def triposr_io(fixtures_dir):
    return _load_st("triposr_tiny_io.safetensors")


@pytest.fixture(scope="session")
def openlrm_io(fixtures_dir):
    return _load_st("openlrm_tiny_io.safetensors")


@pytest.fixture(scope="session")
def openlrm_v10_io(fixtures_dir):
    return _load_st("openlrm_v10_tiny_io.safetensors")


@pytest.fixture(scope="session")
def triposr_weights(fixtures_dir):
    return _load_st("triposr_tiny_weights.safetensors")


@pytest.fixture(scope="session")
def openlrm_weights(fixtures_dir):
    return _load_st("openlrm_tiny_weights.safetensors")


@pytest.fixture(scope="session")
def openlrm_v10_weights(fixtures_dir):
    return _load_st("openlrm_v10_tiny_weights.safetensors")


# OpenLRM fixture sets: (version, io fixture, weights fixture).
OPENLRM_VERSIONS = [("1.1", "openlrm_io", "openlrm_weights"), ("1.0", "openlrm_v10_io", "openlrm_v10_weights")]


def glb_parts(data: bytes):
    """(JSON document, binary chunk) of a GLB file's bytes."""
    import json
    import struct

    jlen = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[20:20 + jlen]), data[28 + jlen:]


def glb_attribute(data: bytes, name: str):
    """A float32 vertex attribute (POSITION, NORMAL, ...) of a GLB's first primitive, as an (N, k) array."""
    import numpy as np

    doc, binary = glb_parts(data)
    acc = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"][name]]
    assert acc["componentType"] == 5126
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[acc["type"]]
    offset = doc["bufferViews"][acc["bufferView"]]["byteOffset"]
    return np.frombuffer(binary, "<f4", acc["count"] * width, offset).reshape(-1, width)


def make_field(io: dict, weights: dict, spec):
    """The reference's triplane + decoder of a fixture model as a TriplaneField."""
    from lrm_rt.field.spec import TriplaneField
    from lrm_rt.field.torch_ref import decoder_from_state_dict

    ws, bs = decoder_from_state_dict(weights, spec.family)
    return TriplaneField(io["triplane"][0], ws, bs, spec)


@pytest.fixture(scope="module")
def triposr_field(triposr_io, triposr_weights):
    from lrm_rt.field.spec import TRIPOSR_FIELD

    return make_field(triposr_io, triposr_weights, TRIPOSR_FIELD)


@pytest.fixture(scope="module", params=OPENLRM_VERSIONS, ids=["v1.1", "v1.0"])
def openlrm_case(request):
    """(io, field) of the OpenLRM v1.1 and v1.0 fixture models."""
    from lrm_rt.field.spec import OPENLRM_FIELD

    io, weights = (request.getfixturevalue(name) for name in request.param[1:])
    return io, make_field(io, weights, OPENLRM_FIELD)
