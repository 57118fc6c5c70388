"""Move a trained lrm-tiny to a larger input by resizing its patch embedding (same token grid).

    python training/resize_patches.py --src OLD_MODEL_DIR --out NEW_MODEL_DIR

Stages 1-7 of lrm-tiny ran at 112 px with 14 px patches (an 8x8 token grid). At 128 px with 16 px patches the
grid, the position table and every weight after the patch embedding stay as they are; only the 14x14 kernel
becomes a 16x16 one, chosen so that a patch upsampled from 14 to 16 px (bicubic) gets exactly the embedding the
old kernel gave the 14 px patch: with x16 = B x14, the new kernel w16 solves B^T w16 = w14, whose least-norm
solution is pinv(B^T) w14 (B has full column rank, so the equation holds exactly). A 128 px view of an object
is close to such an upsample of its 112 px view, so the network's output barely moves (model card, stage 8).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PATCH_WEIGHT = "encoder.model.patch_embed.proj.weight"


def upsample_matrix(old: int, new: int, mode: str = "bicubic") -> torch.Tensor:
    """B (new*new, old*old): the flattened ``F.interpolate`` of an old x old patch to new x new."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(-1, 1, old, old)
    up = F.interpolate(basis, size=(new, new), mode=mode, align_corners=False)
    return up.reshape(old * old, new * new).T


def resize_patch_kernel(weight: torch.Tensor, new: int, mode: str = "bicubic") -> torch.Tensor:
    """(D, C, k, k) -> (D, C, new, new) with <w_new, up(x)> == <w, x> for every k x k patch x."""
    d, c, old, old2 = weight.shape
    if old != old2 or new < old:
        raise ValueError(f"need a square kernel growing in size, got {old}x{old2} -> {new}")
    pinv = torch.linalg.pinv(upsample_matrix(old, new, mode).T)  # (new*new, old*old)
    flat = weight.double().reshape(d * c, old * old)
    return (flat @ pinv.T).reshape(d, c, new, new).to(weight.dtype).contiguous()


def converted_state(src: Path) -> dict:
    """src's weights with the patch kernel resized to model_def.py's architecture, checked against it (strict)."""
    from safetensors.torch import load_file

    from lrm_rt.models.dinov2 import dinov2_config
    from lrm_rt.models.network import LRMNetwork
    from model_def import KWARGS, model_config

    if not (src / "model.safetensors").is_file():
        sys.exit(f"--src: no model.safetensors in {src}")
    if (src / "config.json").is_file():  # only the encoder's name may differ: everything else is kept as it is
        try:
            cfg = json.loads((src / "config.json").read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"--src: unreadable config.json in {src}: {e}")
        other = sorted(k for k in set(cfg) | set(KWARGS)
                       if k != "encoder_model_name" and (not isinstance(cfg, dict) or cfg.get(k) != KWARGS.get(k)))
        if other:
            sys.exit(f"--src: {src} is another architecture than model_def.py's (differs in {', '.join(other)})")
    try:
        state = load_file(str(src / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        sys.exit(f"--src: cannot read {src / 'model.safetensors'}: {' '.join(str(e).split())}")
    if PATCH_WEIGHT not in state:
        sys.exit(f"--src: {src} has no {PATCH_WEIGHT}: not a DINOv2-encoder lrm-tiny")
    patch = dinov2_config(KWARGS["encoder_model_name"]).patch_size
    kernel = state[PATCH_WEIGHT]
    if kernel.shape[-1] == patch:
        sys.exit(f"--src already has {patch} px patches")
    try:
        state[PATCH_WEIGHT] = resize_patch_kernel(kernel, patch)
    except ValueError as e:
        sys.exit(f"--src: its {tuple(kernel.shape[-2:])} patch kernel cannot become {patch}x{patch}: {e}")
    try:
        LRMNetwork(model_config()).load_state_dict(state, strict=True)
    except RuntimeError as e:
        sys.exit(f"--src: its weights do not fit model_def.py's architecture: {' '.join(str(e).split())[:300]}")
    return state


def main() -> None:
    from export import write_model
    from model_def import INFER, KWARGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="model folder at the old input size (model.safetensors, infer.yaml)")
    ap.add_argument("--out", required=True, help="model folder to write, in model_def.py's architecture")
    args = ap.parse_args()
    src = Path(args.src)
    state = converted_state(src)
    infer = dict(INFER)
    if (src / "infer.yaml").is_file():  # keep the level tuned for the source weights
        import yaml

        try:
            old = yaml.safe_load((src / "infer.yaml").read_text())
        except (OSError, yaml.YAMLError) as e:
            sys.exit(f"--src: unreadable infer.yaml in {src}: {' '.join(str(e).split())}")
        if isinstance(old, dict) and isinstance(old.get("mesh_thres"), (int, float)):
            infer["mesh_thres"] = old["mesh_thres"]
    write_model(state, infer, Path(args.out))
    print(f"wrote {args.out}: input {INFER['source_size']} px, encoder {KWARGS['encoder_model_name']}, "
          f"mesh_thres {infer['mesh_thres']:g}")


if __name__ == "__main__":
    main()
