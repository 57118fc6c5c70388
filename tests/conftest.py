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
