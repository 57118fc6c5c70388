"""Image loading and preprocessing: reference parity, robustness to odd files, background removal."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lrm_rt.preprocess as pp
from lrm_rt.errors import ConfigError, ImageError
from lrm_rt.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    composite_resize_bicubic,
    composite_uint8,
    decode_image,
    load_image,
    preprocess,
    resize_foreground,
    resize_uint8_bilinear_aa,
)

from conftest import SHARED

INPUTS = SHARED / "data" / "inputs"
INPUT_FILES = sorted(p for p in INPUTS.rglob("*") if p.is_file()) if INPUTS.is_dir() else []


@pytest.fixture(autouse=True)
def _no_rembg(monkeypatch):
    # rembg is optional; make every test independent of whether it happens to be installed.
    monkeypatch.setattr(pp, "_rembg_available", lambda: False)


# --------------------------------------------------------------------------------------------------
# Reference parity
# --------------------------------------------------------------------------------------------------


def test_fixture_png_loads_to_fixture_tensor(fixtures_dir, triposr_io, openlrm_io):
    rgba = load_image(fixtures_dir / "triposr_tiny_input.png")
    assert rgba.dtype == np.uint8 and rgba.shape == (300, 300, 4)
    np.testing.assert_array_equal(rgba, triposr_io["input_rgba_uint8"].numpy())
    other = load_image(fixtures_dir / "openlrm_tiny_input.png")
    np.testing.assert_array_equal(other, openlrm_io["input_rgba_uint8"].numpy())


def test_triposr_uint8_stage_is_bit_exact(fixtures_dir, triposr_io):
    rgba = triposr_io["input_rgba_uint8"].numpy()
    res = preprocess(rgba, PreprocessConfig.triposr(256))
    assert res.mask_source == "alpha" and res.warnings == []
    assert res.display_rgb.dtype == np.uint8 and res.display_rgb.shape == (221, 221, 3)
    np.testing.assert_array_equal(res.display_rgb, triposr_io["preprocessed_rgb_uint8"].numpy())
    saved = np.array(Image.open(fixtures_dir / "checkpoints" / "triposr-tiny" / "input_preprocessed.png"))
    np.testing.assert_array_equal(res.display_rgb, saved)
    # The two building blocks on their own.
    np.testing.assert_array_equal(composite_uint8(resize_foreground(rgba, 0.85), 0.5), saved)


def test_triposr_model_side_matches_rgb_cond_and_vit_input(triposr_io):
    # Stage 2 alone, from the reference's own uint8 image.
    rgb01 = resize_uint8_bilinear_aa(triposr_io["preprocessed_rgb_uint8"].numpy(), 256)
    cond = rgb01.permute(0, 2, 3, 1)[:, None]
    assert cond.shape == triposr_io["rgb_cond"].shape
    torch.testing.assert_close(cond, triposr_io["rgb_cond"], atol=1e-6, rtol=0)
    # Full pipeline from the RGBA input.
    res = preprocess(triposr_io["input_rgba_uint8"].numpy(), PreprocessConfig.triposr(256))
    assert res.pixel_values.shape == (1, 3, 256, 256) and res.pixel_values.dtype == torch.float32
    torch.testing.assert_close(res.rgb01.permute(0, 2, 3, 1)[:, None], triposr_io["rgb_cond"], atol=1e-6, rtol=0)
    torch.testing.assert_close(res.pixel_values, triposr_io["vit_pixel_values"], atol=1e-6, rtol=0)


def test_openlrm_v11_image(openlrm_io):
    rgba = openlrm_io["input_rgba_uint8"].numpy()
    torch.testing.assert_close(composite_resize_bicubic(rgba, 224, 1.0), openlrm_io["image"], atol=1e-6, rtol=0)
    res = preprocess(rgba, PreprocessConfig.openlrm_v11(224))
    assert res.mask_source == "alpha"
    assert res.pixel_values.shape == (1, 3, 224, 224)
    torch.testing.assert_close(res.pixel_values, openlrm_io["image"], atol=1e-6, rtol=0)  # no normalisation
    assert res.display_rgb.shape == (300, 300, 3)  # no reframing by default (reference CLI)


def test_openlrm_v10_image_and_normalisation(openlrm_io, openlrm_v10_io):
    rgba = openlrm_io["input_rgba_uint8"].numpy()  # same input.png for the v1.0 run
    res = preprocess(rgba, PreprocessConfig.openlrm_v10(224, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    torch.testing.assert_close(res.rgb01, openlrm_v10_io["image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(res.pixel_values, openlrm_v10_io["vit_pixel_values"], atol=1e-6, rtol=0)
    # Real v1.0 (facebook/dino-vitb16 processor): mean = std = 0.5 -> [-1, 1].
    real = preprocess(rgba, PreprocessConfig.openlrm_v10(224))
    torch.testing.assert_close(real.pixel_values, (openlrm_v10_io["image"] - 0.5) / 0.5, atol=1e-6, rtol=0)


@pytest.mark.parametrize("background", [0.5, 1.0, (0.2, 0.7, 1.0), 1 / 3])
def test_display_composites_by_table_equal_the_per_pixel_formulas(background):
    """Large images composite through a (colour, alpha) table: every pair, in an image big enough to take that
    path, must give what the float32 formula gives pixel by pixel (TripoSR's input.png is compared bit for bit)."""
    a, c = np.divmod(np.arange(65536), 256)
    pairs = np.stack([c, (c * 7) % 256, 255 - c, a], -1).astype(np.uint8)
    img = np.concatenate([pairs, pairs[::-1]]).reshape(512, 256, 4)
    assert img.shape[0] * img.shape[1] >= 1 << 17  # the table path
    np.testing.assert_array_equal(composite_uint8(img, background), pp._composite_uint8_direct(img, background))
    np.testing.assert_array_equal(pp.display_openlrm(img, background), pp._display_openlrm_direct(img, background))


@pytest.mark.parametrize("h,w,size,background", [(1600, 2500, 128, 1.0), (2047, 1601, 64, (0.2, 0.7, 1.0)),
                                                  (4096, 3000, 224, 1.0)])
def test_bicubic_composite_of_a_large_canvas_reads_only_its_taps_and_equals_the_full_one(h, w, size, background):
    """OpenLRM's composite-then-bicubic of a large canvas composites only the rows and columns the resize reads:
    bit for bit what compositing every pixel gives."""
    import torch.nn.functional as F

    rgba = np.random.default_rng(h).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rows, cols = pp._bicubic_taps(h, size), pp._bicubic_taps(w, size)
    assert len(rows) * len(cols) * 4 <= h * w  # the sparse path
    full = torch.clamp(F.interpolate(pp._composite_float(rgba, background), size=(size, size), mode="bicubic",
                                     align_corners=True), 0, 1)
    assert torch.equal(composite_resize_bicubic(rgba, size, background), full)


def test_resize_foreground_reference_arithmetic():
    # Alpha box rows 10..29, cols 5..44 inclusive -> exclusive max crops to 19 x 39.
    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[10:30, 5:45] = 255
    out = resize_foreground(rgba, 0.85)
    side = int(39 / 0.85)
    assert out.shape == (side, side, 4)
    ys, xs = np.nonzero(out[..., 3])
    off = (side - 39) // 2
    assert (xs.min(), xs.max()) == (off, off + 38)
    assert (ys.min(), ys.max()) == (off + 10, off + 10 + 18)  # (39 - 19) // 2 = 10 rows of square padding


def test_recenter_option_frames_object_at_80_percent():
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[20:80, 30:130] = (200, 30, 30, 255)
    cfg = PreprocessConfig.openlrm_v11(224, recenter=True)
    res = preprocess(rgba, cfg)
    assert res.framed_rgba.shape == (512, 512, 4)
    ys, xs = np.nonzero(res.framed_rgba[..., 3] > 127)
    assert abs((xs.max() - xs.min() + 1) - int(512 * 0.8)) <= 2  # longer side scaled to 409 px
    assert abs((xs.max() + xs.min()) / 2 - 255.5) <= 1.5 and abs((ys.max() + ys.min()) / 2 - 255.5) <= 1.5
    assert res.pixel_values.shape == (1, 3, 224, 224)
    # Off by default, so the reference CLI parity holds.
    assert PreprocessConfig.openlrm_v11(224).recenter is False


def test_config_validation():
    with pytest.raises(ConfigError):
        PreprocessConfig("nerf", 224)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PreprocessConfig.triposr(512, foreground_ratio=1.5)
    with pytest.raises(ConfigError):
        PreprocessConfig.triposr(512, recenter=True)
    with pytest.raises(ConfigError):
        PreprocessConfig("openlrm", 224, resize="nearest")  # type: ignore[arg-type]


def test_preprocess_rejects_non_rgba_arrays():
    with pytest.raises(ImageError, match="RGBA"):
        preprocess(np.zeros((8, 8, 3), np.uint8), PreprocessConfig.openlrm_v11(224), source="thing.png")
    with pytest.raises(ImageError, match="zero size"):
        preprocess(np.zeros((0, 8, 4), np.uint8), PreprocessConfig.openlrm_v11(224))


def test_tiny_foreground_is_an_error_not_an_empty_image():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[10, 10] = 255  # one pixel: the reference's exclusive box would be empty
    with pytest.raises(ImageError, match="too small"):
        preprocess(rgba, PreprocessConfig.triposr(64), source="dot.png")


# --------------------------------------------------------------------------------------------------
# Loader: odd but valid files are converted
# --------------------------------------------------------------------------------------------------


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 4, np.arange(w) * 3) % 256).astype(np.uint8)


