"""xatlas in a child process: ``python -m lrm_rt._uv_unwrap IN.npz OUT.npz SIZE PADDING``.

xatlas is native code that can crash on some meshes (an 82k-face icosphere segfaults in 0.0.11); run here, a crash
ends this process only, and the caller reports it as an error instead of losing the whole reconstruction.
"""
import sys

import numpy as np


def main(src: str, dst: str, size: int, padding: int) -> None:
    import xatlas

    with np.load(src) as z:
        vertices, faces = z["vertices"], z["faces"]
    charts = xatlas.ChartOptions()
    charts.max_iterations = 1  # one pass of chart growing: ~2x faster, charts as usable for baking
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
