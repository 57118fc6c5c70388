// Marching cubes on a dense float grid -> welded, indexed triangle mesh in a deterministic order.
//
// Grid: R0 x R1 x R2 float32, C order, point p = (i, j, k) at flat index (i * R1 + j) * R2 + k.
// Inside means value > level (PyMCubes' convention: a value equal to the level is outside).
// Output: one vertex per crossed grid edge, in grid index units (x, y, z) = (i, j, k) + t * e_axis,
// and triangles indexing those shared vertices, wound outward (positive volume for inside = above).
//
// Three GPU-style passes, shared by both targets (the scans are the only target-specific part):
//   1. lrm_mc_classify     per grid point: a flags byte (crossed owned edges, triangle count of the
//                          cell whose lowest corner is the point, NaN marker).
//   2. scan (not here)     ordered lists of points with crossed edges (+ exclusive prefix sums of their
//                          edge counts = first vertex id) and of cells with triangles (+ prefix sums of
//                          triangle counts = first face id). CPU: lrm_mc_plan_dense below; GPU: CuPy
//                          flatnonzero / cumsum in lrm_rt/mc.py.
//   3. lrm_mc_emit_vertices / lrm_mc_emit_faces: one thread per listed point / cell, writing at the
//                          scanned offsets, so the order (vertices by edge id 3*p + axis, faces by cell
//                          then table order) never depends on the thread count or scheduling.
// Memory: one byte per grid point, one int64 per grid row (R0 * R1 + 1, row_start) and the compacted
// lists (sized by the surface, not the grid); no per-cell vertex scratch. A cell's vertex ids are found
// by a binary search among the few listed points of the owning grid row.
#include "compat.cuh"
#include "mc_tables.cuh"

#define LRM_MC_EDGE_MASK 0x07u  // bit a: edge p -> p + e_a crosses the level
#define LRM_MC_TRI_SHIFT 3      // bits 3..5: triangles of the cell at p (table max is 5)
#define LRM_MC_TRI_MASK 0x07u
#define LRM_MC_NAN_BIT 0x80u    // the value at p is NaN

// Case index of the cell whose lowest corner is p: bit c set when corner c is inside; corner c is
// at offset (c & 1) * s0 + (c >> 1 & 1) * s1 + (c >> 2 & 1) (strides of axes 0, 1, 2).
LRM_DEVICE_FN int lrm_mc_case(const float* __restrict__ g, int64_t p, int64_t s0, int64_t s1, float level) {
    int c = 0;
    c |= (g[p] > level) ? 1 : 0;
    c |= (g[p + s0] > level) ? 2 : 0;
    c |= (g[p + s1] > level) ? 4 : 0;
    c |= (g[p + s0 + s1] > level) ? 8 : 0;
    c |= (g[p + 1] > level) ? 16 : 0;
    c |= (g[p + s0 + 1] > level) ? 32 : 0;
    c |= (g[p + s1 + 1] > level) ? 64 : 0;
    c |= (g[p + s0 + s1 + 1] > level) ? 128 : 0;
    return c;
}

LRM_DEVICE_FN int lrm_mc_popc3(unsigned m) { return (int)((m & 1u) + ((m >> 1) & 1u) + ((m >> 2) & 1u)); }

// Crossing parameter along a -> b. For finite values with a <= level < b (or the reverse) float
// rounding keeps t in [0, 1] unless b - a overflows (ends of opposite sign near +-3.4e38): then the
// same quotient is taken on halved values, which cannot overflow. Infinite corner values put the
// crossing at the finite end (the limit of the interpolation), or midway when both ends are infinite.
LRM_DEVICE_FN float lrm_mc_lerp_t(float a, float b, float level) {
    const float d = b - a;
    const float t = (level - a) / d;
    if (t >= 0.f && t <= 1.f && d - d == 0.f) return t;
    const bool a_inf = !(a - a == 0.f), b_inf = !(b - b == 0.f);
    if (!a_inf && !b_inf) {
        const float th = (0.5f * level - 0.5f * a) / (0.5f * b - 0.5f * a);
        return th < 0.f ? 0.f : (th > 1.f ? 1.f : th);
    }
    return (a_inf && !b_inf) ? 1.f : ((!a_inf && b_inf) ? 0.f : 0.5f);
}

