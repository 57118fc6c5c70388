"""Image loading and family-specific preprocessing (image file -> encoder input tensor).

Two stages, kept separate so each can be checked against the reference fixtures:

1. *Framing* (uint8/RGBA space): find the foreground (alpha, a removed uniform background, or
   rembg), optionally crop/pad it (TripoSR ``resize_foreground``) or recentre it (OpenLRM Gradio),
   and composite it over the family's background colour.
2. *Model side* (float space): resize to the encoder's input size with the family's exact
   interpolation and normalise with the encoder's mean/std.

Reference pipelines reproduced bit-for-bit (see the fixtures README §3-§5, §9):

* TripoSR ``run.py``: ``resize_foreground(0.85)`` -> ``rgb*a + 0.5*(1-a)`` -> ``(x*255).astype(uint8)``
  (the saved ``input.png``) -> u8/255 -> bilinear, align_corners=False, antialias=True -> ImageNet
  mean/std.
* OpenLRM ``infer_single`` (v1.1 and v1.0): u8/255 -> ``rgb*a + (1-a)`` (white) in float -> bicubic,
  align_corners=True, no antialias -> clamp [0, 1]; v1.1 feeds that to DINOv2 as is, v1.0 normalises
  (mean = std = 0.5 for facebook/dino-vitb16).
"""
from __future__ import annotations

import ctypes
import io
import logging
import math
import re
import struct
import warnings
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

# facebook/dino-vitb16's processor values (OpenLRM v1.0); the smallest framing ratio (the C library checks the same)
from lrm_rt.config import DINO_VITB16_MEAN, DINO_VITB16_STD, MIN_FOREGROUND_RATIO
from lrm_rt.errors import ConfigError, ImageError
from lrm_rt.kernels import use_native

log = logging.getLogger(__name__)

Family = Literal["triposr", "openlrm"]
ResizeMode = Literal["bilinear_aa", "bicubic_ac"]
MaskSource = Literal["alpha", "uniform_background", "rembg", "none"]
BackgroundRemoval = Literal["auto", "uniform", "rembg", "off"]
Background = Union[float, Tuple[float, float, float]]

# Refuse images above this many pixels before decoding them (decompression-bomb guard). 8192^2 RGBA
# is 256 MiB as uint8 and 1 GiB once the float pipeline converts it; nothing an LRM needs (inputs are
# resized to <= 512 px) justifies more. Module-level so tests and callers can adjust it.
MAX_IMAGE_PIXELS = 8192 * 8192
# Files are read whole before decoding; no sane encoding of MAX_IMAGE_PIXELS needs more than this.
MAX_IMAGE_FILE_BYTES = 1 << 30
# Work-size bound: an image whose longer side exceeds this is box-reduced (premultiplied alpha) by an
# integer factor before masking, and so is one whose framed canvas would (framing pads to 1/foreground_ratio
# of the object). The float stages take ~48 bytes a canvas pixel, so an 8192 px photo framed at 0.5 would
# need over 10 GB; with the bound a whole reconstruction of one peaked at 1.6 GB. The network input is
# <= 512 px, so nothing it sees is lost; below the bound images are processed exactly as the references do.
MAX_WORK_SIDE = 4096
# An alpha channel is taken as the object's mask when at least this share of the pixels is less than half
# opaque (and at least one pixel is); fewer is an opaque image with stray soft pixels. Small enough that a
# 1-pixel transparent frame around an image at the size limit (4 / 8192 of its pixels) still counts.
MIN_TRANSPARENT_SHARE = 1e-4

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG/GIF/BMP header, for files Pillow refuses to identify.

    Pillow will not open zero-sized images at all, so without this a 0xN PNG would be reported as
    "not an image", which hides the actual problem.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    return None


def _too_large_message(path: PathLike, w: int, h: int) -> str:
    return (
        f"image is too large ({w}x{h} = {w * h} pixels, limit {MAX_IMAGE_PIXELS}; refusing to decode a "
        f"possible decompression bomb): {path}"
    )


def to_rgba_array(im: Image.Image, path: PathLike) -> np.ndarray:
    """Convert any Pillow mode to an (H, W, 4) uint8 RGBA array."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's own convert() clips high-bit-depth values to 255 instead of rescaling them, which
        # turns most 16-bit images white; rescale explicitly.
        a = np.asarray(im)
        if mode.startswith("I;16"):
            g = a.astype(np.float64) / 257.0
        elif mode == "I":
            # "I" (32-bit int) carries no bit depth: values that fit in 8 bits are taken as 8-bit,
            # up to 65535 as 16-bit (older Pillow opens 16-bit PNGs as "I"), else scaled by the max.
            vmax = float(a.max()) if a.size else 0.0
            scale = 1.0 if vmax <= 255 else 257.0 if vmax <= 65535 else vmax / 255.0
            g = a.astype(np.float64) / scale
        else:  # "F": [0, 1] floats are the common convention, otherwise assume 0..255
            ok = np.isfinite(a)
            if not ok.any():
                raise ImageError(f"float image has no finite pixel values (all NaN or inf): {path}")
            vmax = float(a[ok].max())
            g = np.where(ok, a, 0.0).astype(np.float64) * (255.0 if vmax <= 1.0 else 1.0)
        g = np.clip(np.rint(g), 0, 255).astype(np.uint8)
        out = np.empty(g.shape + (4,), dtype=np.uint8)
        out[..., :3] = g[..., None]
        out[..., 3] = 255
        key = im.info.get("transparency")
        if mode != "F" and isinstance(key, int) and not isinstance(key, bool):
            # a 16-bit grey PNG's tRNS key, which convert() would drop: compared at full depth, as PNG defines it
            out[a == key, 3] = 0
        if mode == "F" and not ok.all():
            # NaN / inf in a float image is "no data" (e.g. a depth or masked scan): transparent, not black.
            out[~ok, 3] = 0
            log.warning("%s: %d of %d pixels are NaN or inf; treated as transparent", path, int((~ok).sum()), ok.size)
        return out
    try:
        # Handles palette/L/RGB "transparency" entries (tRNS) as alpha, CMYK, YCbCr, LA, ...
        rgba = im.convert("RGBA")
    except ValueError:
        try:  # modes without a direct RGBA conversion (e.g. "La") usually have one to RGB
            rgba = im.convert("RGB").convert("RGBA")
        except (ValueError, OSError) as e:
            raise ImageError(f"unsupported colour mode {mode!r} ({_one_line(e)}): {path}") from e
    return np.array(rgba, dtype=np.uint8)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 4) uint8 RGBA array (alpha 255 when the file has none).

    Accepts every Pillow mode (L, LA, I;16, I, F, P with transparency, CMYK, YCbCr, RGB, RGBA, ...)
    and applies the EXIF orientation. Raises ``ImageError`` for a missing file, a non-image, a
    truncated/corrupt file (the image is fully decoded here, not lazily), a zero-sized image, an image
    above ``MAX_IMAGE_PIXELS``, or an alpha channel that is entirely 0.
    """
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte in it
        why = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)  # without the name
        shown = repr(str(path)) if "\0" in str(path) else str(path)
        shown = shown if len(shown) <= 200 else f"{shown[:100]}...{shown[-60:]}"
        raise ImageError(f"cannot read image file ({why}): {shown}") from None
    if p.is_dir():
        raise ImageError(f"image path is a directory, not a file: {path}")
    if not p.is_file():  # a FIFO would block the read forever, a device (/dev/zero) never end
        raise ImageError(f"image path is not a regular file: {path}")
    size = p.stat().st_size
    if size > MAX_IMAGE_FILE_BYTES:
        raise ImageError(f"image file is too large ({size} bytes, limit {MAX_IMAGE_FILE_BYTES}): {path}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image file ({_one_line(e)}): {path}") from e
    if not data:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    return decode_image(data, path)


