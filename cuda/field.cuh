// Triplane field: bilinear triplane sampling + NeRF MLP decoding + family activations, and the pieces of
// coarse-to-fine density-grid evaluation. Device functions only; the kernels and the CPU C ABI live in
// triplane_field.cu. Everything here compiles for NVRTC, nvcc and the plain C++ (OpenMP) build.
//
// Data layouts shared by every entry point:
//   planes  (3, H, W, C) channel-last for the kernels (one contiguous C-vector per texel, so each bilinear
//           tap is a single contiguous read); float32, or IEEE half bits (uint16) in the *_f16 kernels.
//           The CPU C ABI takes the model's (3, C, H, W) layout and repacks internally.
//   params  the decoder's linear layers back to back, each as nn.Linear stores it:
//           W (out x in, row-major) followed by b (out).
//   dims    int32 [in_0, out_0, out_1, ..., out_{L-1}] (L + 1 entries); in_0 = 3C, out_{L-1} = 4
//           ([raw density, 3 raw colour channels]).
//   grids   (R, R, R) float32, flat index (i*R + j)*R + k <-> (axis[i], axis[j], axis[k]).
#pragma once
#include "compat.cuh"

// FieldSpec conventions as flag bits (lrm_rt/field/spec.py).
#define LRM_FIELD_THIRD_ZY 1       // plane 2 sampled at (z, y) (OpenLRM) instead of (y, z) (TripoSR)
#define LRM_FIELD_RELU 2           // hidden activation ReLU (OpenLRM) instead of SiLU (TripoSR)
#define LRM_FIELD_SOFTPLUS 4       // density softplus(raw + bias) (OpenLRM) instead of exp(raw + bias)
#define LRM_FIELD_COLOR_CLAMP 8    // colour sigmoid*1.002 - 0.001 (OpenLRM) instead of sigmoid
#define LRM_FIELD_RAW_DENSITY 16   // query returns the raw density channel (no bias, no activation)

// Status codes of the C ABI.
#define LRM_FIELD_OK 0
#define LRM_FIELD_EINVAL 1
#define LRM_FIELD_ENOMEM 2

// Widest layer (3C included) a per-point kernel can hold: the activations live in per-thread arrays. The CUDA
// backend compiles with -DLRM_FIELD_MAX_WIDTH sized to the decoder; the CPU fast path has no such limit.
#ifndef LRM_FIELD_MAX_WIDTH
#define LRM_FIELD_MAX_WIDTH 256
#endif

// ---- element loads: float planes, or half planes stored as raw bits (no cuda_fp16.h: NVRTC needs no headers)

LRM_DEVICE_FN float lrm_load_plane(const float* p, int64_t i) { return p[i]; }

