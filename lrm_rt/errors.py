"""Errors raised by lrm_rt.

Every failure caused by user input (images, checkpoints, options, engines) is an
``LrmError`` with a one-line message that names the problem; the CLI prints it
and exits non-zero instead of showing a traceback.
"""
import math


class LrmError(Exception):
    """Base class for errors a user can act on."""


class ImageError(LrmError):
    """An input image cannot be read or used."""


class CheckpointError(LrmError):
    """A checkpoint or model directory is missing, malformed or mismatched."""


class ConfigError(LrmError):
    """An unknown model name or an invalid option value."""


class BackendError(LrmError):
    """A requested backend is unavailable or was built for another machine."""


class ResourceError(LrmError):
    """A request needs more memory than is available."""


def check_int(name: str, value, lo: int, hi=None) -> int:
    """``value`` as an int in [lo, hi], or a ConfigError naming the option (a float or bool is refused)."""
    is_int = hasattr(value, "__index__") and not isinstance(value, bool)  # int and numpy integers
    if not is_int or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_finite(name: str, value) -> float:
    """``value`` as a finite real number, or a ConfigError naming the option (a string, bool or list is refused)."""
    try:
        ok = hasattr(value, "__float__") and not isinstance(value, (str, bytes, bool)) and math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):  # 10**400, an array of several values
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class FieldError(LrmError):
    """A triplane or field holds values that cannot be meshed (NaN / inf)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch reports failed allocations as RuntimeError (torch.cuda.OutOfMemoryError is one), not MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in ("out of memory", "can't allocate memory",
                                                                     "not enough memory"))