def decode_image(data: bytes, path: PathLike = "<bytes>") -> np.ndarray:
    """``load_image`` on the bytes of an image file (e.g. an upload); ``path`` names it in errors."""
    if not data:
        raise ImageError(f"image is empty (0 bytes): {path}")
    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise ImageError(f"image file is too large ({len(data)} bytes, limit {MAX_IMAGE_FILE_BYTES}): {path}")
    if data[:2] == b"P7":
        return _checked_rgba(decode_pam(data, path), path)
    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) above its own limit; our stricter check below
        # replaces that warning with an error.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            size = _header_size(data)
            if size is not None:
                raise ImageError(_too_large_message(path, *size)) from e
            raise ImageError(f"image is too large (decompression-bomb guard: {_one_line(e)}): {path}") from e
        except UnidentifiedImageError as e:
            size = _header_size(data)
            if size is not None and (size[0] == 0 or size[1] == 0):
                raise ImageError(f"image has zero size ({size[0]}x{size[1]}): {path}") from e
            raise ImageError(f"not a recognised image file (cannot identify format): {path}") from e
        except Exception as e:  # malformed headers surface as assorted exception types
            raise ImageError(f"cannot open image ({_one_line(e)}): {path}") from e

        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError(f"image has zero size ({w}x{h}): {path}")
        if w * h > MAX_IMAGE_PIXELS:
            raise ImageError(_too_large_message(path, w, h))

        # Pillow decodes lazily and, with LOAD_TRUNCATED_IMAGES set (some libraries set it globally),
        # silently pads truncated files with black; force a strict, complete decode here.
        prev = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        except MemoryError as e:
            raise ImageError(f"not enough memory to decode image ({w}x{h}): {path}") from e
        except Image.DecompressionBombError as e:
            raise ImageError(_too_large_message(path, w, h)) from e
        except Exception as e:
            raise ImageError(f"image data is truncated or corrupt ({_one_line(e)}): {path}") from e
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = prev

    try:  # counting the frames seeks through them: a damaged later frame must not fail the decoded first one
        frames = getattr(im, "n_frames", 1)
    except Exception:
        frames = 1
    if frames > 1:
        log.warning("%s has %d frames (animation or pages): using the first", path, frames)
    key = im.info.get("transparency")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[24:26] == b"\x10\x02" and isinstance(key, tuple):
        # A 16-bit RGB PNG's tRNS key holds 16-bit values, which Pillow compares with the 8-bit colours it decodes
        # (other pixels turned transparent, the keyed ones not): compare at 8 bits, the key's high bytes.
        im.info["transparency"] = tuple(int(v) >> 8 for v in key)
    return image_to_rgba(im, path)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that shows the image upright


def image_to_rgba(im: Image.Image, source: PathLike = "<PIL image>") -> np.ndarray:
    """A Pillow image (any mode) -> (H, W, 4) uint8 RGBA with the EXIF orientation applied."""
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(_too_large_message(source, w, h))
    # The orientation Pillow reads (EXIF, else XMP), applied here rather than by ImageOps.exif_transpose, which also
    # rewrites the EXIF block afterwards and fails on blocks it reads but cannot write back (a turned image kept as
    # stored). The C loader reads the orientation by the same rules.
    try:
        method = _TRANSPOSE.get(im.getexif().get(0x0112))
    except Exception as e:  # a broken EXIF block should not make a decodable image unusable
        log.warning("ignoring unreadable EXIF orientation of %s: %s", source, _one_line(e))
        method = None
    if method is not None:
        im = im.transpose(method)

    return _checked_rgba(to_rgba_array(im, source), source)


def _checked_rgba(rgba: np.ndarray, source: PathLike) -> np.ndarray:
    if rgba.ndim != 3 or rgba.shape[0] == 0 or rgba.shape[1] == 0:
        raise ImageError(f"image has zero size: {source}")
    if rgba[..., 3].max() == 0:
        raise ImageError(f"alpha channel is empty (every pixel fully transparent): {source}")
    return rgba


def _header_number(text: bytes) -> int:
    """A PAM header value as C's strtoll reads it (leading blanks, a sign, digits; 0 when there are none)."""
    m = re.match(rb"\s*([+-]?)0*(\d+)", text)
    if not m:
        return 0
    limit = 2**63 - 1  # strtoll saturates (and int() of over 4300 digits would raise)
    value = limit if len(m.group(2)) > 19 else min(int(m.group(2)), limit)
    return -value if m.group(1) == b"-" else value