// First position in the sorted list a[0..n) whose value is >= x.
LRM_DEVICE_FN int64_t lrm_mc_lower_bound(const int64_t* __restrict__ a, int64_t n, int64_t x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + ((hi - lo) >> 1);
        if (a[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Pass 1 granularity. The GPU gives each grid point its own thread (coalesced loads). The CPU walks
// whole rows along axis 2 instead, carrying the corner signs from one cell to the next: every value is
// compared once per row pass, no 64-bit division is done per point, and blocks without a sign change
// are skipped (4-8x faster than per point on a 256^3 sphere).
// Both variants write identical flags; -DLRM_MC_POINTWISE=1 forces the GPU variant on the CPU (tests).
#ifndef LRM_MC_POINTWISE
#define LRM_MC_POINTWISE LRM_CUDA
#endif

// Pass 1. n = R0 * R1 * R2 (all of R0, R1, R2 >= 2; the host/Python side returns an empty mesh otherwise).
LRM_KERNEL void lrm_mc_classify(int64_t n, const float* __restrict__ grid, int64_t R0, int64_t R1, int64_t R2,
                                float level, unsigned char* __restrict__ flags) {
#if LRM_MC_POINTWISE
    LRM_FOR_EACH(p, n) {
        const int64_t s1 = R2, s0 = R1 * R2;
        const int64_t k = p % R2, j = (p / R2) % R1, i = p / s0;
        const float v = grid[p];
        const bool in = v > level;
        const bool hi = i + 1 < R0, hj = j + 1 < R1, hk = k + 1 < R2;
        unsigned f = (v != v) ? LRM_MC_NAN_BIT : 0u;
        if (hi && ((grid[p + s0] > level) != in)) f |= 1u;
        if (hj && ((grid[p + s1] > level) != in)) f |= 2u;
        if (hk && ((grid[p + 1] > level) != in)) f |= 4u;
        if (hi && hj && hk) f |= (unsigned)lrm_mc_num_tris[lrm_mc_case(grid, p, s0, s1, level)] << LRM_MC_TRI_SHIFT;
        flags[p] = (unsigned char)f;
    }
#else
    (void)n;
    LRM_FOR_EACH(r, R0 * R1) {  // row r = (i, j): points (i, j, 0 .. R2-1)
        const int64_t i = r / R1, j = r % R1, s0 = R1 * R2;
        const bool hi = i + 1 < R0, hj = j + 1 < R1;
        const float* g0 = grid + r * R2;  // rows (i, j), (i+1, j), (i, j+1), (i+1, j+1) = corners 0..3
        const float* g1 = g0 + (hi ? s0 : 0);  // absent rows alias row (i, j); their bits are masked
        const float* g2 = g0 + (hj ? R2 : 0);
        const float* g3 = g0 + (hi && hj ? s0 + R2 : 0);
        const unsigned keep = 1u | (hi ? 2u : 0u) | (hj ? 4u : 0u) | (hi && hj ? 8u : 0u);
        unsigned char* fr = flags + r * R2;
        // Blocks of the row: first the corner-sign nibbles (a branch-free loop the compiler
        // vectorises), then flags from nibble pairs (k, k + 1). One extra nibble overlaps blocks.
        const int64_t B = 256;
        unsigned char nib[B + 1];
        for (int64_t k0 = 0; k0 < R2; k0 += B) {
            const int64_t m = (R2 - k0 < B + 1) ? R2 - k0 : B + 1;  // nibbles k0 .. k0+m-1
            unsigned any = 0u, all = 15u, nan = 0u;
            for (int64_t q = 0; q < m; ++q) {
                const int64_t k = k0 + q;
                const unsigned c = ((g0[k] > level) | ((g1[k] > level) << 1) | ((g2[k] > level) << 2) |
                                    ((g3[k] > level) << 3)) & keep;
                nib[q] = (unsigned char)c;
                any |= c;
                all &= c;
                nan |= g0[k] != g0[k];
            }
            const int64_t cells = (m == B + 1) ? B : m - 1;  // points k0 .. k0+cells-1 have a k + 1 neighbour
            if (!nan && (any == 0u || all == keep)) {  // no sign change in the block (the common case)
                const int64_t npts = (m == B + 1) ? B : m;
                for (int64_t q = 0; q < npts; ++q) fr[k0 + q] = 0;
                continue;
            }
            for (int64_t q = 0; q < cells; ++q) {
                const unsigned a = nib[q], b = nib[q + 1];
                const unsigned in = a & 1u;
                // crossed edges: axis 0 / 1 compare corner 0 with corners 1 / 2 (absent: masked to
                // 0 and excluded by `keep`), axis 2 compares with corner 4 = bit 0 of b.
                unsigned f = ((((a >> 1) & 1u) ^ in) & (keep >> 1)) | (((((a >> 2) & 1u) ^ in) & (keep >> 2)) << 1) |
                             (((b & 1u) ^ in) << 2);
                if (keep == 15u) f |= (unsigned)lrm_mc_num_tris[a | (b << 4)] << LRM_MC_TRI_SHIFT;
                if (g0[k0 + q] != g0[k0 + q]) f |= LRM_MC_NAN_BIT;
                fr[k0 + q] = (unsigned char)f;
            }
            if (m < B + 1) {  // the row's last point: no +k edge, no cell
                const unsigned a = nib[m - 1], in = a & 1u;
                unsigned f = ((((a >> 1) & 1u) ^ in) & (keep >> 1)) | (((((a >> 2) & 1u) ^ in) & (keep >> 2)) << 1);
                if (g0[R2 - 1] != g0[R2 - 1]) f |= LRM_MC_NAN_BIT;
                fr[R2 - 1] = (unsigned char)f;
            }
        }
    }
#endif
}

// Pass 3a. points[t]: the t-th point with a crossed edge (ascending); vbase[t]: its first vertex id.
// verts: (n_vertices, 3) float32.
LRM_KERNEL void lrm_mc_emit_vertices(int64_t n_points, const int64_t* __restrict__ points,
                                     const int64_t* __restrict__ vbase, const unsigned char* __restrict__ flags,
                                     const float* __restrict__ grid, int64_t R0, int64_t R1, int64_t R2,
                                     float level, float* __restrict__ verts) {
    LRM_FOR_EACH(t, n_points) {
        const int64_t p = points[t];
        const int64_t s1 = R2, s0 = R1 * R2;
        const int64_t k = p % R2, j = (p / R2) % R1, i = p / s0;
        const unsigned f = flags[p];
        const float a = grid[p];
        int64_t out = vbase[t];
        for (int axis = 0; axis < 3; ++axis) {
            if (!((f >> axis) & 1u)) continue;
            const int64_t stride = axis == 0 ? s0 : (axis == 1 ? s1 : 1);
            const float tt = lrm_mc_lerp_t(a, grid[p + stride], level);
            float* v = verts + 3 * out;
            v[0] = (float)i + (axis == 0 ? tt : 0.f);
            v[1] = (float)j + (axis == 1 ? tt : 0.f);
            v[2] = (float)k + (axis == 2 ? tt : 0.f);
            ++out;
        }
    }
    (void)R0;
}

// Pass 3b. cells[t]: the t-th cell (by its lowest corner) with triangles (ascending); tbase[t]: its
// first face id. points / vbase as above; row_start[r] (r = 0 .. R0*R1): the first slot of `points` in
// grid row r (= lower bound of r * R2), so the vertex lookups search one row, a few entries, instead of
// the whole list. faces: (n_faces, 3) int64 vertex ids.
LRM_KERNEL void lrm_mc_emit_faces(int64_t n_cells, const int64_t* __restrict__ cells,
                                  const int64_t* __restrict__ tbase, const int64_t* __restrict__ row_start,
                                  const int64_t* __restrict__ points, const int64_t* __restrict__ vbase,
                                  const unsigned char* __restrict__ flags, const float* __restrict__ grid,
                                  int64_t R0, int64_t R1, int64_t R2, float level, int64_t* __restrict__ faces) {
    LRM_FOR_EACH(t, n_cells) {
        const int64_t p = cells[t];
        const int64_t s1 = R2, s0 = R1 * R2;
        const int cs = lrm_mc_case(grid, p, s0, s1, level);
        const int64_t row0 = p / R2;
        const int nv = 3 * (int)lrm_mc_num_tris[cs];
        // Vertex id per cell edge, resolved once (a fan reuses its first vertex).
        int64_t vid[12];
        for (int e = 0; e < 12; ++e) vid[e] = -1;
        int64_t* out = faces + 3 * tbase[t];
        for (int q = 0; q < nv; ++q) {
            const int e = lrm_mc_tri_edges[cs][q];
            if (vid[e] < 0) {
                const int axis = e >> 2;
                const int owner = lrm_mc_edge_owner[e];
                const int64_t pt = p + (owner & 1) * s0 + ((owner >> 1) & 1) * s1 + ((owner >> 2) & 1);
                // The edge is crossed, so pt is in the list: its slot gives the first vertex id of pt,
                // and the lower crossed axes of pt come before this one.
                const int64_t row = row0 + (owner & 1) * R1 + ((owner >> 1) & 1), lo = row_start[row];
                const int64_t slot = lo + lrm_mc_lower_bound(points + lo, row_start[row + 1] - lo, pt);
                vid[e] = vbase[slot] + lrm_mc_popc3((unsigned)flags[pt] & ((1u << axis) - 1u));
            }
            out[q] = vid[e];
        }
    }
    (void)R0;
}

// CPU build only (under nvcc the kernels above are __global__ and cannot be called like this).
#if LRM_HOST_API && !LRM_CUDA
#include "host_api.h"
#include <algorithm>
#include <memory>
#include <new>
#include <vector>

// Status codes of the host API.
#define LRM_MC_OK 0
#define LRM_MC_EINVAL -1
#define LRM_MC_ENAN -2
#define LRM_MC_ENOMEM -3

namespace {

struct McPlan {
    const float* grid = nullptr;  // borrowed: the caller keeps it alive until emit
    int64_t R0 = 0, R1 = 0, R2 = 0;
    float level = 0.f;
    std::unique_ptr<unsigned char[]> flags;  // not zero-filled: pass 1 writes every byte
    std::vector<int64_t> points, vbase, cells, tbase, row_start;
    int64_t n_vertices = 0, n_faces = 0;
};

// Functors (not function pointers) so that compact() inlines them.
struct EdgeWeight {
    int64_t operator()(unsigned f) const { return lrm_mc_popc3(f & LRM_MC_EDGE_MASK); }
};
struct CellWeight {
    int64_t operator()(unsigned f) const { return (f >> LRM_MC_TRI_SHIFT) & LRM_MC_TRI_MASK; }
};

// Calls fn(p) for the p in [begin, end) with flags[p] != 0, in order. Most of a grid is far from the
// surface, so whole 8-byte words of zero flags are skipped at once.
template <class Fn>
inline void for_each_nonzero(const unsigned char* flags, int64_t begin, int64_t end, Fn fn) {
    int64_t p = begin;
    for (; p + 8 <= end; p += 8) {
        uint64_t w;
        std::memcpy(&w, flags + p, 8);
        if (!w) continue;
        for (int q = 0; q < 8; ++q)
            if (flags[p + q]) fn(p + q);
    }
    for (; p < end; ++p)
        if (flags[p]) fn(p);
}

// Pass 2 on the CPU: ordered compaction + exclusive scan over fixed chunks. The chunking depends only
// on n, and each chunk writes a precomputed range, so the result is the same for any thread count.
template <class Weight>
int64_t compact(const unsigned char* flags, int64_t n, Weight weight, std::vector<int64_t>& idx,
                std::vector<int64_t>& base, int64_t* nan_count) {
    const int64_t chunk = 1 << 16;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    std::vector<int64_t> cnt(nchunks + 1, 0), sum(nchunks + 1, 0), nan(nchunks, 0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        int64_t m = 0, s = 0, bad = 0;
        for_each_nonzero(flags, c * chunk, std::min(n, c * chunk + chunk), [&](int64_t p) {
            const int64_t w = weight(flags[p]);
            m += w != 0;
            s += w;
            bad += (flags[p] & LRM_MC_NAN_BIT) != 0;
        });
        cnt[c + 1] = m;
        sum[c + 1] = s;
        nan[c] = bad;
    }
    for (int64_t c = 0; c < nchunks; ++c) {
        cnt[c + 1] += cnt[c];
        sum[c + 1] += sum[c];
        if (nan_count) *nan_count += nan[c];
    }
    idx.resize(cnt[nchunks]);
    base.resize(cnt[nchunks]);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        int64_t m = cnt[c], s = sum[c];
        for_each_nonzero(flags, c * chunk, std::min(n, c * chunk + chunk), [&](int64_t p) {
            const int64_t w = weight(flags[p]);
            if (w) {
                idx[m] = p;
                base[m] = s;
                ++m;
                s += w;
            }
        });
    }
    return sum[nchunks];
}

}  // namespace

// Passes 1 and 2 on a dense grid. On success *plan owns the scratch (free it with lrm_mc_plan_free)
// and the sizes of the mesh are known; lrm_mc_plan_emit then fills caller buffers. Grids with a side
// < 2 give an empty mesh. Returns LRM_MC_ENAN (and no plan) if the grid holds a NaN.
extern "C" int lrm_mc_plan_dense(const float* grid, int64_t R0, int64_t R1, int64_t R2, float level,
                                 void** plan, int64_t* n_vertices, int64_t* n_faces) {
    if (!plan || !n_vertices || !n_faces || R0 < 0 || R1 < 0 || R2 < 0) return LRM_MC_EINVAL;
    *plan = nullptr;
    *n_vertices = *n_faces = 0;
    if (level != level) return LRM_MC_EINVAL;
    McPlan* mp = nullptr;
    try {
        mp = new McPlan();
        mp->grid = grid;
        mp->R0 = R0, mp->R1 = R1, mp->R2 = R2;
        mp->level = level;
        if (R0 >= 2 && R1 >= 2 && R2 >= 2) {
            if (!grid) { delete mp; return LRM_MC_EINVAL; }
            const int64_t n = R0 * R1 * R2;
            mp->flags.reset(new unsigned char[n]);
            lrm_mc_classify(n, grid, R0, R1, R2, level, mp->flags.get());
            int64_t nan_count = 0;
            mp->n_vertices = compact(mp->flags.get(), n, EdgeWeight(), mp->points, mp->vbase, &nan_count);
            if (nan_count) { delete mp; return LRM_MC_ENAN; }
            mp->n_faces = compact(mp->flags.get(), n, CellWeight(), mp->cells, mp->tbase, nullptr);
            // First slot of each grid row in the sorted point list (R0 * R1 + 1 entries).
            const int64_t rows = R0 * R1, np_ = (int64_t)mp->points.size();
            mp->row_start.resize(rows + 1);
            const int64_t* pts = mp->points.data();
#pragma omp parallel for schedule(static)
            for (int64_t r = 0; r <= rows; ++r) mp->row_start[r] = lrm_mc_lower_bound(pts, np_, r * R2);
        }
    } catch (const std::bad_alloc&) {
        delete mp;
        return LRM_MC_ENOMEM;
    }
    *plan = mp;
    *n_vertices = mp->n_vertices;
    *n_faces = mp->n_faces;
    return LRM_MC_OK;
}

// Pass 3: vertices (n_vertices x 3 float32) and faces (n_faces x 3 int64), both caller-allocated.
extern "C" int lrm_mc_plan_emit(void* plan, float* vertices, int64_t* faces) {
    McPlan* mp = static_cast<McPlan*>(plan);
    if (!mp || (mp->n_vertices && !vertices) || (mp->n_faces && !faces)) return LRM_MC_EINVAL;
    const int64_t np = (int64_t)mp->points.size();
    lrm_mc_emit_vertices(np, mp->points.data(), mp->vbase.data(), mp->flags.get(), mp->grid, mp->R0, mp->R1,
                         mp->R2, mp->level, vertices);
    lrm_mc_emit_faces((int64_t)mp->cells.size(), mp->cells.data(), mp->tbase.data(), mp->row_start.data(),
                      mp->points.data(), mp->vbase.data(), mp->flags.get(), mp->grid, mp->R0, mp->R1, mp->R2,
                      mp->level, faces);
    return LRM_MC_OK;
}

extern "C" void lrm_mc_plan_free(void* plan) { delete static_cast<McPlan*>(plan); }
#endif  // LRM_HOST_API && !LRM_CUDA
