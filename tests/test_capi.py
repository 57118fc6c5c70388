"""The C library (CMake build of liblrm_rt) against the Python runtime.

Builds the library with CMake into a temporary directory, runs its ctest suite (exports of the fixture models,
error handling, install + find_package, example CLI vs ``lrm-rt reconstruct``), then loads liblrm_rt with ctypes
and compares it with Python in this process: image decoding vs Pillow, preprocessing (max abs <= 1e-5) and
meshes (same counts and faces, Chamfer ~ 0).

The build takes minutes, so without a prebuilt tree this module is ``slow``; CI builds the library first
(.ci/run) and points ``LRM_RT_CAPI_BUILD`` at that build directory, which makes these tests part of the default
run without a second build.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PREBUILT = os.environ.get("LRM_RT_CAPI_BUILD")
pytestmark = [] if PREBUILT else [pytest.mark.slow]
MODELS = ["triposr-tiny", "openlrm-tiny-1.1"]
LRM_OK = 0


def _run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, fixtures_dir) -> Path:
    if PREBUILT:
        d = Path(PREBUILT)
        if not (d / "CTestTestfile.cmake").is_file():
            pytest.fail(f"LRM_RT_CAPI_BUILD={PREBUILT} is not a configured lrm_rt build directory")
        return d
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    import torch

    d = tmp_path_factory.mktemp("capi_build")
    _run(["cmake", "-S", REPO, "-B", d, "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DLRM_RT_FIXTURES={fixtures_dir}"])
    _run(["cmake", "--build", d, "-j", str(max(1, os.cpu_count() or 1))])
    _run(["ctest", "--output-on-failure"], cwd=d)
    return d


@pytest.fixture(scope="module")
def lib(build_dir):
    path = next(iter(sorted(build_dir.glob("liblrm_rt.so*"))), None)
    assert path is not None, f"no liblrm_rt.so in {build_dir}"
    lib = ctypes.CDLL(str(path))
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.lrm_last_error.restype = ctypes.c_char_p
    lib.lrm_last_error.argtypes = [vp]
    lib.lrm_last_warnings.restype = ctypes.c_char_p
    lib.lrm_build_features.restype = ctypes.c_char_p
    lib.lrm_last_warnings.argtypes = []
    lib.lrm_create.argtypes = [ctypes.c_char_p, vp, ctypes.POINTER(vp)]
    lib.lrm_free.argtypes = [vp]
    lib.lrm_preprocess_rgba.argtypes = [vp, vp, i32, i32, i64, vp, i64]
    lib.lrm_reconstruct_file.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(vp)]
    lib.lrm_image_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(vp)]
    for name in ("lrm_image_width", "lrm_image_height"):
        getattr(lib, name).argtypes = [vp]
        getattr(lib, name).restype = i32
    lib.lrm_image_pixels.argtypes = [vp]
    lib.lrm_image_pixels.restype = ctypes.POINTER(ctypes.c_uint8)
    lib.lrm_image_free.argtypes = [vp]
    for name in ("lrm_mesh_vertex_count", "lrm_mesh_face_count"):
        getattr(lib, name).argtypes = [vp]
        getattr(lib, name).restype = i64
    lib.lrm_mesh_vertices.argtypes = lib.lrm_mesh_colors.argtypes = [vp]
    lib.lrm_mesh_vertices.restype = lib.lrm_mesh_colors.restype = ctypes.POINTER(ctypes.c_float)
    lib.lrm_mesh_faces.argtypes = [vp]
    lib.lrm_mesh_faces.restype = ctypes.POINTER(ctypes.c_int32)
    lib.lrm_mesh_free.argtypes = [vp]
    return lib


def _export(build_dir: Path, name: str) -> Path:
    d = build_dir / "tests" / "cpp" / "reference" / name / "export"
    assert (d / "manifest.json").is_file(), f"no export at {d}: run ctest in {build_dir} first"
    return d


class _Context:
    def __init__(self, lib, export_dir: Path, mc_resolution: int = 0):
        self.lib = lib
        params = None
        if mc_resolution:
            # lrm_params layout: struct_size, threads, mc_resolution, mc_threshold, vertex_colors, device, device_index,
            # orientation
            class Params(ctypes.Structure):
                _fields_ = [("struct_size", ctypes.c_uint32), ("threads", ctypes.c_int32),
                            ("mc_resolution", ctypes.c_int32), ("mc_threshold", ctypes.c_float),
                            ("vertex_colors", ctypes.c_int32), ("device", ctypes.c_int32),
                            ("device_index", ctypes.c_int32), ("orientation", ctypes.c_int32)]
            self._params = Params(ctypes.sizeof(Params), 0, mc_resolution, float("nan"), 1, 0, 0, 0)
            params = ctypes.cast(ctypes.pointer(self._params), ctypes.c_void_p)
        self.ptr = ctypes.c_void_p()
        st = lib.lrm_create(str(export_dir).encode(), params, ctypes.byref(self.ptr))
        assert st == LRM_OK, lib.lrm_last_error(None).decode()

    def close(self):
        self.lib.lrm_free(self.ptr)


def _c_image(lib, path: Path) -> np.ndarray:
    img = ctypes.c_void_p()
    st = lib.lrm_image_load(str(path).encode(), ctypes.byref(img))
    assert st == LRM_OK, lib.lrm_last_error(None).decode()
    try:
        w, h = lib.lrm_image_width(img), lib.lrm_image_height(img)
        return np.ctypeslib.as_array(lib.lrm_image_pixels(img), shape=(h, w, 4)).copy()
    finally:
        lib.lrm_image_free(img)


def _wide_cutout(rng, w: int, h: int, margin: int = 0) -> np.ndarray:
    """A long object with soft, random alpha on a transparent background (odd sizes: partial edge blocks)."""
    out = np.zeros((h, w + 2 * margin, 4), np.uint8)
    out[:, margin:margin + w] = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    out[h // 2, margin:margin + w, 3] = 255  # one solid row: the object spans the full width
    return out


def _with_one_soft_pixel(rgba: np.ndarray) -> np.ndarray:
    out = rgba.copy()
    out[0, 0, 3] = 254
    return out


@pytest.mark.parametrize("name,ratio", [(m, None) for m in MODELS] + [("openlrm-tiny-1.1", 0.5)])
def test_preprocessing_matches_python(name, ratio, lib, build_dir, fixtures_dir, tmp_path):
    """Both families as published, and an OpenLRM config that names a framing ratio (as lrm-tiny's does)."""
    import json
    import shutil

    from lrm_rt.export import manifest_config, read_manifest
    from lrm_rt.pipeline import preprocess_config
    from lrm_rt.preprocess import load_image, preprocess

    export = _export(build_dir, name)
    if ratio is not None:
        export = Path(shutil.copytree(export, tmp_path / "export"))
        man = json.loads((export / "manifest.json").read_text())
        man["config"]["foreground_ratio"] = ratio
        (export / "manifest.json").write_text(json.dumps(man))
    cfg = manifest_config(read_manifest(export))
    assert cfg.foreground_ratio == (0.85 if name.startswith("triposr") else ratio)
    ctx = _Context(lib, export)
    rng = np.random.default_rng(0)
    cutout = rng.integers(0, 256, (61, 47, 4), dtype=np.uint8)
    cutout[..., 3] = np.where(rng.random((61, 47)) < 0.4, 0, cutout[..., 3])
    chair = load_image(REPO / "examples" / "chair.png").astype(np.float32)
    a = chair[..., 3:] / 255.0
    on_grey = chair[..., :3] * a + 128.0 * (1 - a) + rng.normal(0, 3, chair[..., :3].shape)
    on_grey = np.concatenate([np.clip(np.rint(on_grey), 0, 255), np.full(a.shape, 255.0)], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (300, 211, 4), dtype=np.uint8)
    images = [load_image(fixtures_dir / "checkpoints" / name / "input.png"),
              load_image(REPO / "examples" / "chair.png"),
              cutout,
              noise,
              on_grey,  # opaque, uniform background: removed without weights on both sides
              _with_one_soft_pixel(on_grey),  # a stray soft pixel: alpha ignored on both sides, background removed
              # Over MAX_WORK_SIDE: box-reduced by 2 first (odd sizes: partial edge blocks), on both sides;
              # without the reduction the encoder input differs by up to 0.67 (OpenLRM) / 5e-4 (TripoSR).
              _wide_cutout(rng, 4501, 301),
              _wide_cutout(rng, 2300, 700, margin=100),  # framed at 0.5 its canvas exceeds MAX_WORK_SIDE: reduced
              np.concatenate([noise[..., :3], np.full(noise.shape[:2] + (1,), 255, np.uint8)], -1)]  # used whole
    try:
        for rgba in images:
            s = cfg.input_size
            out = np.empty(3 * s * s, np.float32)
            h, w = rgba.shape[:2]
            rgba = np.ascontiguousarray(rgba)
            st = lib.lrm_preprocess_rgba(ctx.ptr, rgba.ctypes.data, w, h, 4 * w, out.ctypes.data, out.size)
            assert st == LRM_OK, lib.lrm_last_error(ctx.ptr).decode()
            pre = preprocess(rgba, preprocess_config(cfg))
            ref = pre.pixel_values.numpy().reshape(-1)
            assert np.abs(out - ref).max() <= 1e-5, (rgba.shape, np.abs(out - ref).max())
            # the same problems reported (in their own words): an ignored alpha channel, a background kept
            c_warnings = lib.lrm_last_warnings().decode()
            for kind in ("alpha channel is opaque almost everywhere", "background is not uniform"):
                assert (kind in c_warnings) == any(kind in w for w in pre.warnings), (rgba.shape, c_warnings,
                                                                                     pre.warnings)
            assert bool(c_warnings) == bool(pre.warnings), (c_warnings, pre.warnings)
        assert lib.lrm_last_warnings() != b""  # the last image (noise, opaque) had its background kept
        assert lib.lrm_preprocess_rgba(ctx.ptr, None, 4, 4, 16, out.ctypes.data, out.size) != LRM_OK
        assert lib.lrm_last_warnings() == b""  # a later call's, not the earlier image's
    finally:
        ctx.close()


@pytest.mark.parametrize("name", MODELS)
def test_mesh_matches_python_reconstructor(name, lib, build_dir, fixtures_dir, tmp_path):
    from scipy.spatial import cKDTree

    from lrm_rt.pipeline import Reconstructor

    ckpt = fixtures_dir / "checkpoints" / name
    ctx = _Context(lib, _export(build_dir, name), mc_resolution=64)
    mesh = ctypes.c_void_p()
    try:
        st = lib.lrm_reconstruct_file(ctx.ptr, str(ckpt / "input.png").encode(), ctypes.byref(mesh))
        assert st == LRM_OK, lib.lrm_last_error(ctx.ptr).decode()
        nv, nf = lib.lrm_mesh_vertex_count(mesh), lib.lrm_mesh_face_count(mesh)
        verts = np.ctypeslib.as_array(lib.lrm_mesh_vertices(mesh), shape=(nv, 3)).copy()
        faces = np.ctypeslib.as_array(lib.lrm_mesh_faces(mesh), shape=(nf, 3)).copy()
        colors = np.ctypeslib.as_array(lib.lrm_mesh_colors(mesh), shape=(nv, 3)).copy()
        lib.lrm_mesh_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
        for fmt in ("glb", "ply", "obj"):
            assert lib.lrm_mesh_write(mesh, str(tmp_path / f"c.{fmt}").encode(), 0) == LRM_OK
    finally:
        lib.lrm_mesh_free(mesh)
        ctx.close()
    # the C library's files carry the same smooth normals as Python's writers, and its PLY their layout
    from conftest import glb_attribute
    from lrm_rt.mesh import Mesh, ply_bytes, vertex_normals

    normals = vertex_normals(verts, faces)
    np.testing.assert_allclose(glb_attribute((tmp_path / "c.glb").read_bytes(), "NORMAL"), normals, atol=1e-5)
    c_ply, py_ply = (tmp_path / "c.ply").read_bytes(), ply_bytes(Mesh(verts, faces, colors))
    assert len(c_ply) == len(py_ply)
    head = py_ply.index(b"end_header\n") + 11
    assert c_ply[:head] == py_ply[:head]
    row = np.dtype([(k, "<f4") for k in ("x", "y", "z", "nx", "ny", "nz")] + [(k, "u1") for k in ("r", "g", "b")])
    c_rows, py_rows = (np.frombuffer(b, row, nv, head) for b in (c_ply, py_ply))
    for k in ("x", "y", "z", "r", "g", "b"):
        np.testing.assert_array_equal(c_rows[k], py_rows[k])
    for k in ("nx", "ny", "nz"):
        np.testing.assert_allclose(c_rows[k], py_rows[k], atol=1e-5)
    assert c_ply[head + nv * row.itemsize:] == py_ply[head + nv * row.itemsize:]  # the faces
    lines = (tmp_path / "c.obj").read_text().splitlines()
    vn = np.array([[float(x) for x in ln.split()[1:]] for ln in lines if ln.startswith("vn ")])
    np.testing.assert_allclose(vn, normals, atol=1e-5)
    obj_faces = np.array([[int(t.split("//")[0]) - 1 for t in ln.split()[1:]] for ln in lines if ln.startswith("f ")])
    np.testing.assert_array_equal(obj_faces, faces)
    assert all(t.split("//")[0] == t.split("//")[1] for ln in lines if ln.startswith("f ") for t in ln.split()[1:])
    ref = Reconstructor(str(ckpt)).reconstruct(str(ckpt / "input.png"), mc_resolution=64).mesh
    assert (nv, nf) == (ref.num_vertices, ref.num_faces)
    np.testing.assert_array_equal(faces, ref.faces)
    assert np.abs(verts - ref.vertices).max() < 1e-4
    assert np.abs(colors - ref.vertex_colors).max() < 1e-3
    d1, _ = cKDTree(ref.vertices).query(verts)
    d2, _ = cKDTree(verts).query(ref.vertices)
    assert 0.5 * (d1.mean() + d2.mean()) < 1e-5


def _package_dirs() -> set:
    """Temporary directories whose network.pt2 library this process has mapped (one per loaded package)."""
    return {line.split()[-1].split("/network/data/")[0] for line in Path("/proc/self/maps").read_text().splitlines()
            if "/network/data/aotinductor/" in line}


_CYCLE_SCRIPT = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.lrm_create.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
lib.lrm_free.argtypes = [ctypes.c_void_p]
for _ in range(3):
    ctx = ctypes.c_void_p()
    assert lib.lrm_create(sys.argv[2].encode(), None, ctypes.byref(ctx)) == 0
    lib.lrm_free(ctx)
maps = open("/proc/self/maps").read().splitlines()
print("\\n".join(sorted({l.split()[-1].split("/network/data/")[0] for l in maps if "/network/data/aotinductor/" in l})))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_recreated_contexts_reuse_the_loaded_network(lib, build_dir, fixtures_dir):
    # The compiled network cannot be unloaded, so freed contexts hand theirs to the next context on the same
    # package: create/free cycles map no new copy, while live contexts each keep their own.
    export = _export(build_dir, "openlrm-tiny-1.1")
    image = str(fixtures_dir / "checkpoints" / "openlrm-tiny-1.1" / "input.png").encode()

    def faces_of(ctx):
        mesh = ctypes.c_void_p()
        assert lib.lrm_reconstruct_file(ctx.ptr, image, ctypes.byref(mesh)) == LRM_OK, lib.lrm_last_error(ctx.ptr)
        try:
            nf = lib.lrm_mesh_face_count(mesh)
            return np.ctypeslib.as_array(lib.lrm_mesh_faces(mesh), shape=(nf, 3)).copy()
        finally:
            lib.lrm_mesh_free(mesh)

    a, b = _Context(lib, export, 32), _Context(lib, export, 32)
    live = _package_dirs()
    assert len(live) >= 2  # two live contexts never share a loader
    first = faces_of(a)
    np.testing.assert_array_equal(faces_of(b), first)
    a.close()
    b.close()
    for _ in range(6):
        c = _Context(lib, export, 32)
        np.testing.assert_array_equal(faces_of(c), first)
        c.close()
    a, b = _Context(lib, export, 32), _Context(lib, export, 32)
    a.close()
    b.close()
    assert _package_dirs() == live
    # at exit the idle loaders remove the directories they extracted their package to
    lib_path = next(iter(sorted(build_dir.glob("liblrm_rt.so*"))))
    res = _run([sys.executable, "-c", _CYCLE_SCRIPT, lib_path, export])
    dirs = res.stdout.split()
    assert len(dirs) == 1 and not Path(dirs[0]).exists()


def _pillow_images(tmp: Path):
    """Files in the formats and modes the C decoder handles, written by Pillow."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0
    grey = rng.integers(0, 256, (23, 31), dtype=np.uint8)
    files = {}

    def save(name, im, **kw):
        p = tmp / name
        im.save(p, **kw)
        files[name] = p

    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("rgb.png", Image.fromarray(rgba[..., :3], "RGB"))
    save("grey.png", Image.fromarray(grey, "L"))
    save("grey_alpha.png", Image.fromarray(rgba[..., :2], "LA"))
    save("bits.png", Image.fromarray(grey > 128))
    pal = Image.fromarray(rgba[..., :3], "RGB").quantize(16)
    pal.info["transparency"] = 3
    save("palette_trns.png", pal, transparency=3)
    save("palette4.png", Image.fromarray(rgba[..., :3], "RGB").quantize(4), bits=2)
    save("grey16.png", Image.fromarray((grey.astype(np.uint16) * 257 + 3).astype(np.uint16)))
    save("rgb_key.png", Image.fromarray(rgba[..., :3], "RGB"), transparency=tuple(int(v) for v in rgba[2, 2, :3]))
    save("rgb.ppm", Image.fromarray(rgba[..., :3], "RGB"))
    save("grey.pgm", Image.fromarray(grey, "L"))
    for k in range(1, 9):  # EXIF orientations (an eXIf chunk): flips, rotations and transpositions of a 31x23 image
        exif = Image.Exif()
        exif[0x0112] = k
        save(f"exif{k}.png", Image.fromarray(rgba, "RGBA"), exif=exif)
    # big-endian TIFF block (Pillow writes little-endian), SHORT value 6 in the entry's first two bytes
    save("exif_mm.png", Image.fromarray(rgba, "RGBA"),
         exif=b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00")
    save("exif_broken.png", Image.fromarray(rgba, "RGBA"), exif=b"II\x2a\x00\xff\xff\xff\x7f")  # IFD past the end
    # 16-bit RGBA PNG (Pillow cannot write one): the encoder is a few lines
    big = rng.integers(0, 65536, (5, 7, 4), dtype=np.uint16)
    raw = b"".join(b"\x00" + big[y].astype(">u2").tobytes() for y in range(5))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    def png(name, w, h, depth, ctype, interlace, data, extra=b""):
        p = tmp / name
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace)) +
                      extra + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))
        files[name] = p

    png("rgba16.png", 7, 5, 16, 6, 0, raw)
    # 16-bit RGB with a colour key: one pixel is the key, one within its high byte, one has the key's numbers as
    # 8-bit colours
    rgb16 = big[..., :3].copy()
    rgb16[1, 1], rgb16[3, 3], rgb16[2, 2] = (200, 100, 50), (201, 100, 50), (200 * 257, 100 * 257, 50 * 257)
    png("rgb16_key.png", 7, 5, 16, 2, 0, b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(5)),
        chunk(b"tRNS", struct.pack(">HHH", 200, 100, 50)))
    # 16-bit grey with a key: compared at full depth (the pixel one above it, same high byte, stays opaque)
    grey16 = big[..., 0].copy()
    grey16[0, 0], grey16[0, 1], grey16[4, 6] = 1000, 1001, 1000
    png("grey16_key.png", 7, 5, 16, 0, 0, b"".join(b"\x00" + grey16[y].astype(">u2").tobytes() for y in range(5)),
        chunk(b"tRNS", struct.pack(">H", 1000)))
    # orientation given elsewhere than an eXIf chunk: XMP (iTXt compressed, tEXt), ImageMagick's hex "Raw profile
    # type exif" (zTXt), and EXIF beside a contradicting XMP (EXIF wins)
    from PIL.PngImagePlugin import PngInfo

    def xmp(k, attribute=True):
        value = f'tiff:Orientation="{k}"' if attribute else f"<tiff:Orientation>{k}</tiff:Orientation>"
        return f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description {value}/></x:xmpmeta>'

    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp(6), zip=True)
    save("xmp_itxt.png", Image.fromarray(rgba, "RGBA"), pnginfo=info)
    info = PngInfo()
    info.add_text("XML:com.adobe.xmp", xmp(3, attribute=False))
    save("xmp_text.png", Image.fromarray(rgba, "RGBA"), pnginfo=info)
    exif8 = Image.Exif()
    exif8[0x0112] = 8
    hexed = exif8.tobytes().hex()
    info = PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n" + f"{len(hexed) // 2:8d}\n" +
                  "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72)) + "\n", zip=True)
    save("raw_profile.png", Image.fromarray(rgba, "RGBA"), pnginfo=info)
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp(3))
    save("exif_and_xmp.png", Image.fromarray(rgba, "RGBA"), pnginfo=info, exif=exif8)
    # EXIF blocks read by Pillow's rules: a signed SHORT turns, a BYTE does not (Pillow reads bytes); an entry whose
    # value lies past the block's end ends the reading (the orientation after it is lost: the XMP one counts); a
    # block Pillow reads but cannot write back (ImageOps.exif_transpose failed after turning it)
    def tiff(entries, tail=b""):
        body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
        return b"II*\x00" + struct.pack("<I", 8) + body + b"\0\0\0\0" + tail

    short6 = struct.pack("<HH", 6, 0)
    save("exif_sshort.png", Image.fromarray(rgba, "RGBA"), exif=tiff([(0x112, 8, 1, short6)]))
    save("exif_byte.png", Image.fromarray(rgba, "RGBA"), exif=tiff([(0x112, 1, 1, b"\x06\0\0\0")]))
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp(3))
    save("exif_cut.png", Image.fromarray(rgba, "RGBA"), pnginfo=info,
         exif=tiff([(0x10F, 2, 10, struct.pack("<I", 900)), (0x112, 3, 1, short6)]))
    save("exif_unwritable.png", Image.fromarray(rgba, "RGBA"),
         exif=tiff([(0x112, 3, 1, short6), (0x128, 7, 1, b"\x02\0\0\0")]))
    # JPEG (libjpeg in both): 4:2:0 baseline, progressive, grey, CMYK, EXIF and XMP-only orientations
    photo = np.clip(rgba[..., :3].astype(int) // 2 + np.arange(31)[None, :, None] * 4, 0, 255).astype(np.uint8)
    save("photo.jpg", Image.fromarray(photo, "RGB"), quality=90)
    save("progressive.jpg", Image.fromarray(photo, "RGB"), quality=75, progressive=True, subsampling=0)
    save("grey.jpg", Image.fromarray(grey, "L"))
    save("cmyk.jpg", Image.fromarray(photo, "RGB").convert("CMYK"))
    exif6 = Image.Exif()
    exif6[0x0112] = 6
    save("exif6.jpg", Image.fromarray(photo, "RGB"), quality=90, exif=exif6)
    save("xmp8.jpg", Image.fromarray(photo, "RGB"), quality=90, xmp=xmp(8).encode())
    # PAM (P7; Pillow reads none: the Python package's own reader): RGBA, and grey + alpha at maxval 1000 in 16 bits
    pam = tmp / "rgba.pam"
    pam.write_bytes(b"P7\nWIDTH 31\nHEIGHT 23\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n" + rgba.tobytes())
    files["rgba.pam"] = pam
    grey_alpha = rng.integers(0, 1001, (5, 7, 2)).astype(">u2")
    grey_alpha[0, 0, 1] = 1000
    pam = tmp / "grey_alpha16.pam"
    pam.write_bytes(b"P7\r\n# a comment\nWIDTH 7\nHEIGHT 5\nDEPTH 2\nMAXVAL 1000\nENDHDR\n" + grey_alpha.tobytes())
    files["grey_alpha16.pam"] = pam
    # Adam7-interlaced RGBA: the seven sub-images in order, rows with filter byte 0 (empty passes omitted)
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    inter = b"".join(b"\x00" + row.tobytes() for x0, y0, dx, dy in passes for row in rgba[y0::dy, x0::dx]
                     if row.size)
    png("interlaced.png", 31, 23, 8, 6, 1, inter)
    return files


def test_image_decoding_matches_python_loader(lib, tmp_path):
    from lrm_rt.preprocess import load_image

    files = _pillow_images(tmp_path)
    jpeg = "jpeg" in lib.lrm_build_features().decode().split(",")
    for name, path in files.items():
        if name.endswith(".jpg") and not jpeg:  # a build without libjpeg says so
            img = ctypes.c_void_p()
            assert lib.lrm_image_load(str(path).encode(), ctypes.byref(img)) == 3  # LRM_ERR_IMAGE
            assert b"built without libjpeg" in lib.lrm_last_error(None)
            continue
        got = _c_image(lib, path)
        want = load_image(path)
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # the orientations were applied, not ignored by both
    upright = load_image(files["rgba.png"])
    np.testing.assert_array_equal(_c_image(lib, files["exif6.png"]), np.rot90(upright, -1))
    np.testing.assert_array_equal(_c_image(lib, files["exif_mm.png"]), np.rot90(upright, -1))
    np.testing.assert_array_equal(_c_image(lib, files["exif_broken.png"]), upright)
    np.testing.assert_array_equal(_c_image(lib, files["xmp_itxt.png"]), np.rot90(upright, -1))
    np.testing.assert_array_equal(_c_image(lib, files["xmp_text.png"]), np.rot90(upright, 2))
    np.testing.assert_array_equal(_c_image(lib, files["raw_profile.png"]), np.rot90(upright, 1))
    np.testing.assert_array_equal(_c_image(lib, files["exif_and_xmp.png"]), np.rot90(upright, 1))
    np.testing.assert_array_equal(load_image(files["rgba.pam"]), upright)  # the same pixels as rgba.png
    np.testing.assert_array_equal(_c_image(lib, files["exif_sshort.png"]), np.rot90(upright, -1))
    np.testing.assert_array_equal(_c_image(lib, files["exif_byte.png"]), upright)
    np.testing.assert_array_equal(_c_image(lib, files["exif_cut.png"]), np.rot90(upright, 2))
    np.testing.assert_array_equal(_c_image(lib, files["exif_unwritable.png"]), np.rot90(upright, -1))
    # refused by both: compressed PNG text of an unknown method (Pillow's rule), "FF D8" without a marker after it
    bad = files["rgba.png"].read_bytes()
    ztxt = b"zTXtComment\0\x01xyz"
    bad = bad[:33] + struct.pack(">I", len(ztxt) - 4) + ztxt + struct.pack(">I", zlib.crc32(ztxt)) + bad[33:]
    for name, data in (("ztxt_method.png", bad), ("not_a.jpg", b"\xff\xd8\x00\xff\xe0" + bytes(40))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(Exception):
            load_image(tmp_path / name)
        img = ctypes.c_void_p()
        assert lib.lrm_image_load(str(tmp_path / name).encode(), ctypes.byref(img)) == 3, name  # LRM_ERR_IMAGE
    if jpeg:
        photo = _c_image(lib, files["photo.jpg"])
        assert photo.shape == (23, 31, 4) and (photo[..., 3] == 255).all()
        np.testing.assert_array_equal(_c_image(lib, files["exif6.jpg"]), np.rot90(photo, -1))
        np.testing.assert_array_equal(_c_image(lib, files["xmp8.jpg"]), np.rot90(photo, 1))
        # every row present and a marker where the EOI should be: decoded by both
        data = files["photo.jpg"].read_bytes()
        (tmp_path / "com_for_eoi.jpg").write_bytes(data[:-2] + b"\xff\xfe")
        np.testing.assert_array_equal(_c_image(lib, tmp_path / "com_for_eoi.jpg"), photo)
        np.testing.assert_array_equal(load_image(tmp_path / "com_for_eoi.jpg"), photo)
        # a truncated JPEG is refused, as by the Python loader (libjpeg alone would pad it with grey)
        data = files["progressive.jpg"].read_bytes()
        for cut, name in ((len(data) * 2 // 3, "cut.jpg"), (len(data) - 2, "no_eoi.jpg"), (400, "header.jpg")):
            (tmp_path / name).write_bytes(data[:cut])
            with pytest.raises(Exception, match="truncated"):
                load_image(tmp_path / name)
            img = ctypes.c_void_p()
            assert lib.lrm_image_load(str(tmp_path / name).encode(), ctypes.byref(img)) == 3, name  # LRM_ERR_IMAGE
            assert b"truncated or corrupt" in lib.lrm_last_error(None), name
        # a header claiming 65000 x 65000 pixels is refused before libjpeg allocates anything for it
        sof = struct.pack(">BHHB", 8, 65000, 65000, 3) + bytes([1, 0x22, 0, 2, 0x11, 0, 3, 0x11, 0])
        sos = bytes([3, 1, 0, 2, 0x11, 3, 0x11, 0, 63, 0])
        bomb = (b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof +
                b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos + b"\xff\xd9")
        (tmp_path / "bomb.jpg").write_bytes(bomb)
        img = ctypes.c_void_p()
        assert lib.lrm_image_load(str(tmp_path / "bomb.jpg").encode(), ctypes.byref(img)) == 3
        assert b"image is too large (65000x65000 pixels" in lib.lrm_last_error(None)
    keyed = _c_image(lib, files["grey16_key.png"])[..., 3] == 0  # the key was applied, not ignored by both
    assert keyed[0, 0] and keyed[4, 6] and not keyed[0, 1]


def test_errors_are_codes_not_crashes(lib, build_dir, tmp_path):
    ctx = ctypes.c_void_p()
    assert lib.lrm_create(b"/nonexistent/export", None, ctypes.byref(ctx)) == 2  # LRM_ERR_IO
    assert ctx.value is None and b"not found" in lib.lrm_last_error(None)
    assert lib.lrm_create(None, None, ctypes.byref(ctx)) == 1  # LRM_ERR_INVALID_ARGUMENT
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    c = _Context(lib, _export(build_dir, "triposr-tiny"), mc_resolution=16)
    try:
        mesh = ctypes.c_void_p()
        assert lib.lrm_reconstruct_file(c.ptr, str(tmp_path / "junk.png").encode(), ctypes.byref(mesh)) == 3
        assert mesh.value is None and lib.lrm_last_error(c.ptr)
    finally:
        c.close()


def test_framing_canvas_is_bounded(lib, build_dir, tmp_path):
    """A 3.4-Mpx-wide, 2-px-tall cutout (within the image size limit) at the smallest accepted ratio would need a
    ~68-Mpx-wide square canvas: both sides box-reduce it first (to 4092 x 1 px, too thin to frame) and give the same
    clean error, without a huge allocation (resize_foreground's own canvas check stays as a backstop)."""
    from lrm_rt.errors import ImageError
    from lrm_rt.export import manifest_config, read_manifest
    from lrm_rt.pipeline import preprocess_config
    from lrm_rt.preprocess import preprocess

    import json

    export = Path(shutil.copytree(_export(build_dir, "triposr-tiny"), tmp_path / "export"))
    man = json.loads((export / "manifest.json").read_text())
    man["config"]["foreground_ratio"] = 0.05
    (export / "manifest.json").write_text(json.dumps(man))
    ctx = _Context(lib, export)
    try:
        w, h, s = 3_400_000, 2, man["config"]["input_size"]
        rgba = np.full((h, w, 4), 200, np.uint8)
        rgba[1, :1000, 3] = 0  # enough see-through pixels for the alpha to be the mask
        out = np.empty(3 * s * s, np.float32)
        st = lib.lrm_preprocess_rgba(ctx.ptr, rgba.ctypes.data, w, h, 4 * w, out.ctypes.data, out.size)
        assert st == 3, (st, lib.lrm_last_error(ctx.ptr))  # LRM_ERR_IMAGE, not a huge allocation
        assert b"too small to frame" in lib.lrm_last_error(ctx.ptr)
        with pytest.raises(ImageError, match="too small to frame"):
            preprocess(rgba, preprocess_config(manifest_config(read_manifest(export))))
    finally:
        ctx.close()


_THREADS_CHILD = r"""
import ctypes, resource, sys
lib = ctypes.CDLL(sys.argv[1])
vp = ctypes.c_void_p
lib.lrm_create.argtypes = [ctypes.c_char_p, vp, ctypes.POINTER(vp)]
lib.lrm_reconstruct_file.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(vp)]
lib.lrm_free.argtypes = lib.lrm_mesh_free.argtypes = [vp]
lib.lrm_last_error.restype = ctypes.c_char_p
lib.lrm_last_error.argtypes = [vp]

class Params(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("threads", ctypes.c_int32), ("mc_resolution", ctypes.c_int32),
                ("mc_threshold", ctypes.c_float), ("vertex_colors", ctypes.c_int32), ("device", ctypes.c_int32),
                ("device_index", ctypes.c_int32), ("orientation", ctypes.c_int32)]

def run(threads):
    p = Params(ctypes.sizeof(Params), threads, 16, float("nan"), 1, 0, 0, 0)
    ctx, mesh = vp(), vp()
    assert lib.lrm_create(sys.argv[2].encode(), ctypes.byref(p), ctypes.byref(ctx)) == 0, lib.lrm_last_error(None)
    st = lib.lrm_reconstruct_file(ctx, sys.argv[3].encode(), ctypes.byref(mesh))
    print(threads, st, lib.lrm_last_error(ctx).decode(), flush=True)
    lib.lrm_mesh_free(mesh)
    lib.lrm_free(ctx)
    return st

assert run(0) == 0
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmPeak:"))
cap = (peak_kb << 10) + (512 << 20)  # room for another context, not for ~1000 more thread stacks
resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.exit(run(1024))
"""


def test_threads_beyond_the_cores_cannot_end_the_process(lib, build_dir, fixtures_dir):
    """threads = 1024 uses at most one thread per processor: libgomp exit()s the process when the OS refuses a
    thread, here an address-space cap with no room for a thousand more stacks (before: exit status 1)."""
    so = next(iter(sorted(build_dir.glob("liblrm_rt.so*"))))
    image = fixtures_dir / "checkpoints" / "triposr-tiny" / "input.png"
    res = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(so), str(_export(build_dir, "triposr-tiny")),
                          str(image)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
