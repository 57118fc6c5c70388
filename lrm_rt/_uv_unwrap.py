"""xatlas in a child process: ``python -m lrm_rt._uv_unwrap IN.npz OUT.npz SIZE PADDING``.

xatlas is native code that can crash on some meshes (an 82k-face icosphere segfaults in 0.0.11); run here, a crash
ends this process only, and the caller reports it as an error instead of losing the whole reconstruction.
"""
import sys

import numpy as np


def main(src: str, dst: str, size: int, padding: int) -> None:
    import xatlas

    with np.load(src) as z:
        vertices, faces = z["vertices"].astype(np.float64), z["faces"]
    # UVs do not depend on scale, but xatlas drops faces under a fixed area epsilon: the slivers marching cubes
    # makes in a [-1, 1] box (areas ~1e-8) got no chart and uv (0, 0), a tiny mesh no chart at all (uv NaN).
    # Scaled so that the box's longest side is 1000, such faces are ~1e-2 and charted like the rest.
    if len(vertices):
        lo, hi = vertices.min(0), vertices.max(0)
        vertices = (vertices - (lo + hi) / 2) * (1000.0 / max(float((hi - lo).max()), 1e-30))
    vertices = vertices.astype(np.float32)
    charts = xatlas.ChartOptions()
    charts.max_iterations = 1  # one pass of chart growing: ~2x faster, charts as usable for baking
    # Charts of at most 1 % of the surface: xatlas's chart growing slows down with chart size, so this caps
    # the time (lrm-tiny's chair, 2 cores: 33k faces 7.4 -> 1.4 s, 138k faces 63 -> 14 s), at some atlas
    # utilisation on small meshes (33k faces: 0.82 -> 0.67 of the texels used; 138k: 0.83 either way)
    corners = vertices[faces].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1).sum()
    if area > 0:
        charts.max_chart_area = float(area / 100)
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = padding
    pack.bilinear = True
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    atlas.generate(charts, pack)
    vmap, uv_faces, uv = atlas[0]
    np.savez(dst, vmap=vmap, faces=uv_faces, uv=uv)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
