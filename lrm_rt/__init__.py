"""lrm_rt: a fast inference runtime for Large Reconstruction Models (OpenLRM, TripoSR)."""

__version__ = "0.2.0"

from pathlib import Path as _Path


def models_dir() -> _Path:
    """Folder of the models shipped with the package (``--model NAME`` looks here first)."""
    return _Path(__file__).resolve().parent / "models_data"