def _check_rgba(a: np.ndarray, shape: tuple) -> None:
    assert a.dtype == np.uint8 and a.shape == shape + (4,)


def test_grayscale_L(tmp_path):
    g = _gradient()
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    a = load_image(tmp_path / "g.png")
    _check_rgba(a, g.shape)
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], g)
    assert (a[..., 3] == 255).all()


def test_grayscale_LA(tmp_path):
    g = _gradient()
    alpha = np.full_like(g, 255)
    alpha[:, :8] = 0
    Image.fromarray(np.stack([g, alpha], -1), "LA").save(tmp_path / "la.png")
    a = load_image(tmp_path / "la.png")
    _check_rgba(a, g.shape)
    np.testing.assert_array_equal(a[..., 0], g)
    np.testing.assert_array_equal(a[..., 3], alpha)


def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path):
    g16 = (_gradient().astype(np.uint16) * 257).astype(np.uint16)  # full 16-bit range
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a = load_image(tmp_path / "g16.png")
    _check_rgba(a, g16.shape)
    np.testing.assert_array_equal(a[..., 0], _gradient())  # not all-255 as Pillow's convert() would give


def _png16_rgb(pixels: np.ndarray, key) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one) with a tRNS colour key."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) +
            chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_colour_key_makes_the_keyed_pixels_transparent(tmp_path):
    """The key (200, 100, 50) in 16 bits is a near-black colour; Pillow compared it with the 8-bit colours and made
    the orange (200, 100, 50) pixels transparent instead, leaving the keyed ones opaque."""
    px = np.array([[[200, 100, 50], [200 * 257, 100 * 257, 50 * 257], [9000, 9000, 9000], [51200, 25600, 12800]]],
                  np.uint16)
    a = decode_image(_png16_rgb(px, (200, 100, 50)))
    np.testing.assert_array_equal(a[0, :, 3], [0, 255, 255, 255])
    np.testing.assert_array_equal(a[0, :, :3], px[0] >> 8)
    white = decode_image(_png16_rgb(px, (9000, 9000, 9000)))  # compared at the 8 bits kept: 9000 >> 8 == 35
    np.testing.assert_array_equal(white[0, :, 3], [255, 255, 0, 255])


