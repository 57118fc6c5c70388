#!/usr/bin/env python3
"""Generate cuda/mc_tables.cuh, the marching-cubes case table, from first principles.

Nothing is copied from another implementation: for each of the 256 inside/outside patterns of a
cell's 8 corners the surface is built face by face and then closed into polygons:

* Every cell face with sign changes gets contour segments between the crossings on its edges. A
  face with 2 crossings has one segment. An *ambiguous* face (4 crossings: the two inside corners on
  one diagonal, the two outside corners on the other) is always resolved by cutting off each OUTSIDE
  corner, i.e. the inside corners stay connected across the face. The rule looks only at the face's
  own 4 signs, so the two cells sharing a face always draw the same segments there: the welded mesh
  has no cracks (closed surfaces come out watertight). This rule also reproduces the per-case
  triangle counts of the classic Lorensen/Bourke table that PyMCubes and torchmcubes use, so face
  counts match them exactly (checked in tests/test_marching_cubes.py).
* Each segment is oriented with the inside region on its right when the face is seen from outside
  the cell. Every crossed edge then starts exactly one segment and ends exactly one, so the segments
  chain into closed loops (assertions below).
* Each loop is split into triangles (triangulate_loop: minimum total diagonal length, never a
  diagonal between two crossings on the same cell face, so no edge is shared by four triangles).
  Triangles keep the loop direction, so their normals point from "inside" (field above the level)
  to "outside": positive volume.

Conventions shared with marching_cubes.cu: corner c sits at offset (c & 1, c >> 1 & 1, c >> 2 & 1)
along grid axes (0, 1, 2); bit c of the case index is set when corner c is inside (value > level);
edge e = 4 * axis + m runs along `axis` from its owner corner (the m-th corner, in increasing order,
whose `axis` bit is 0) to owner | (1 << axis).

Usage: python cuda/gen_mc_tables.py            # rewrite cuda/mc_tables.cuh
       python cuda/gen_mc_tables.py --check    # exit 1 if the committed header is out of date
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = Path(__file__).resolve().parent / "mc_tables.cuh"


def corner_pos(c: int) -> tuple:
    return (c & 1, (c >> 1) & 1, (c >> 2) & 1)


# 12 edges: (owner corner, other corner), axis-major.
EDGES = [(c, c | (1 << a)) for a in range(3) for c in range(8) if not (c >> a) & 1]


def _faces() -> list:
    """6 faces: (its 4 edge ids, outward normal)."""
    faces = []
    for a in range(3):
        for side in (0, 1):
            corners = {c for c in range(8) if ((c >> a) & 1) == side}
            edges = [e for e, (p, q) in enumerate(EDGES) if p in corners and q in corners]
            normal = [0, 0, 0]
            normal[a] = 2 * side - 1
            faces.append((edges, tuple(normal)))
    return faces


FACES = _faces()


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b))


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _mid2(e: int) -> tuple:
    """Twice the edge midpoint (integer arithmetic keeps the orientation tests exact)."""
    p, q = EDGES[e]
    return tuple(x + y for x, y in zip(corner_pos(p), corner_pos(q)))


def triangulate(case: int) -> list:
    """Triangles (edge-id triples, outward winding) for one corner sign pattern."""
    inside = [(case >> c) & 1 for c in range(8)]
    nxt = {}
    for edges, normal in FACES:
        crossed = [e for e in edges if inside[EDGES[e][0]] != inside[EDGES[e][1]]]
        if len(crossed) == 2:
            segments = [tuple(crossed)]
        elif len(crossed) == 4:
            # Ambiguous face: cut off each outside corner (the pair of face edges meeting there).
            face_corners = {c for e in edges for c in EDGES[e]}
            segments = [tuple(e for e in edges if c in EDGES[e])
                        for c in sorted(face_corners) if not inside[c]]
        else:
            assert not crossed
            segments = []
        for e1, e2 in segments:
            # The segment's line crosses e1 at its midpoint, so e1's first corner lies strictly on one
            # side; orient so that inside lies on the right seen from outside the cell
            # ((direction x to_corner) . normal < 0 for an inside corner).
            pa, pb = _mid2(e1), _mid2(e2)
            q = EDGES[e1][0]
            qpos2 = tuple(2 * x for x in corner_pos(q))
            s = _dot(_cross(_sub(pb, pa), _sub(qpos2, pa)), normal)
            assert s != 0
            if (s < 0) != bool(inside[q]):
                e1, e2 = e2, e1
            assert e1 not in nxt, (case, e1)
            nxt[e1] = e2
    assert sorted(nxt) == sorted(nxt.values()), case  # every crossing: one segment in, one out
    tris, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, e = [], start
        while e not in seen:
            seen.add(e)
            loop.append(e)
            e = nxt[e]
        assert e == start and len(loop) >= 3
        tris += triangulate_loop(loop)
    return tris


def _share_face(e1: int, e2: int) -> bool:
    return any(e1 in edges and e2 in edges for edges, _ in FACES)


def _length(e1: int, e2: int) -> float:
    d = _sub(_mid2(e1), _mid2(e2))
    return _dot(d, d) ** 0.5


def triangulate_loop(loop: list) -> list:
    """Split one polygon loop into triangles, keeping the loop's winding.

    Minimum total diagonal length (midpoint geometry; a static proxy for small, well-shaped triangles),
    with one hard rule: no diagonal may join two crossings on the same cell face. Such a pair lies on
    an ambiguous face, and if the neighbouring cell drew the same diagonal the edge would be shared by
    four triangles (a non-manifold edge). Interior diagonals cannot be shared with any other cell, so
    the welded mesh stays a 2-manifold. O(n^3) dynamic programme over the sub-polygons [i..j]; ties go
    to the smallest split vertex, so the table is deterministic.
    """
    n = len(loop)
    inf = float("inf")

    def diag(i, j):  # cost of chord (i, j); 0 for the polygon's own sides
        if j - i == 1 or (i == 0 and j == n - 1):
            return 0.0
        if _share_face(loop[i], loop[j]):
            return inf
        return _length(loop[i], loop[j])

    best, split = {}, {}
    for span in range(2, n):
        for i in range(0, n - span):
            j = i + span
            cost, arg = inf, None
            for k in range(i + 1, j):
                c = best.get((i, k), 0.0) + best.get((k, j), 0.0) + diag(i, k) + diag(k, j)
                if c < cost:
                    cost, arg = c, k
            best[(i, j)], split[(i, j)] = cost, arg
    assert best[(0, n - 1)] < inf, f"no manifold triangulation for loop {loop}"
    tris = []

    def emit(i, j):
        if j - i < 2:
            return
        k = split[(i, j)]
        tris.append((loop[i], loop[k], loop[j]))  # increasing loop order = the loop's winding
        emit(i, k)
        emit(k, j)

    emit(0, n - 1)
    return tris


def build_tables() -> tuple:
    tables = [triangulate(c) for c in range(256)]
    max_tris = max(len(t) for t in tables)
    return tables, max_tris


def render_header() -> str:
    tables, max_tris = build_tables()
    width = 3 * max_tris
    lines = [
        "// GENERATED by cuda/gen_mc_tables.py -- do not edit; rerun the script instead.",
        "// Marching-cubes case table built from first principles (see the generator's docstring):",
        "// ambiguous faces keep the inside corners connected (crack-free welded meshes), no diagonal joins",
        "// two crossings on one cell face (2-manifold), triangles wind outward for inside = value > level.",
        "// Corner c is at offset (c&1, c>>1&1, c>>2&1) along grid axes",
        "// (0,1,2); edge e runs along axis e/4 from corner lrm_mc_edge_owner[e] to owner | (1 << axis).",
        "#pragma once",
        "",
        "#include \"compat.cuh\"",
        "",
        "// Plain global memory on the GPU, not __constant__: neighbouring threads look up different",
        "// cases, which the constant cache would serialise.",
        "#if LRM_CUDA",
        "#define LRM_MC_TABLE static __device__ const",
        "#else",
        "#define LRM_MC_TABLE static const",
        "#endif",
        "",
        f"#define LRM_MC_MAX_TRIS {max_tris}",
        "",
        "LRM_MC_TABLE unsigned char lrm_mc_edge_owner[12] = {"
        + ", ".join(str(p) for p, _ in EDGES) + "};",
        "",
        "// Number of triangles per case.",
        "LRM_MC_TABLE unsigned char lrm_mc_num_tris[256] = {",
    ]
    for row in range(0, 256, 16):
        lines.append("    " + ", ".join(f"{len(tables[c])}" for c in range(row, row + 16)) + ",")
    lines += [
        "};",
        "",
        f"// Edge ids of the triangles per case, {max_tris} x 3, padded with -1.",
        f"LRM_MC_TABLE signed char lrm_mc_tri_edges[256][{width}] = {{",
    ]
    for c, tris in enumerate(tables):
        flat = [e for t in tris for e in t] + [-1] * (width - 3 * len(tris))
        lines.append("    {" + ", ".join(f"{e:2d}" for e in flat) + f"}},  // {c:3d}")
    lines += ["};", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the committed header")
    args = ap.parse_args(argv)
    text = render_header()
    if args.check:
        ok = HEADER.is_file() and HEADER.read_text() == text
        if not ok:
            print(f"{HEADER.name} is out of date: run python cuda/gen_mc_tables.py", file=sys.stderr)
        return 0 if ok else 1
    HEADER.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