LRM_DEVICE_FN float lrm_half_bits_to_float(unsigned short h) {
#if LRM_ON_DEVICE
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    // IEEE binary16 -> binary32 by hand, so the f16 kernels also run (and are tested) in the CPU build.
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t ex = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (ex == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (ex != 0) {
        bits = sign | ((ex + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal half: normalise the mantissa
        int e = -1;
        do { man <<= 1; ++e; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

LRM_DEVICE_FN float lrm_load_plane(const unsigned short* p, int64_t i) { return lrm_half_bits_to_float(p[i]); }

// ---- sampling

// Plane (u, v) of a point already divided by the radius: u indexes W, v indexes H (grid_sample's x, y).
LRM_DEVICE_FN void lrm_plane_uv(const float* p, int plane, int flags, float* u, float* v) {
    if (plane == 0) { *u = p[0]; *v = p[1]; }
    else if (plane == 1) { *u = p[0]; *v = p[2]; }
    else if (flags & LRM_FIELD_THIRD_ZY) { *u = p[2]; *v = p[1]; }
    else { *u = p[1]; *v = p[2]; }
}

// Bilinear taps of F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): texel
// indices y*W + x (or -1 when outside the plane, i.e. contributing zero) and weights, in torch's
// nw, ne, sw, se order.
struct LrmTaps {
    int64_t idx[4];
    float w[4];
};

LRM_DEVICE_FN void lrm_bilinear_taps(float u, float v, int H, int W, LrmTaps* t) {
    float ix = ((u + 1.f) * (float)W - 1.f) * 0.5f;
    float iy = ((v + 1.f) * (float)H - 1.f) * 0.5f;
    // Far-out (or NaN) coordinates only need to stay out of bounds; clamping keeps the int casts defined.
    ix = fminf(fmaxf(ix, -2.f), (float)W + 1.f);
    iy = fminf(fmaxf(iy, -2.f), (float)H + 1.f);
    float fx = floorf(ix), fy = floorf(iy);
    int x0 = (int)fx, y0 = (int)fy;
    float wx1 = ix - fx, wx0 = fx + 1.f - ix;
    float wy1 = iy - fy, wy0 = fy + 1.f - iy;
    int xs[4] = {x0, x0 + 1, x0, x0 + 1};
    int ys[4] = {y0, y0, y0 + 1, y0 + 1};
    t->w[0] = wx0 * wy0;
    t->w[1] = wx1 * wy0;
    t->w[2] = wx0 * wy1;
    t->w[3] = wx1 * wy1;
    for (int k = 0; k < 4; ++k) {
        bool in = xs[k] >= 0 && xs[k] < W && ys[k] >= 0 && ys[k] < H;
        t->idx[k] = in ? (int64_t)ys[k] * W + xs[k] : -1;
    }
}

// ---- activations

LRM_DEVICE_FN float lrm_hidden_act(float x, int flags) {
    return (flags & LRM_FIELD_RELU) ? fmaxf(x, 0.f) : lrm_silu(x);
}

LRM_DEVICE_FN float lrm_density_act(float raw, int flags, float density_bias) {
    if (flags & LRM_FIELD_RAW_DENSITY) return raw;
    float x = raw + density_bias;
    return (flags & LRM_FIELD_SOFTPLUS) ? lrm_softplus(x) : expf(x);
}

LRM_DEVICE_FN float lrm_color_act(float raw, int flags) {
    float c = lrm_sigmoid(raw);
    return (flags & LRM_FIELD_COLOR_CLAMP) ? c * (1.f + 2.f * 0.001f) - 0.001f : c;
}

// ---- one point, one thread (GPU kernels and the CPU reference kernels)

// Decodes the field at world point pos. out[0] = density (activated, or raw with LRM_FIELD_RAW_DENSITY);
// out[1..3] = activated colour when want_rgb (otherwise the colour rows of the last layer are skipped).
// params may point to shared memory (GPU) or global memory; every thread reads the same weight at the
// same time, so shared-memory reads are broadcasts.
template <typename PT>
LRM_DEVICE_FN void lrm_field_eval_point(const float* pos, const PT* __restrict__ planes, int C, int H, int W,
                                        const float* params, const int* __restrict__ dims, int n_layers,
                                        int flags, float radius, float density_bias, int want_rgb, float* out) {
    for (int l = 0; l <= n_layers; ++l) {
        if (dims[l] > LRM_FIELD_MAX_WIDTH) {  // would overrun h/g: report NaN instead (hosts check widths first)
            out[0] = out[1] = out[2] = out[3] = nanf("");
            return;
        }
    }
    float h[LRM_FIELD_MAX_WIDTH];
    float g[LRM_FIELD_MAX_WIDTH];
    // Division, not multiplication by 1/r: the reference divides, and the plane coordinate feeds floor().
    float p[3] = {pos[0] / radius, pos[1] / radius, pos[2] / radius};
    const int64_t plane_size = (int64_t)H * W * C;
    for (int pl = 0; pl < 3; ++pl) {
        float u, v;
        lrm_plane_uv(p, pl, flags, &u, &v);
        LrmTaps t;
        lrm_bilinear_taps(u, v, H, W, &t);
        const PT* base = planes + pl * plane_size;
        float* f = h + pl * C;
        for (int c = 0; c < C; ++c) f[c] = 0.f;
        for (int k = 0; k < 4; ++k) {
            if (t.idx[k] < 0) continue;
            const int64_t o = t.idx[k] * C;
            for (int c = 0; c < C; ++c) f[c] += t.w[k] * lrm_load_plane(base, o + c);
        }
    }
    const float* w = params;
    for (int l = 0; l < n_layers; ++l) {
        const int I = dims[l], O = dims[l + 1];
        const bool last = l == n_layers - 1;
        const int n_out = (last && !want_rgb) ? 1 : O;
        const float* b = w + (int64_t)O * I;
        // Four output rows at a time: each activation h[i] (per-thread local memory on a GPU) is loaded once
        // for four multiply-adds instead of one. Every output keeps its own accumulation order, so results
        // are bit-identical to one row at a time.
        int o = 0;
        for (; o + 4 <= n_out; o += 4) {
            const float* r0 = w + (int64_t)o * I;
            const float *r1 = r0 + I, *r2 = r1 + I, *r3 = r2 + I;
            float a0 = b[o], a1 = b[o + 1], a2 = b[o + 2], a3 = b[o + 3];
            for (int i = 0; i < I; ++i) {
                const float x = h[i];
                a0 = fmaf(r0[i], x, a0);
                a1 = fmaf(r1[i], x, a1);
                a2 = fmaf(r2[i], x, a2);
                a3 = fmaf(r3[i], x, a3);
            }
            g[o] = last ? a0 : lrm_hidden_act(a0, flags);
            g[o + 1] = last ? a1 : lrm_hidden_act(a1, flags);
            g[o + 2] = last ? a2 : lrm_hidden_act(a2, flags);
            g[o + 3] = last ? a3 : lrm_hidden_act(a3, flags);
        }
        for (; o < n_out; ++o) {
            const float* row = w + (int64_t)o * I;
            float acc = b[o];
            for (int i = 0; i < I; ++i) acc = fmaf(row[i], h[i], acc);
            g[o] = last ? acc : lrm_hidden_act(acc, flags);
        }
        for (int o = 0; o < n_out; ++o) h[o] = g[o];
        w = b + O;
    }
    out[0] = lrm_density_act(h[0], flags, density_bias);
    if (want_rgb)
        for (int c = 0; c < 3; ++c) out[1 + c] = lrm_color_act(h[1 + c], flags);
}

// ---- coarse-to-fine lattices
//
// Level s of an R-point axis is the node set {0, s, 2s, ...} plus R-1 (so the box edge is always a node);
// the cells between consecutive nodes are s wide except possibly a shorter last one. Levels with
// power-of-two strides nest, so a node of level s keeps its (exact or filled) value at every finer level.

LRM_DEVICE_FN int64_t lrm_lattice_count(int64_t R, int64_t s) {
    return (R - 1) / s + 1 + (((R - 1) % s) != 0 ? 1 : 0);
}

// Fine index of the a-th node of level s.
LRM_DEVICE_FN int64_t lrm_lattice_node(int64_t R, int64_t s, int64_t a) {
    const int64_t x = a * s;
    return x < R - 1 ? x : R - 1;
}

LRM_DEVICE_FN bool lrm_on_lattice(int64_t R, int64_t s, int64_t x) { return x % s == 0 || x == R - 1; }

// Level-s cells (out of nc along the axis) whose closed extent holds fine index x: c_hi always, c_lo != c_hi
// when x sits on an interior cell boundary.
LRM_DEVICE_FN void lrm_cells_of(int64_t x, int64_t s, int64_t nc, int64_t* c_lo, int64_t* c_hi) {
    int64_t c = x / s;
    *c_hi = c < nc - 1 ? c : nc - 1;
    *c_lo = (x % s == 0 && c > 0 && c - 1 < *c_hi) ? c - 1 : *c_hi;
}

// Refinement tests compare values in the decoder's raw scale (space 1: log for exp densities, space 2:
// inverse softplus; space 0: the values as stored): the MLP output is smooth there, while exp turns gentle
// raw bumps into narrow peaks whose tips can hide between coarse nodes. Zero densities map to -100.
LRM_DEVICE_FN float lrm_c2f_space(float v, int space) {
    if (space == 0) return v;
    float x = space == 1 ? logf(v) : (v > 20.f ? v : logf(expm1f(v)));
    return x > -100.f ? x : (x != x ? x : -100.f);  // keep NaN: it must refine
}

// A level-s cell is active (refined) when the level lies within its corner range widened by
// m = margin_abs + margin_rel * (range of the values around it): with nbhd, the 4x4x4 nodes of the cell and
// its neighbours, so a cell next to a steep or curved stretch (where a peak could rise between nodes) is
// refined even if its own corners stay clear of the level. Non-finite values always refine.
LRM_DEVICE_FN bool lrm_c2f_cell_active(const float* __restrict__ grid, int64_t R, int64_t s, int64_t nc,
                                       const int64_t* cell, float level, float margin_rel, float margin_abs,
                                       int space, int nbhd) {
    float clo = 0.f, chi = 0.f, rlo = 0.f, rhi = 0.f;
    bool first_c = true, first_r = true;
    const int64_t r = nbhd ? 1 : 0;
    int64_t a0[3], a1[3];
    for (int d = 0; d < 3; ++d) {  // node (lattice) index ranges: the cell's nodes c, c+1 (+-r)
        a0[d] = cell[d] - r > 0 ? cell[d] - r : 0;
        a1[d] = cell[d] + 1 + r < nc ? cell[d] + 1 + r : nc;
    }
    for (int64_t a = a0[0]; a <= a1[0]; ++a)
        for (int64_t b = a0[1]; b <= a1[1]; ++b)
            for (int64_t c = a0[2]; c <= a1[2]; ++c) {
                const int64_t i = (lrm_lattice_node(R, s, a) * R + lrm_lattice_node(R, s, b)) * R + lrm_lattice_node(R, s, c);
                const float v = lrm_c2f_space(grid[i], space);
                if (!(v - v == 0.f)) return true;  // NaN or inf
                rlo = (first_r || v < rlo) ? v : rlo;
                rhi = (first_r || v > rhi) ? v : rhi;
                first_r = false;
                const bool own = a >= cell[0] && a <= cell[0] + 1 && b >= cell[1] && b <= cell[1] + 1 &&
                                 c >= cell[2] && c <= cell[2] + 1;
                if (own) {
                    clo = (first_c || v < clo) ? v : clo;
                    chi = (first_c || v > chi) ? v : chi;
                    first_c = false;
                }
            }
    const float m = margin_abs + margin_rel * (rhi - rlo);
    return clo - m <= level && level <= chi + m;
}

LRM_DEVICE_FN void lrm_cell_bounds(int64_t c, int64_t s, int64_t R, int64_t* lo, int64_t* hi) {
    *lo = c * s;
    *hi = (c + 1) * s < R - 1 ? (c + 1) * s : R - 1;
}

// Is fine node (x, y, z) inside (the closed box of) any active level-s cell?
LRM_DEVICE_FN bool lrm_c2f_node_active(const unsigned char* __restrict__ mask, int64_t nc, int64_t s,
                                       int64_t x, int64_t y, int64_t z) {
    int64_t cx[2], cy[2], cz[2];
    lrm_cells_of(x, s, nc, &cx[0], &cx[1]);
    lrm_cells_of(y, s, nc, &cy[0], &cy[1]);
    lrm_cells_of(z, s, nc, &cz[0], &cz[1]);
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
            for (int c = 0; c < 2; ++c)
                if (mask[(cx[a] * nc + cy[b]) * nc + cz[c]]) return true;
    return false;
}

// Trilinear value at fine node (x, y, z) from the corners of its level-s cell, clamped to the corner range:
// every corner of an inactive cell is on the same side of the level, so the fill is too (even after rounding).
LRM_DEVICE_FN float lrm_c2f_fill(const float* __restrict__ grid, int64_t R, int64_t s, int64_t nc,
                                 int64_t x, int64_t y, int64_t z) {
    int64_t c0, c, lo[3], hi[3];
    const int64_t q[3] = {x, y, z};
    float t[3];
    for (int d = 0; d < 3; ++d) {
        lrm_cells_of(q[d], s, nc, &c0, &c);
        lrm_cell_bounds(c, s, R, &lo[d], &hi[d]);
        t[d] = (float)(q[d] - lo[d]) / (float)(hi[d] - lo[d]);
    }
    float acc = 0.f, vlo = 0.f, vhi = 0.f;
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
            for (int e = 0; e < 2; ++e) {
                const float w = (a ? t[0] : 1.f - t[0]) * (b ? t[1] : 1.f - t[1]) * (e ? t[2] : 1.f - t[2]);
                const int64_t i = ((a ? hi[0] : lo[0]) * R + (b ? hi[1] : lo[1])) * R + (e ? hi[2] : lo[2]);
                const float v = grid[i];
                acc += w * v;
                if ((a | b | e) == 0) vlo = vhi = v;
                vlo = v < vlo ? v : vlo;
                vhi = v > vhi ? v : vhi;
            }
    return acc < vlo ? vlo : (acc > vhi ? vhi : acc);
}

// Stages the first smem_floats floats of params (the whole decoder) in dynamic shared memory, shared by
// every kernel of the module (every thread reads every weight); smem_floats <= 0 reads global memory.
LRM_DEVICE_FN const float* lrm_stage_params(const float* params, int smem_floats) {
#if LRM_ON_DEVICE
    extern __shared__ float lrm_field_smem[];
    if (smem_floats <= 0) return params;
    for (int i = threadIdx.x; i < smem_floats; i += blockDim.x) lrm_field_smem[i] = params[i];
    __syncthreads();
    return lrm_field_smem;
#else
    (void)smem_floats;
    return params;
#endif
}
