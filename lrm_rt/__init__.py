"""lrm_rt: a fast inference runtime for Large Reconstruction Models (OpenLRM, TripoSR)."""

__version__ = "0.2.0"

from pathlib import Path as _Path


def models_dir() -> _Path:
    """Folder of the models shipped with the package (``--model NAME`` looks here first)."""
    return _Path(__file__).resolve().parent / "models_data"


def shipped_models() -> list:
    """Names of the models shipped with the package (``lrm-tiny``)."""
    d = models_dir()
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