def decode_pam(data: bytes, path: PathLike = "<bytes>") -> np.ndarray:
    """A PAM (P7) file, which Pillow does not read, as the C library decodes it: depth 1-4 (grey, grey + alpha,
    RGB, RGBA; TUPLTYPE not needed), maxval up to 65535 (two bytes per sample above 255, scaled to 0..255)."""
    fields, i = {}, 2
    while True:
        end = data.find(b"\n", i)
        if end < 0:
            raise ImageError(f"PAM header is truncated: {path}")
        line, i = data[i:end].removesuffix(b"\r"), end + 1
        if line == b"ENDHDR":
            break
        if line and not line.startswith(b"#"):
            key, _, value = line.partition(b" ")
            fields[key] = value
    w, h, depth, maxval = (_header_number(fields.get(k, b"")) for k in (b"WIDTH", b"HEIGHT", b"DEPTH", b"MAXVAL"))
    if w <= 0 or h <= 0:
        raise ImageError(f"image has zero size ({w}x{h}): {path}")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(_too_large_message(path, w, h))
    if not (1 <= maxval <= 65535 and 1 <= depth <= 4):
        raise ImageError(f"unsupported PNM variant (depth {depth}, maxval {maxval}): {path}")
    dtype = np.dtype(">u2" if maxval > 255 else "u1")
    if len(data) - i < w * h * depth * dtype.itemsize:
        raise ImageError(f"image data is truncated or corrupt (PNM samples end early): {path}")
    v = np.frombuffer(data, dtype, w * h * depth, i).reshape(h, w, depth)
    if maxval != 255:  # the C loader's rounding: lrint(min(v, maxval) * 255 / maxval), halves to even
        v = np.rint(np.minimum(v, maxval).astype(np.float64) * 255.0 / maxval)
    v = v.astype(np.uint8)
    rgba = np.empty((h, w, 4), np.uint8)
    rgba[..., :3] = v[..., :1] if depth <= 2 else v[..., :3]
    rgba[..., 3] = v[..., -1] if depth in (2, 4) else 255
    return rgba


# --------------------------------------------------------------------------------------------------
# Foreground mask
# --------------------------------------------------------------------------------------------------


@dataclass
class ForegroundResult:
    """RGBA image whose alpha is the foreground mask, and where that mask came from."""

    rgba: np.ndarray
    mask_source: MaskSource
    warnings: List[str] = field(default_factory=list)


