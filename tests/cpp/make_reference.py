"""ctest fixture setup: Python-side references for the C library's tests.

For each fixture checkpoint (``--models``), under ``--out/<name>/``:
  export/          ``lrm-rt export --model <ckpt> --out export --aoti`` (ONNX graphs, decoder, network.pt2)
  python/input.ply ``lrm-rt reconstruct <ckpt>/input.png --model <ckpt> --mc-resolution 64 --precision fp32``
                   (python_y_up/: the same with ``--orientation y_up``)
  image.rgba       the Python loader's RGBA8 pixels of input.png (raw, row-major)
  pixels.f32       the Python preprocessing's encoder input (1, 3, S, S), raw float32
  reference.json   their shapes
and under ``--out/broken/``: export directories damaged in one way each, listed with the status the C API must
return in ``cases.txt`` (``<dir> <create|reconstruct> <LRM_ERR_...>``).

Exports are reused while the checkpoint, the lrm_rt sources that shape them and torch are unchanged (the
AOTInductor compile takes about a minute per model).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "lrm_rt.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stamp_of(ckpt: Path) -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for p in sorted(ckpt.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    pkg = REPO / "lrm_rt"
    for p in sorted([*pkg.glob("*.py"), *(pkg / "models").glob("*.py"), *(pkg / "export").glob("*.py")]):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def model_reference(ckpt: Path, out: Path) -> None:
    from lrm_rt.export import manifest_config, read_manifest
    from lrm_rt.pipeline import preprocess_config
    from lrm_rt.preprocess import load_image, preprocess

    out.mkdir(parents=True, exist_ok=True)
    export, stamp = out / "export", out / "export.stamp"
    want = stamp_of(ckpt)
    if not (stamp.is_file() and stamp.read_text() == want and (export / "manifest.json").is_file()):
        stamp.unlink(missing_ok=True)
        cli("export", "--model", str(ckpt), "--out", str(export), "--aoti", "--quiet")
        stamp.write_text(want)
    # fp32: the library runs the network in fp32 (the CLI's default may pick bf16 on some CPUs)
    for sub, orientation in (("python", "native"), ("python_y_up", "y_up")):
        cli("reconstruct", str(ckpt / "input.png"), "--model", str(ckpt), "--mc-resolution", "64", "--format", "ply",
            "--precision", "fp32", "--orientation", orientation, "--out", str(out / sub), "--quiet")
    cfg = manifest_config(read_manifest(export))
    rgba = load_image(ckpt / "input.png")
    pixels = preprocess(rgba, preprocess_config(cfg)).pixel_values.numpy()
    (out / "image.rgba").write_bytes(np.ascontiguousarray(rgba).tobytes())
    (out / "pixels.f32").write_bytes(np.ascontiguousarray(pixels, dtype="<f4").tobytes())
    (out / "reference.json").write_text(json.dumps({"width": int(rgba.shape[1]), "height": int(rgba.shape[0]),
                                                    "input_size": cfg.input_size, "family": cfg.family}))


def broken_exports(good: Path, other: Path, out: Path) -> None:
    """Export directories with one defect each; ``good`` and ``other`` are exports of two different models."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    man = json.loads((good / "manifest.json").read_text())
    cases = []

    def make(name: str, stage: str, status: str, manifest=None, files=("decoder.safetensors", "network.pt2"),
             raw_manifest=None) -> Path:
        d = out / name
        d.mkdir()
        for f in files:
            shutil.copy2(good / f, d / f)
        if raw_manifest is not None:
            (d / "manifest.json").write_text(raw_manifest)
        elif manifest is not None:
            (d / "manifest.json").write_text(json.dumps(manifest))
        cases.append(f"{name} {stage} {status}")
        return d

    def edited(**changes):
        m = json.loads(json.dumps(man))
        for path, value in changes.items():
            node = m
            keys = path.split("__")
            for k in keys[:-1]:
                node = node[k]
            if value is None:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = value
        return m

    make("no_manifest", "create", "LRM_ERR_ARTIFACT")
    make("bad_json", "create", "LRM_ERR_ARTIFACT", raw_manifest="{ this is not json")
    make("format_version", "create", "LRM_ERR_ARTIFACT", edited(format_version=99))
    make("failed_export", "create", "LRM_ERR_ARTIFACT", edited(format="lrm_rt-export-FAILED"))
    make("no_aoti", "create", "LRM_ERR_ARTIFACT", edited(aoti=None), files=("decoder.safetensors",))
    make("missing_network", "create", "LRM_ERR_ARTIFACT", man, files=("decoder.safetensors",))
    make("missing_decoder", "create", "LRM_ERR_ARTIFACT", man, files=("network.pt2",))
    make("triplane_mismatch", "create", "LRM_ERR_ARTIFACT",
         edited(triplane__shape=[3, man["triplane"]["shape"][1] + 1, *man["triplane"]["shape"][2:]]))
    d = make("decoder_swapped", "create", "LRM_ERR_ARTIFACT", man)
    shutil.copy2(other / "decoder.safetensors", d / "decoder.safetensors")
    # Without the hash, what the shapes reveal: a layer count or a width that does not fit the config.
    make("decoder_layers_mismatch", "create", "LRM_ERR_ARTIFACT",
         edited(decoder__sha256=None, decoder__layers=man["decoder"]["layers"] + 1))
    d = make("decoder_wrong_width", "create", "LRM_ERR_ARTIFACT", edited(decoder__sha256=None))
    tensors = load_file(str(good / "decoder.safetensors"))
    tensors["layers.0.weight"] = tensors["layers.0.weight"][:, 1:].contiguous()
    save_file(tensors, str(d / "decoder.safetensors"))
    d = make("network_swapped", "create", "LRM_ERR_ARTIFACT", man)
    shutil.copy2(other / "network.pt2", d / "network.pt2")
    # Without the size and hash the package loads; running it on this model's input must fail cleanly.
    d = make("network_swapped_nohash", "reconstruct", "LRM_ERR_BACKEND", edited(aoti__sha256=None, aoti__bytes=None))
    shutil.copy2(other / "network.pt2", d / "network.pt2")
    d = make("network_truncated_nohash", "create", "LRM_ERR_ARTIFACT", edited(aoti__sha256=None, aoti__bytes=None))
    data = (good / "network.pt2").read_bytes()
    (d / "network.pt2").write_bytes(data[: len(data) // 2])
    # Manifest values outside what the library (and the Python side) accepts.
    make("foreground_ratio_tiny", "create", "LRM_ERR_ARTIFACT", edited(config__foreground_ratio=0.01))
    make("background_out_of_range", "create", "LRM_ERR_ARTIFACT", edited(config__background=300))
    make("background_nan", "create", "LRM_ERR_ARTIFACT", edited(config__background=[0.5, float("nan"), 0.5]))
    make("mc_threshold_nan", "create", "LRM_ERR_ARTIFACT", edited(config__mc_threshold=float("nan")))
    make("mc_threshold_inf", "create", "LRM_ERR_ARTIFACT", edited(config__mc_threshold=float("inf")))
    make("mc_resolution_huge", "create", "LRM_ERR_ARTIFACT", edited(config__mc_resolution=4097))
    # Without aoti.inputs nothing ties config.input_size to the compiled network (AOTInductor does not check).
    make("no_aoti_inputs", "create", "LRM_ERR_ARTIFACT", edited(aoti__inputs=None, config__input_size=128))
    d = make("decoder_offsets_wrap", "create", "LRM_ERR_ARTIFACT",
             edited(decoder__sha256=None, decoder__layers=2, config__decoder_linear_layers=2))
    (d / "decoder.safetensors").write_bytes(wrapping_decoder(3 * man["config"]["triplane_dim"]))
    (out / "cases.txt").write_text("\n".join(cases) + "\n")


def wrapping_decoder(features: int, hidden: int = 64) -> bytes:
    """A 2-layer decoder.safetensors whose first tensor ends at data_offsets 2**64 - data0: with the header's
    8 + data0 bytes added in size_t, the end wraps to 0 and every bound looks fine."""
    import struct

    data0 = 2048  # the offsets near 2**64 are then exact doubles (JSON numbers): the spacing there is 2048
    shapes = {"layers.0.weight": [hidden, features], "layers.0.bias": [hidden], "layers.1.weight": [4, hidden],
              "layers.1.bias": [4]}
    header, off = {}, 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    n0 = 4 * hidden * features
    assert n0 % 2048 == 0
    header["layers.0.weight"]["data_offsets"] = [2**64 - data0 - n0, 2**64 - data0]
    text = json.dumps(header).encode().ljust(data0 - 8)
    return struct.pack("<Q", len(text)) + text + bytes(off)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", nargs="+", default=["triposr-tiny", "openlrm-tiny-1.1"])
    args = ap.parse_args()
    for name in args.models:
        ckpt = args.fixtures / "checkpoints" / name
        if not (ckpt / "input.png").is_file():
            print(f"fixture checkpoint not found: {ckpt}", file=sys.stderr)
            return 1
        model_reference(ckpt, args.out / name)
    if len(args.models) >= 2:
        broken_exports(args.out / args.models[0] / "export", args.out / args.models[1] / "export", args.out / "broken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