def test_16bit_grey_colour_key_makes_the_keyed_pixels_transparent():
    """Pillow opens a 16-bit grey PNG as I;16 and keeps its tRNS key in info, which the rescaling path had ignored
    (the keyed pixels stayed opaque). Compared at full depth: 1001 shares 1000's high byte and stays opaque."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    px = np.array([[1000, 1001, 771, 60000, 1000]], np.uint16)
    raw = b"\x00" + px[0].astype(">u2").tobytes()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 1, 16, 0, 0, 0, 0)) +
            chunk(b"tRNS", struct.pack(">H", 1000)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    a = decode_image(data)
    np.testing.assert_array_equal(a[0, :, 3], [0, 255, 255, 255, 0])
    np.testing.assert_array_equal(a[0, :, 0], np.rint(px[0] / 257.0))


def test_pam_is_read_and_bad_pam_named():
    """PAM (the CLI takes .pam files; Pillow reads none) decoded as by the C library, bad headers refused."""
    head = b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 3\nMAXVAL 1023\nENDHDR\n"
    a = decode_image(head + np.array([0, 511, 1023, 100, 2000, 3], ">u2").tobytes(), "x.pam")
    np.testing.assert_array_equal(a[0], [[0, 127, 255, 255], [25, 255, 1, 255]])  # 511 * 255 / 1023 = 127.4
    for data, message in ((b"P7\nWIDTH 2\n", "PAM header is truncated"),
                          (head.replace(b"DEPTH 3", b"DEPTH 5"), r"unsupported PNM variant \(depth 5, maxval 1023\)"),
                          (head + b"\0\0", "PNM samples end early"),
                          (head.replace(b"WIDTH 2", b"WIDTH x"), r"zero size \(0x1\)"),
                          (head.replace(b"WIDTH 2\nHEIGHT 1", b"WIDTH 90000\nHEIGHT 90000"), "too large"),
                          (head.replace(b"WIDTH 2", b"WIDTH " + b"1" * 5000), "too large")):  # strtoll saturates
        with pytest.raises(ImageError, match=message):
            decode_image(data, "x.pam")


def test_damaged_later_frame_keeps_the_first():
    """Counting an animation's frames seeks through them: a GIF cut inside its second frame raised IndexError /
    struct.error from there (a traceback), though its first frame decodes."""
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    for cut in range(len(data) - 25, len(data) - 1):
        try:
            a = decode_image(data[:cut], "cut.gif")
        except ImageError:
            continue
        assert a.shape == (8, 8, 4) and (a[..., 0] == 255).all()
    wide = b"P7\nWIDTH " + b"0" * 4300 + b"2\nHEIGHT 1\nDEPTH 1\nMAXVAL 255\nENDHDR\n\x10\x20"
    np.testing.assert_array_equal(decode_image(wide, "x.pam")[0, :, 0], [16, 32])  # leading zeros, as strtoll


def test_32bit_int_and_float_modes(tmp_path):
    Image.fromarray(_gradient().astype(np.int32) * 257, "I").save(tmp_path / "i32.tif")
    a = load_image(tmp_path / "i32.tif")
    np.testing.assert_array_equal(a[..., 1], _gradient())
    Image.fromarray(_gradient().astype(np.float32) / 255.0, "F").save(tmp_path / "f.tif")
    a = load_image(tmp_path / "f.tif")
    assert np.abs(a[..., 2].astype(int) - _gradient()).max() <= 1


def test_float_image_nan_is_transparent_not_black(tmp_path, caplog):
    f = _gradient().astype(np.float32) / 255.0
    f[:3] = np.nan
    f[-1, :5] = np.inf
    Image.fromarray(f, "F").save(tmp_path / "nan.tif")
    with caplog.at_level("WARNING"):
        a = load_image(tmp_path / "nan.tif")
    bad = ~np.isfinite(f)
    assert (a[bad, 3] == 0).all() and (a[~bad, 3] == 255).all()
    assert np.abs(a[~bad, 0].astype(int) - _gradient()[~bad]).max() <= 1  # the scale ignores the inf
    assert f"{int(bad.sum())} of {bad.size} pixels are NaN or inf" in caplog.text
    Image.fromarray(np.full((8, 8), np.nan, np.float32), "F").save(tmp_path / "allnan.tif")
    with pytest.raises(ImageError, match="no finite pixel values"):
        load_image(tmp_path / "allnan.tif")


def test_palette_with_transparency(tmp_path):
    idx = np.zeros((16, 16), np.uint8)
    idx[4:12, 4:12] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    im.save(tmp_path / "p.png", transparency=0)
    a = load_image(tmp_path / "p.png")
    _check_rgba(a, (16, 16))
    assert (a[4:12, 4:12] == (255, 0, 0, 255)).all()
    assert (a[0, 0, 3] == 0) and (a[..., 3] == 0).sum() == 256 - 64


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (20, 12), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    a = load_image(tmp_path / "c.jpg")
    _check_rgba(a, (12, 20))
    r, g, b = a[6, 10, :3].astype(int)
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red
    assert (a[..., 3] == 255).all()


def test_rgb_and_rgba(tmp_path):
    rgb = np.dstack([_gradient()] * 3)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    a = load_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(a[..., :3], rgb)
    assert (a[..., 3] == 255).all()
    rgba = np.dstack([rgb, _gradient()])
    rgba[0, 0, 3] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # left half red, right half blue
    arr[:, 10:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "o.png", exif=exif)
    a = load_image(tmp_path / "o.png")
    assert a.shape == (20, 10, 4)
    assert tuple(a[2, 5, :3]) == (255, 0, 0) and tuple(a[17, 5, :3]) == (0, 0, 255)  # red ends up on top


# --------------------------------------------------------------------------------------------------
# Loader: bad files raise ImageError naming the problem and the file
# --------------------------------------------------------------------------------------------------


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _expect_error(path: Path, pattern: str) -> None:
    with pytest.raises(ImageError, match=pattern) as ei:
        load_image(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.png", "not found")


def test_directory(tmp_path):
    _expect_error(tmp_path, "directory")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_bytes(b"this is not an image at all\n" * 10)
    _expect_error(p, "not a recognised image")
    e = tmp_path / "empty.png"
    e.write_bytes(b"")
    _expect_error(e, "empty")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    data = _png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noise: IDAT does not compress
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated or corrupt")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _expect_error(p, "truncated or corrupt")


def test_truncation_still_detected_when_pillow_is_told_to_tolerate_it(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    rng = np.random.default_rng(2)
    data = _png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    p = tmp_path / "cut2.png"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # global setting restored


def test_empty_alpha(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    _expect_error(tmp_path / "clear.png", "alpha channel is empty")


def test_zero_size(tmp_path):
    for w, h in ((0, 10), (10, 0)):
        p = tmp_path / f"zero_{w}x{h}.png"
        p.write_bytes(_png_header_only(w, h))
        _expect_error(p, "zero size")


def test_huge_image_limit(tmp_path, monkeypatch):
    Image.fromarray(_gradient(40, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 1000)
    _expect_error(tmp_path / "big.png", "too large")


def test_huge_header_rejected_before_decoding(tmp_path):
    # 60000^2 px declared: must be refused from the header (Pillow's own bomb guard or ours), never
    # decoded; the file itself is tiny.
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(60000, 60000))
    _expect_error(p, "too large")
    q = tmp_path / "bomb2.png"
    q.write_bytes(_png_header_only(9000, 9000))  # above our 8192^2 limit, below Pillow's
    _expect_error(q, "too large")


# --------------------------------------------------------------------------------------------------
# Foreground mask without alpha
# --------------------------------------------------------------------------------------------------


def _disk_image(h: int = 200, w: int = 240, bg=(255, 255, 255), colour=(30, 120, 200), r: float = 55.0):
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = 95.0, 130.0
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    cover = np.clip(r + 0.5 - d, 0.0, 1.0)[..., None]  # 1-px anti-aliased edge
    rgb = np.asarray(colour, np.float64) * cover + np.asarray(bg, np.float64) * (1 - cover)
    rgba = np.dstack([np.rint(rgb).astype(np.uint8), np.full((h, w), 255, np.uint8)])
    return rgba, d <= r


def test_uniform_background_removed_from_rgb(tmp_path):
    rgba, disk = _disk_image()
    rgba[90:100, 125:135, :3] = 255  # a white patch inside the object must stay foreground
    Image.fromarray(rgba[..., :3]).save(tmp_path / "disk.png")
    loaded = load_image(tmp_path / "disk.png")
    res = preprocess(loaded, PreprocessConfig.triposr(128), source="disk.png")
    assert res.mask_source == "uniform_background" and res.warnings == []
    fg = pp.foreground(loaded)
    mask = fg.rgba[..., 3] > 127
    iou = (mask & disk).sum() / (mask | disk).sum()
    assert iou > 0.97
    assert (fg.rgba[90:100, 125:135, 3] == 255).all()
    assert ((fg.rgba[..., 3] > 0) & (fg.rgba[..., 3] < 255)).any()  # soft edge
    # TripoSR framing then uses that mask: square, grey background, object ~85 % of the side.
    side = res.display_rgb.shape[0]
    assert res.display_rgb.shape == (side, side, 3) and abs(side - int(110 / 0.85)) <= 3
    assert tuple(res.display_rgb[0, 0]) == (127, 127, 127)
    assert res.pixel_values.shape == (1, 3, 128, 128)


def test_uniform_background_other_colour_and_jpeg_noise(tmp_path):
    rgba, disk = _disk_image(bg=(127, 127, 127), colour=(230, 90, 20))
    Image.fromarray(rgba[..., :3]).save(tmp_path / "disk.jpg", quality=80)
    fg = pp.foreground(load_image(tmp_path / "disk.jpg"))
    assert fg.mask_source == "uniform_background"
    mask = fg.rgba[..., 3] > 127
    assert (mask & disk).sum() / (mask | disk).sum() > 0.95
    assert (fg.rgba[..., 3][:20] == 0).all()  # JPEG ringing in the background is not foreground


def test_non_uniform_background_without_rembg_warns():
    rng = np.random.default_rng(3)
    rgba = np.dstack([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((64, 64), 255, np.uint8)])
    res = preprocess(rgba, PreprocessConfig.triposr(64), source="noise.png")
    assert res.mask_source == "none"
    assert res.warnings and any("rembg" in w and "noise.png" in w for w in res.warnings)
    np.testing.assert_array_equal(res.display_rgb, rgba[..., :3])  # unchanged, like --no-remove-bg
    assert res.pixel_values.shape == (1, 3, 64, 64)


def test_background_removal_off_keeps_image_silently():
    rgba, _ = _disk_image()
    res = preprocess(rgba, PreprocessConfig.openlrm_v11(224, background_removal="off"))
    assert res.mask_source == "none" and res.warnings == []
    # Opaque input through the OpenLRM path is exactly the reference (composite with a = 1 is exact).
    torch.testing.assert_close(res.pixel_values, composite_resize_bicubic(rgba, 224), atol=0, rtol=0)


def test_rembg_used_when_available_and_background_not_uniform(monkeypatch):
    rng = np.random.default_rng(4)
    rgba = np.dstack([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), np.full((40, 40), 255, np.uint8)])
    fake = np.zeros((40, 40), np.uint8)
    fake[10:30, 10:30] = 255
    monkeypatch.setattr(pp, "_rembg_available", lambda: True)
    monkeypatch.setattr(pp, "_rembg_alpha", lambda a: fake)
    res = preprocess(rgba, PreprocessConfig.triposr(64))
    assert res.mask_source == "rembg"
    assert res.display_rgb.shape == (int(19 / 0.85),) * 2 + (3,)


def test_single_colour_image_has_no_foreground():
    rgba = np.full((32, 32, 4), 255, np.uint8)
    with pytest.raises(ImageError, match="no foreground"):
        preprocess(rgba, PreprocessConfig.triposr(64), source="blank.png")


def test_nearly_opaque_alpha_is_ignored_with_a_warning():
    # An opaque photo saved with one soft pixel must still get its background removed, not be taken as
    # "already masked" (which would skip removal and framing).
    rgba, disk = _disk_image()
    rgba[5, 5, 3] = 254
    res = preprocess(rgba, PreprocessConfig.triposr(128), source="soft.png")
    assert res.mask_source == "uniform_background"
    assert any("opaque almost everywhere" in w and "soft.png" in w for w in res.warnings)
    ref = preprocess(_disk_image()[0], PreprocessConfig.triposr(128))
    torch.testing.assert_close(res.pixel_values, ref.pixel_values, atol=0, rtol=0)
    # A real mask (the disk's outside transparent) is still used as is, soft edge and all.
    masked = rgba.copy()
    masked[..., 3] = np.where(disk, 255, 0)
    assert preprocess(masked, PreprocessConfig.triposr(128)).mask_source == "alpha"


def test_thin_transparent_frame_of_a_large_image_is_still_a_mask():
    # 1-pixel transparent border of a 5000 px image: 0.08 % of the pixels, a real mask all the same.
    rgba = np.full((5000, 5000, 4), 255, np.uint8)
    rgba[[0, -1], :, 3] = 0
    rgba[:, [0, -1], 3] = 0
    assert pp.foreground(rgba).mask_source == "alpha"


def test_alpha_with_no_half_opaque_pixel_is_an_error():
    rgba, _ = _disk_image()
    rgba[..., 3] = 1  # invisible everywhere: composited, nothing is left to reconstruct
    with pytest.raises(ImageError, match="no pixel at least half opaque"):
        preprocess(rgba, PreprocessConfig.triposr(64), source="faint.png")


def test_special_files_are_refused_before_reading(tmp_path):
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


def test_multi_frame_image_uses_the_first_frame_and_says_so(tmp_path, caplog):
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level("WARNING", logger="lrm_rt.preprocess"):
        rgba = load_image(tmp_path / "anim.gif")
    assert rgba[0, 0, 0] == 10 and "2 frames" in caplog.text


def test_file_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(_gradient()).save(path)
    monkeypatch.setattr(pp, "MAX_IMAGE_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ImageError, match="image file is too large"):
        load_image(path)


def test_large_images_are_reduced_before_framing(monkeypatch):
    # Framing pads the canvas to 1/ratio of the object; above MAX_WORK_SIDE the image is box-reduced
    # first, so memory stays bounded. Compared with the same object drawn at the reduced size.
    monkeypatch.setattr(pp, "MAX_WORK_SIDE", 256)
    big = np.zeros((600, 400, 4), np.uint8)
    big[100:500, 50:350] = (200, 40, 40, 255)
    cfg = PreprocessConfig("openlrm", 64, 0.5, 1.0, "bicubic_ac")
    assert pp.reduce_large(big).flags.writeable  # torch.from_numpy warns on read-only arrays
    framed, source, _ = pp.frame(pp.reduce_large(big), cfg)
    assert source == "alpha" and framed.shape[0] <= 256
    small = np.zeros((200, 134, 4), np.uint8)  # reduced by 3 (600 -> 200): object rows 34:167, cols 17:117
    small[34:167, 17:117] = (200, 40, 40, 255)
    a = preprocess(big, cfg).pixel_values
    b = preprocess(small, cfg).pixel_values
    assert (a - b).abs().mean() < 0.02
    # Below the bound nothing changes (reference parity).
    assert pp.reduce_large(small) is small


def test_box_reduce_is_the_alpha_weighted_block_mean():
    # The definition the C library reproduces byte for byte: partial edge blocks average what they hold.
    rng = np.random.default_rng(7)
    for shape, f in [((7, 10), 3), ((130, 67), 2), ((300, 301), 70), ((5, 3000), 1500)]:
        a = rng.integers(0, 256, shape + (4,), dtype=np.uint8)
        out = pp.box_reduce(a, f)
        assert out.shape == (-(-shape[0] // f), -(-shape[1] // f), 4)
        for i, j in [(0, 0), (out.shape[0] - 1, out.shape[1] - 1), (out.shape[0] // 2, 0)]:
            b = a[i * f:(i + 1) * f, j * f:(j + 1) * f].reshape(-1, 4).astype(np.int64)
            sa = int(b[:, 3].sum())
            want = [(int((b[:, c] * b[:, 3]).sum()) + sa // 2) // sa if sa else 0 for c in range(3)]
            assert list(out[i, j, :3]) == want and out[i, j, 3] == (sa + len(b) // 2) // len(b)


def test_tiny_foreground_ratio_is_refused():
    with pytest.raises(ConfigError, match="foreground_ratio"):
        PreprocessConfig.triposr(64, foreground_ratio=1e-9)


# --------------------------------------------------------------------------------------------------
# Real inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INPUT_FILES, reason=f"no input images under {INPUTS}")
@pytest.mark.parametrize("path", INPUT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_inputs_both_families(path):
    rgba = load_image(path)
    assert rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 4
    # Resolve the mask once, then run both families on it (the alpha path), to halve the work.
    fg = pp.foreground(rgba, source=str(path))
    assert fg.mask_source in ("alpha", "uniform_background")  # every sample has alpha or a plain background
    cases = [(PreprocessConfig.triposr(512), 512), (PreprocessConfig.openlrm_v11(224), 224)]
    for cfg, size in cases:
        res = preprocess(fg.rgba, cfg, source=str(path))
        assert res.pixel_values.shape == (1, 3, size, size) and res.pixel_values.dtype == torch.float32
        assert torch.isfinite(res.pixel_values).all()
        # TripoSR's antialiased bilinear is not clamped (parity); its weights sum to 1 up to rounding.
        assert -1e-6 <= float(res.rgb01.min()) and float(res.rgb01.max()) <= 1.0 + 1e-6
        assert res.display_rgb.dtype == np.uint8 and res.display_rgb.shape[2] == 3
        assert res.warnings == []
        if cfg.family == "triposr":
            h, w = res.display_rgb.shape[:2]
            assert h == w  # resize_foreground always yields a square


# ---- cuda/image_ops.cu (CPU build) against the numpy / torch references, bit for bit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_native_box_reduce_equals_the_reference():
    rng = np.random.default_rng(1)
    for shape, f in (((37, 53), 4), ((301, 200), 3), ((16, 16), 1), ((5, 9), 7)):  # partial blocks at the edges
        a = rng.integers(0, 256, shape + (4,), dtype=np.uint8)
        a[..., 3][rng.uniform(size=shape) < 0.3] = 0  # transparent pixels carry colours that must not bleed
        np.testing.assert_array_equal(pp.box_reduce(a, f, "native"), pp.box_reduce(a, f, "reference"))


def test_native_masks_equal_torch_max_pool():
    rng = np.random.default_rng(2)
    for p in (0.45, 0.6, 0.8):
        m = rng.uniform(size=(131, 97)) < p
        t = torch.from_numpy(m.astype(np.float32))[None, None]
        for r in (1, 2):
            grown = torch.nn.functional.max_pool2d(t, 2 * r + 1, 1, r)[0, 0].numpy() > 0.5
            shrunk = -torch.nn.functional.max_pool2d(-t, 2 * r + 1, 1, r)[0, 0].numpy() > 0.5
            np.testing.assert_array_equal(pp._mask_op("lrm_mask_dilate", m, r), grown)
            np.testing.assert_array_equal(pp._mask_op("lrm_mask_erode", m, r), shrunk)
        np.testing.assert_array_equal(pp._border_connected(m, "native"), pp._border_connected(m, "reference"))


def test_native_colour_distance_equals_the_reference():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (67, 45, 4), dtype=np.uint8)
    for colour in (np.array([255, 255, 255], np.float32), np.array([127.5, 128, 3.5], np.float32)):
        ref = pp._colour_distance(rgba[..., :3], colour, "reference")
        np.testing.assert_array_equal(pp._colour_distance(rgba[..., :3], colour, "native"), ref)  # RGBA: 4 apart
        np.testing.assert_array_equal(pp._colour_distance(rgba[::-1, :, :3], colour, "native"), ref[::-1])
        np.testing.assert_array_equal(pp._colour_distance(rgba[0, :, :3], colour, "native"), ref[0])


@pytest.mark.parametrize("name", ["chair.png", "mailbox.png", "catstatue_rgba.png"])
def test_native_background_removal_equals_the_reference(name):
    im = Image.open(EXAMPLES / name).convert("RGBA")
    for bg, quality in (((255, 255, 255), None), ((128, 128, 128), 70), ((240, 240, 235), 90)):
        canvas = Image.new("RGBA", im.size, bg + (255,))
        canvas.alpha_composite(im)
        if quality:  # JPEG ringing and chroma bleed around the object
            buf = io.BytesIO()
            canvas.convert("RGB").save(buf, "JPEG", quality=quality)
            canvas = Image.open(buf).convert("RGBA")
        rgba = np.array(canvas)
        ref = pp.remove_uniform_background(rgba, backend="reference")
        assert ref is not None and 0 < (ref > 0).mean() < 0.9
        np.testing.assert_array_equal(pp.remove_uniform_background(rgba, backend="native"), ref)