def _border_pixels(rgb: np.ndarray, width: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    width = max(1, min(width, h // 2, w // 2)) if min(h, w) >= 2 else 1
    parts = [rgb[:width], rgb[-width:], rgb[:, :width], rgb[:, -width:]]
    return np.concatenate([q.reshape(-1, 3) for q in parts], axis=0)


# RGB -> (Y, Cb, Cr) rows (BT.601, as JPEG uses).
_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32
)
# JPEG stores chroma at half resolution, so saturated objects bleed colour 2-4 px into the background;
# counting chroma at half weight keeps that halo out of the mask while luminance edges stay sharp.
_CHROMA_WEIGHT = 0.5


def _colour_distance(rgb: np.ndarray, colour: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Distance of each pixel to ``colour`` in luma/half-weighted-chroma space (0-255 scale). uint8 pixels go to
    cuda/image_ops.cu when built (shared with the C library; 12 MP in 0.05 s instead of 0.6 s); this numpy
    version is the reference (its matmul rounds as the kernel's product and two fused multiply-adds do)."""
    if rgb.dtype == np.uint8 and use_native(backend):
        from .kernels import native_entry

        pix = rgb.reshape(-1, 3)  # a view where it can be (the RGB of an RGBA image: 4 bytes apart)
        if pix.strides[1] != 1 or pix.strides[0] < 3:
            pix = np.ascontiguousarray(pix)
        out = np.empty(len(pix), np.float32)
        c = np.ascontiguousarray(colour, np.float32)
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        if native_entry("lrm_colour_distance", [vp, i64, i64, vp, vp])(
                pix.ctypes.data, len(pix), pix.strides[0], c.ctypes.data, out.ctypes.data) != 0:
            raise ValueError("lrm_colour_distance failed")
        return out.reshape(rgb.shape[:-1])
    diff = (rgb.astype(np.float32) - colour.astype(np.float32)) @ _YCBCR.T
    diff[..., 1:] *= _CHROMA_WEIGHT
    return np.sqrt((diff * diff).sum(axis=-1))


def estimate_uniform_background(
    rgb: np.ndarray, uniform_tolerance: float = 24.0, min_inlier_fraction: float = 0.85
) -> Optional[Tuple[np.ndarray, float]]:
    """Background colour and noise level from the image border, or None if the border is not uniform.

    The border is "uniform" when at least ``min_inlier_fraction`` of its pixels lie within
    ``uniform_tolerance`` (``_colour_distance``, 0-255 scale) of the border's median colour; the
    fraction is below 1 so that objects touching one edge (a building on its ground line) still qualify.
    """
    border = _border_pixels(rgb, max(1, min(rgb.shape[:2]) // 100)).astype(np.float32)
    colour = np.median(border, axis=0)
    dist = _colour_distance(border, colour)
    inliers = dist <= uniform_tolerance
    if inliers.mean() < min_inlier_fraction:
        return None
    # Robust noise scale of the background (JPEG ringing, gradients) to set the mask tolerance.
    noise = float(np.percentile(dist[inliers], 95)) if inliers.any() else 0.0
    return colour, noise


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _reconstruct(seed: torch.Tensor, allowed: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """Morphological reconstruction: grow ``seed`` (8-connected) inside ``allowed`` until stable."""
    cur = seed * allowed
    while True:
        prev = cur
        for _ in range(check_every):
            cur = _max3x3(cur) * allowed
        if torch.equal(cur, prev):
            return cur


def _border_seed(like: torch.Tensor) -> torch.Tensor:
    seed = torch.zeros_like(like)
    seed[..., 0, :] = 1
    seed[..., -1, :] = 1
    seed[..., :, 0] = 1
    seed[..., :, -1] = 1
    return seed


def _mask_op(name: str, mask: np.ndarray, *args: int) -> np.ndarray:
    """lrm_border_fill / lrm_mask_dilate / lrm_mask_erode (cuda/image_ops.cu) on a boolean (H, W) mask."""
    from .kernels import native_entry

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    out = np.empty_like(m)
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = native_entry(name, [vp, i64, i64] + [ctypes.c_int32] * len(args) + [vp])
    st = fn(m.ctypes.data, m.shape[0], m.shape[1], *args, out.ctypes.data)
    if st == -3:
        raise MemoryError(f"no memory for the background mask of a {m.shape[1]}x{m.shape[0]} image")
    if st != 0:
        raise ValueError(f"{name} failed with status {st}")
    return out.view(bool)


def _border_connected(candidate: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Pixels of ``candidate`` connected (8-neighbourhood) to the image border: a flood fill."""
    if use_native(backend):
        return _mask_op("lrm_border_fill", candidate)
    return _border_connected_torch(candidate)


def _border_connected_torch(candidate: np.ndarray) -> np.ndarray:
    """Coarse-to-fine over a pyramid so a large image needs few iterations per level: a fill over
    blocks that are entirely candidate is a subset of the true region, so growing from it at the next
    finer level converges to exactly the same region, just faster."""
    allowed = torch.from_numpy(candidate.astype(np.float32))[None, None]
    h, w = candidate.shape
    k = 1
    while max(h, w) // (2 * k) >= 96:
        k *= 2
    region: Optional[torch.Tensor] = None
    while k >= 1:
        hp, wp = math.ceil(h / k) * k, math.ceil(w / k) * k
        padded = F.pad(allowed, (0, wp - w, 0, hp - h), value=1.0)  # outside the image counts as background
        level_allowed = -F.max_pool2d(-padded, k) if k > 1 else padded  # block allowed only if all pixels are
        seed = _border_seed(level_allowed)
        if region is not None:
            up = region.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            seed = torch.maximum(seed, up[..., : seed.shape[2], : seed.shape[3]])
        region = _reconstruct(seed, level_allowed)
        k //= 2
    assert region is not None
    return region[0, 0, :h, :w].numpy() > 0.5


def remove_uniform_background(
    rgba: np.ndarray,
    uniform_tolerance: float = 24.0,
    min_inlier_fraction: float = 0.85,
    edge_width: int = 2,
    backend: str = "auto",
) -> Optional[np.ndarray]:
    """Alpha mask (H, W) uint8 separating the object from a near-uniform background, or None.

    No model weights: the background colour is the border median; the background is the region of
    pixels within the noise tolerance of that colour that is connected to the border (so regions inside
    the object that happen to match the background colour are kept, and shading does not leak); a band
    of ``edge_width`` pixels around it gets a soft alpha ramp on colour distance (anti-aliased edges);
    isolated specks are dropped.
    """
    rgb = rgba[..., :3]
    est = estimate_uniform_background(rgb, uniform_tolerance, min_inlier_fraction)
    if est is None:
        return None
    colour, noise = est
    native = use_native(backend)
    dist = _colour_distance(rgb, colour, "native" if native else "reference")
    lo = max(6.0, 1.5 * noise + 2.0)  # below: background noise (JPEG ringing, dithering)
    hi = lo + 40.0  # edge pixels between lo and hi are partial mixes of object and background
    core = _border_connected(dist < lo, "native" if native else "reference")
    if native:
        band = _mask_op("lrm_mask_dilate", core, edge_width)
    else:
        core_t = torch.from_numpy(core.astype(np.float32))[None, None]
        band = F.max_pool2d(core_t, 2 * edge_width + 1, stride=1, padding=edge_width)[0, 0].numpy() > 0.5
    ramp = np.clip((dist - lo) / (hi - lo), 0.0, 1.0)
    alpha = np.where(core, 0.0, np.where(band, ramp, 1.0)).astype(np.float32)

    # Clean-up: an opening (erode, dilate) of the solid foreground removes specks of noise; keep the
    # soft pixels that touch what survived (the object's own anti-aliased edge).
    if native:
        opened = _mask_op("lrm_mask_dilate", _mask_op("lrm_mask_erode", alpha >= 0.5, 1), 1)
        near = _mask_op("lrm_mask_dilate", opened, 2)
    else:
        solid = torch.from_numpy((alpha >= 0.5).astype(np.float32))[None, None]
        opened = _max3x3(-_max3x3(-solid))
        near = _max3x3(_max3x3(opened))[0, 0].numpy() > 0.5
    alpha = np.where(near, alpha, 0.0)
    return np.rint(alpha * 255.0).astype(np.uint8)


_REMBG_SESSION = None


def _rembg_available() -> bool:
    try:
        import rembg  # noqa: F401
    except Exception:
        return False
    return True


def _rembg_alpha(rgba: np.ndarray) -> np.ndarray:
    """Alpha from rembg's default model (optional dependency; may download weights on first use)."""
    global _REMBG_SESSION
    import rembg

    if _REMBG_SESSION is None:
        _REMBG_SESSION = rembg.new_session()
    out = rembg.remove(Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB"), session=_REMBG_SESSION)
    return np.array(out.convert("RGBA"), dtype=np.uint8)[..., 3]


def foreground(rgba: np.ndarray, removal: BackgroundRemoval = "auto", source: str = "<array>") -> ForegroundResult:
    """Decide the foreground mask and return it as the alpha channel.

    * alpha with any value < 255 -> used as is ("alpha"), like both references, when it separates
      something: an alpha with no pixel at least half opaque is an error (nothing to reconstruct), one
      with under ``MIN_TRANSPARENT_SHARE`` of the pixels less than half opaque (an opaque photo saved with
      a stray soft pixel) is ignored with a warning, so the background is still found from the colours;
    * otherwise ("auto"): a uniform background is removed without weights ("uniform_background"); if
      the background is not uniform, rembg is used when importable ("rembg"); else the whole image is
      kept ("none") with a warning, because framing and compositing then cannot isolate the object.
    ``removal`` = "uniform" / "rembg" forces one method, "off" keeps the image as is ("none").
    """
    _check_rgba(rgba, source)
    msgs: List[str] = []
    alpha = rgba[..., 3]
    if alpha.min() < 255:
        solid = alpha >= 128
        if not solid.any():
            raise ImageError(f"alpha channel has no pixel at least half opaque (max alpha {int(alpha.max())}): "
                             f"nothing to reconstruct: {source}")
        see_through = alpha.size - int(np.count_nonzero(solid))
        if removal == "off" or see_through >= max(1, MIN_TRANSPARENT_SHARE * alpha.size):
            return ForegroundResult(rgba, "alpha", msgs)
        msgs.append(f"alpha channel is opaque almost everywhere ({see_through} of {alpha.size} pixels under "
                    f"half opaque): ignored, the background is found from the colours instead: {source}")
        rgba = _with_alpha(rgba, np.full_like(alpha, 255))
    if removal == "off":
        return ForegroundResult(rgba, "none", msgs)

    if removal in ("auto", "uniform"):
        alpha = remove_uniform_background(rgba)
        if alpha is not None:
            if alpha.max() == 0:
                raise ImageError(f"no foreground found: the image is a single uniform colour: {source}")
            return ForegroundResult(_with_alpha(rgba, alpha), "uniform_background", msgs)
        if removal == "uniform":
            msgs.append(f"background is not uniform, kept the whole image as foreground: {source}")
            return _none_with_warning(rgba, msgs)

    if _rembg_available():
        try:
            alpha = _rembg_alpha(rgba)
        except Exception as e:  # e.g. model download impossible offline
            msgs.append(f"rembg failed ({_one_line(e)}), kept the whole image as foreground: {source}")
            return _none_with_warning(rgba, msgs)
        if alpha.max() == 0:
            raise ImageError(f"no foreground found (rembg removed everything): {source}")
        return ForegroundResult(_with_alpha(rgba, alpha), "rembg", msgs)

    if removal == "rembg":
        msgs.append(f"rembg is not installed, kept the whole image as foreground: {source}")
    else:
        msgs.append(
            f"background is not uniform and rembg is not installed: the whole image is used as foreground "
            f"(pass an RGBA image with alpha, or install rembg): {source}"
        )
    return _none_with_warning(rgba, msgs)


def _none_with_warning(rgba: np.ndarray, msgs: List[str]) -> ForegroundResult:
    # The warnings travel in the result (PreprocessResult.warnings); the CLI prints them once.
    return ForegroundResult(rgba, "none", msgs)


def _with_alpha(rgba: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = rgba.copy()
    out[..., 3] = alpha
    return out


def _check_rgba(rgba: np.ndarray, source: str) -> None:
    if not isinstance(rgba, np.ndarray) or rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        desc = f"{getattr(rgba, 'dtype', type(rgba).__name__)} {getattr(rgba, 'shape', '')}"
        raise ImageError(f"expected an (H, W, 4) uint8 RGBA array, got {desc}: {source}")
    if rgba.shape[0] == 0 or rgba.shape[1] == 0:
        raise ImageError(f"image has zero size ({rgba.shape[1]}x{rgba.shape[0]}): {source}")


# --------------------------------------------------------------------------------------------------
# Framing (uint8 space)
# --------------------------------------------------------------------------------------------------


def _alpha_box(rgba: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """(first row, last row, first column, last column) holding alpha > 0, or None when none does."""
    mask = rgba[..., 3] > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def resize_foreground(rgba: np.ndarray, ratio: float, source: str = "<array>") -> np.ndarray:
    """TripoSR's framing: crop to the alpha > 0 box, pad to a square, pad so the object spans ``ratio``.

    Reproduces the reference's integer arithmetic exactly, including its exclusive box maximum (the last
    foreground row and column are dropped) and ``int(side / ratio)`` for the final size; padding is
    transparent black and split with the extra pixel at the bottom/right.
    """
    box = _alpha_box(rgba)
    if box is None:
        raise ImageError(f"alpha channel is empty (every pixel fully transparent): {source}")
    y0, y1, x0, x1 = box
    if y1 <= y0 or x1 <= x0:
        raise ImageError(f"foreground is too small to frame (under 2 pixels wide or tall): {source}")
    crop = rgba[y0:y1, x0:x1]  # exclusive max, as the reference
    h, w = crop.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    new_side = int(side / ratio)
    off = (new_side - side) // 2
    out = np.zeros((new_side, new_side, 4), dtype=np.uint8)
    out[off + top : off + top + h, off + left : off + left + w] = crop
    return out


def recenter(rgba: np.ndarray, size: int = 512, border_ratio: float = 0.2, source: str = "<array>") -> np.ndarray:
    """OpenLRM Gradio-style recentring: object scaled to ``(1 - border_ratio) * size`` on its longer side,
    centred on a transparent ``size`` x ``size`` canvas.

    The Gradio app uses OpenCV INTER_AREA; here Pillow's box filter (area average, on premultiplied
    alpha so transparent pixels do not darken the edge) shrinks and bilinear enlarges. Not bit-exact
    with the app (which also pre-resizes to 1024 px), which is fine: no reference tensor depends on it.
    """
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if ys.size == 0:
        raise ImageError(f"alpha channel is empty (every pixel fully transparent): {source}")
    crop = rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape[:2]
    target = int(size * (1.0 - border_ratio))
    scale = target / max(h, w)
    h2, w2 = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    resample = Image.Resampling.BOX if scale < 1.0 else Image.Resampling.BILINEAR
    resized = np.array(Image.fromarray(np.ascontiguousarray(crop), "RGBA").resize((w2, h2), resample), dtype=np.uint8)
    out = np.zeros((size, size, 4), dtype=np.uint8)
    top, left = (size - h2) // 2, (size - w2) // 2
    out[top : top + h2, left : left + w2] = resized
    return out


def _per_pair(formula, rgba: np.ndarray, background: Background) -> np.ndarray:
    """``formula(rgba, background)``, a per-pixel uint8 composite, evaluated once per (colour, alpha) pair and
    looked up for a large image (a 4096^2 canvas: ~0.2 s instead of ~1.6 s), bit for bit the same."""
    if rgba.shape[0] * rgba.shape[1] < 1 << 17:
        return formula(rgba, background)
    return _composite_with_table(rgba, formula(_pair_image(), background)[0].T.copy())


def _composite_with_table(rgba: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 = table[channel, alpha * 256 + colour]."""
    h, w = rgba.shape[:2]
    flat = rgba.reshape(-1, 4)
    out = np.empty((h * w, 3), np.uint8)
    step = 1 << 20  # bounds the int64 index temporaries to ~8 MB
    for i in range(0, h * w, step):
        a = flat[i : i + step, 3].astype(np.intp) << 8
        for c in range(3):
            out[i : i + step, c] = table[c][a | flat[i : i + step, c]]
    return out.reshape(h, w, 3)


def _pair_image() -> np.ndarray:
    """Every (alpha, colour) pair as one (1, 65536, 4) uint8 image, alpha-major: a formula applied to it gives the
    table ``_composite_with_table`` reads."""
    a, c = np.divmod(np.arange(65536), 256)
    return np.stack([c, c, c, a], -1).astype(np.uint8)[None]


def _composite_uint8_direct(rgba: np.ndarray, background: Background) -> np.ndarray:
    x = rgba.astype(np.float32) / 255.0
    a = x[..., 3:4]
    bg = float(background) if np.isscalar(background) else np.asarray(background, dtype=np.float32)
    rgb = x[..., :3] * a + (1 - a) * bg
    return (rgb * 255.0).astype(np.uint8)


def composite_uint8(rgba: np.ndarray, background: Background = 0.5) -> np.ndarray:
    """TripoSR's ``rgb*a + bg*(1-a)`` in float32, then ``(x*255).astype(uint8)`` (truncation, not rounding).

    Operation order and dtypes follow ``run.py`` so the result is bit-identical to its ``input.png``.
    """
    return _per_pair(_composite_uint8_direct, rgba, background)


def _display_openlrm_direct(rgba: np.ndarray, background: Background) -> np.ndarray:
    x = rgba.astype(np.float32) / 255.0
    bg = np.float32(background) if np.isscalar(background) else np.asarray(background, np.float32)
    return np.clip(np.rint((x[..., :3] * x[..., 3:] + (1 - x[..., 3:]) * bg) * 255.0), 0, 255).astype(np.uint8)


def display_openlrm(rgba: np.ndarray, background: Background = 1.0) -> np.ndarray:
    """OpenLRM's float composite ``rgb*a + bg*(1-a)`` rounded to uint8: for display only (the model side
    composites in float)."""
    return _per_pair(_display_openlrm_direct, rgba, background)


# --------------------------------------------------------------------------------------------------
# Model side (float space)
# --------------------------------------------------------------------------------------------------


def resize_uint8_bilinear_aa(rgb: np.ndarray, size: int) -> torch.Tensor:
    """TripoSR ``ImagePreprocessor``: u8/255 -> bilinear (align_corners=False, antialias=True).

    Returns (1, 3, size, size) float32 in [0, 1] (the reference's ``rgb_cond`` is the same data
    channel-last: ``out.permute(0, 2, 3, 1)[:, None]``).
    """
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2)
    x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def composite_resize_bicubic(rgba: np.ndarray, size: int, background: Background = 1.0) -> torch.Tensor:
    """OpenLRM ``infer_single``: u8/255 NCHW -> ``rgb*a + bg*(1-a)`` -> bicubic (align_corners=True,
    no antialias) -> clamp [0, 1]. Returns (1, 3, size, size) float32.

    Compositing happens in float before resizing (unlike TripoSR), so the uint8 composite is not an
    intermediate here.
    """
    h, w = rgba.shape[:2]
    rows, cols = _bicubic_taps(h, size), _bicubic_taps(w, size)
    if h * w < 1 << 20 or len(rows) * len(cols) * 4 > h * w:
        x = _composite_float(rgba, background)
    else:
        # Downscaling reads 4 x 4 source pixels per output pixel: composite only the rows and columns it can
        # read, through the (colour, alpha) table, into a zero image (pixels it never reads stay 0). A 4096^2
        # canvas to 128 px: ~0.05 s instead of ~0.6 s, the same bits.
        table = _composite_float(_pair_image(), background)[0, :, 0, :].numpy()  # (3, 65536): alpha-major pairs
        sub = rgba[np.ix_(rows, cols)]
        a = sub[..., 3].astype(np.intp) << 8
        xn = np.zeros((3, h, w), np.float32)
        for c in range(3):
            xn[c][np.ix_(rows, cols)] = table[c][a | sub[..., c]]
        x = torch.from_numpy(xn)[None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    return torch.clamp(x, 0, 1).contiguous()


def _composite_float(rgba: np.ndarray, background: Background) -> torch.Tensor:
    """OpenLRM's float composite as (1, 3, H, W): ``u8/255``, then ``rgb*a + bg*(1-a)``."""
    x = torch.from_numpy(np.ascontiguousarray(rgba)).permute(2, 0, 1).unsqueeze(0) / 255.0
    a = x[:, 3:]
    if np.isscalar(background):
        bg: Union[float, torch.Tensor] = float(background)
    else:
        bg = torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1)
    # "+ (1 - a) * 1.0" is exact, so the white case is bit-identical to the reference "+ (1 - a)".
    return x[:, :3] * a + (1 - a) * bg


def _bicubic_taps(n: int, size: int) -> np.ndarray:
    """Source indices (sorted, unique) that an align_corners bicubic resize of n samples to ``size`` may read:
    floor(position) - 1 .. + 2, one more each side as torch computes the position in float."""
    pos = np.floor(np.arange(size) * ((n - 1) / max(size - 1, 1))).astype(np.int64)
    return np.unique(np.clip(pos[:, None] + np.arange(-2, 4), 0, n - 1))


def normalize(x: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> torch.Tensor:
    """``(x - mean) / std`` per channel on an NCHW tensor; identity when mean/std are None."""
    if mean is None and std is None:
        return x
    m = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0), dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std if std is not None else (1.0, 1.0, 1.0), dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------------
# Configured pipeline
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessConfig:
    """How one model family turns an RGBA image into encoder input.

    family: "triposr" composites to uint8 first (its saved ``input.png``) then resizes; "openlrm"
        composites in float and resizes in one go (its ``infer_single``).
    input_size: encoder input side (TripoSR ``cond_image_size``, OpenLRM ``source_size``).
    foreground_ratio: crop to the object and pad so it spans this share of the side (TripoSR ``resize_foreground``,
        0.85 in ``run.py``; also lrm-tiny's framing, 0.5), None = no cropping.
    background: compositing colour in [0, 1] (0.5 TripoSR, 1.0 OpenLRM); scalar or RGB triple.
    resize: "bilinear_aa" (TripoSR) or "bicubic_ac" (OpenLRM).
    mean, std: encoder normalisation; None = feed [0, 1] (OpenLRM v1.1's DINOv2).
    recenter: OpenLRM Gradio recentring (object at ``1 - recenter_border`` of the side); off by default
        because the reference CLI does not do it.
    background_removal: "auto" | "uniform" | "rembg" | "off", used only when the alpha is all 255.
    """

    family: Family
    input_size: int
    foreground_ratio: Optional[float] = None
    background: Background = 0.5
    resize: ResizeMode = "bilinear_aa"
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    recenter: bool = False
    recenter_border: float = 0.2
    recenter_size: int = 512
    background_removal: BackgroundRemoval = "auto"

    def __post_init__(self) -> None:
        if self.family not in ("triposr", "openlrm"):
            raise ConfigError(f"unknown preprocessing family {self.family!r} (expected 'triposr' or 'openlrm')")
        if int(self.input_size) != self.input_size or self.input_size < 1:
            raise ConfigError(f"input_size must be a positive integer, got {self.input_size!r}")
        ratio = self.foreground_ratio
        if ratio is not None and not (isinstance(ratio, (int, float, np.floating)) and not isinstance(ratio, bool)
                                      and MIN_FOREGROUND_RATIO <= ratio <= 1.0):
            raise ConfigError(f"foreground_ratio must be in [{MIN_FOREGROUND_RATIO}, 1], got {self.foreground_ratio!r}")
        if self.recenter and self.foreground_ratio is not None:
            raise ConfigError(
                "choose either foreground_ratio (TripoSR framing) or recenter (OpenLRM framing), not both"
            )
        if not (0.0 <= self.recenter_border < 1.0):
            raise ConfigError(f"recenter_border must be in [0, 1), got {self.recenter_border!r}")
        if self.resize not in ("bilinear_aa", "bicubic_ac"):
            raise ConfigError(f"unknown resize mode {self.resize!r} (expected 'bilinear_aa' or 'bicubic_ac')")
        if self.background_removal not in ("auto", "uniform", "rembg", "off"):
            raise ConfigError(f"unknown background_removal {self.background_removal!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("mean and std must be given together")
        if self.std is not None and any(s == 0 for s in self.std):
            raise ConfigError("std must not contain 0")

    @classmethod
    def triposr(cls, input_size: int = 512, foreground_ratio: Optional[float] = 0.85, **kw) -> "PreprocessConfig":
        """TripoSR ``run.py`` defaults (real model: ``cond_image_size`` 512)."""
        return cls("triposr", input_size, foreground_ratio, 0.5, "bilinear_aa", IMAGENET_MEAN, IMAGENET_STD, **kw)

    @classmethod
    def openlrm_v11(cls, input_size: int = 224, **kw) -> "PreprocessConfig":
        """OpenLRM v1.1 ``infer_single`` (source_size 224/336/448 for small/base/large); no normalisation."""
        return cls("openlrm", input_size, None, 1.0, "bicubic_ac", None, None, **kw)

    @classmethod
    def openlrm_v10(
        cls,
        input_size: int = 224,
        mean: Tuple[float, float, float] = DINO_VITB16_MEAN,
        std: Tuple[float, float, float] = DINO_VITB16_STD,
        **kw,
    ) -> "PreprocessConfig":
        """OpenLRM v1.0: same image as v1.1, then the ViT processor's normalisation (0.5/0.5 for
        facebook/dino-vitb16; the tiny fixture uses ImageNet values)."""
        return cls("openlrm", input_size, None, 1.0, "bicubic_ac", mean, std, **kw)


@dataclass
class PreprocessResult:
    """Output of ``preprocess``.

    pixel_values: (1, 3, S, S) float32, normalised: what the image encoder consumes.
    rgb01: (1, 3, S, S) float32 in [0, 1] before normalisation (TripoSR ``rgb_cond`` channel-first,
        OpenLRM ``image``).
    display_rgb: (H, W, 3) uint8 composited, framed image before the model-side resize. For TripoSR this
        is exactly the reference ``input.png`` (and the tensor the model side starts from); for OpenLRM it
        is a rounded view for display only (the model side composites in float).
    framed_rgba: (H, W, 4) uint8 after foreground masking and framing.
    mask_source: "alpha" | "uniform_background" | "rembg" | "none".
    warnings: human-readable problems that did not stop preprocessing (e.g. background kept).
    """

    pixel_values: torch.Tensor
    rgb01: torch.Tensor
    display_rgb: Optional[np.ndarray]
    framed_rgba: Optional[np.ndarray]
    mask_source: MaskSource
    warnings: List[str] = field(default_factory=list)

    def model_inputs_only(self) -> "PreprocessResult":
        """A copy without the framed full-size images (None): what reconstruction needs. Up to ~100 MB less per
        large photo, for holding a batch's worth of preprocessed images at once."""
        return dataclasses.replace(self, display_rgb=None, framed_rgba=None)


def box_reduce(rgba: np.ndarray, factor: int, backend: str = "auto") -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (partial blocks at the right and bottom edges average what they
    hold). Alpha is the rounded mean; colour is the alpha-weighted mean, so transparent pixels' colours do not
    bleed into the object's edge. Integer arithmetic with round-half-up: cuda/image_ops.cu ("native", shared
    with the C library) and this numpy reference give the same bytes."""
    f = int(factor)
    h, w = rgba.shape[:2]
    out = np.empty((-(-h // f), -(-w // f), 4), np.uint8)
    if use_native(backend):
        from .kernels import native_entry

        src = np.ascontiguousarray(rgba, dtype=np.uint8)
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        if native_entry("lrm_box_reduce", [vp, i64, i64, i64, vp])(src.ctypes.data, h, w, f, out.ctypes.data) != 0:
            raise ValueError(f"lrm_box_reduce failed on a {w}x{h} image with factor {f}")
        return out
    tile = max(1, 1024 // f) * f  # tiles of whole blocks, about 1 Mpx: bounds the int64 temporaries
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            x = rgba[y0:y0 + tile, x0:x0 + tile].astype(np.int64)
            rows, cols = np.arange(0, x.shape[0], f), np.arange(0, x.shape[1], f)
            a = x[..., 3]
            sa = np.add.reduceat(np.add.reduceat(a, rows, axis=0), cols, axis=1)
            sca = np.add.reduceat(np.add.reduceat(x[..., :3] * a[..., None], rows, axis=0), cols, axis=1)
            n = np.minimum(f, x.shape[0] - rows)[:, None] * np.minimum(f, x.shape[1] - cols)[None, :]
            o = out[y0 // f:y0 // f + len(rows), x0 // f:x0 // f + len(cols)]
            o[..., 3] = (sa + n // 2) // n
            o[..., :3] = np.where(sa[..., None] > 0, (sca + sa[..., None] // 2) // np.maximum(sa, 1)[..., None], 0)
    return out


def reduce_large(rgba: np.ndarray, max_side: Optional[int] = None) -> np.ndarray:
    """``box_reduce`` an image whose longer side exceeds ``max_side`` (``MAX_WORK_SIDE``) by the smallest
    integer factor that brings it within. Smaller images are returned unchanged."""
    limit = MAX_WORK_SIDE if max_side is None else max_side
    factor = -(-max(rgba.shape[:2]) // limit)
    return box_reduce(rgba, factor) if factor > 1 else rgba


def _fit_canvas(rgba: np.ndarray, ratio: float) -> np.ndarray:
    """Reduce ``rgba`` so the canvas ``resize_foreground`` pads its object to stays within MAX_WORK_SIDE."""
    box = _alpha_box(rgba)
    if box is None:
        return rgba  # resize_foreground names the problem
    y0, y1, x0, x1 = box
    canvas = int(max(y1 - y0, x1 - x0) / ratio)
    return reduce_large(rgba, max(rgba.shape[:2]) * MAX_WORK_SIDE // canvas) if canvas > MAX_WORK_SIDE else rgba


def frame(rgba: np.ndarray, cfg: PreprocessConfig, source: str = "<array>") -> Tuple[np.ndarray, MaskSource, List[str]]:
    """Stage 1a: foreground mask + framing; returns (framed RGBA, mask source, warnings)."""
    fg = foreground(rgba, cfg.background_removal, source)
    msgs = list(fg.warnings)
    out = fg.rgba
    if fg.mask_source == "none":
        # Framing needs a mask; cropping to an all-opaque box would only drop a row and a column (the
        # reference's exclusive max), so skip it, like TripoSR's --no-remove-bg path.
        if (cfg.foreground_ratio is not None or cfg.recenter) and cfg.background_removal != "off":
            msgs.append(f"no foreground mask, object not re-framed: {source}")
        return out, fg.mask_source, msgs
    if cfg.foreground_ratio is not None:
        out = resize_foreground(_fit_canvas(out, cfg.foreground_ratio), cfg.foreground_ratio, source)
    elif cfg.recenter:
        out = recenter(out, cfg.recenter_size, cfg.recenter_border, source)
    return out, fg.mask_source, msgs


def preprocess(rgba: np.ndarray, cfg: PreprocessConfig, source: str = "<array>") -> PreprocessResult:
    """RGBA uint8 image (from ``load_image``) -> encoder input for ``cfg``'s model family.

    ``source`` names the image in error and warning messages (pass the file path).
    """
    _check_rgba(rgba, source)
    framed, mask_source, msgs = frame(reduce_large(rgba), cfg, source)

    if cfg.family == "triposr":
        # Opaque images with no mask go in unchanged (reference: Image.convert("RGB"), no composite,
        # whose truncating round-trip could otherwise shift some values by 1).
        if mask_source == "none":
            display = np.ascontiguousarray(framed[..., :3])
        else:
            display = composite_uint8(framed, cfg.background)
        rgb01 = _resize_rgb_uint8(display, cfg)
    else:
        rgb01 = _resize_rgba_float(framed, cfg)
        display = display_openlrm(framed, cfg.background)

    pixel_values = normalize(rgb01, cfg.mean, cfg.std).contiguous()
    return PreprocessResult(pixel_values, rgb01, display, framed, mask_source, msgs)


def _resize_rgb_uint8(rgb: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    if cfg.resize == "bilinear_aa":
        return resize_uint8_bilinear_aa(rgb, cfg.input_size)
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(cfg.input_size,) * 2, mode="bicubic", align_corners=True)
    return torch.clamp(x, 0, 1).contiguous()


def _resize_rgba_float(rgba: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    if cfg.resize == "bicubic_ac":
        return composite_resize_bicubic(rgba, cfg.input_size, cfg.background)
    x = torch.from_numpy(np.ascontiguousarray(rgba)).permute(2, 0, 1).unsqueeze(0) / 255.0
    bg = float(cfg.background) if np.isscalar(cfg.background) else torch.tensor(cfg.background).view(1, 3, 1, 1)
    x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:]) * bg
    return F.interpolate(x, (cfg.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True).contiguous()


def load_and_preprocess(path: PathLike, cfg: PreprocessConfig) -> PreprocessResult:
    """``load_image`` + ``preprocess`` with the path named in every message."""
    return preprocess(load_image(path), cfg, source=str(path))
