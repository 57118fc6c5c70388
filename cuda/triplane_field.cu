// Triplane field kernels (GPU through NVRTC/CuPy, and the same kernels as OpenMP loops in the CPU build)
// plus the CPU C ABI (lrm_field_*), which uses a tiled, vectorised evaluator instead of the per-point kernels.
// Layouts and flags: field.cuh.
#include "field.cuh"

// ================================================================================================
// Kernels (one logical thread per point / node). Common trailing field arguments:
//   planes (3,H,W,C) channel-last, C, H, W, params, dims, n_layers, flags, radius, density_bias,
//   smem_floats: > 0 stages the first smem_floats floats of params (the whole decoder) in dynamic shared
//   memory (launch with smem_floats * 4 bytes); 0 reads the weights from global memory (L1/L2 cached).
// ================================================================================================
#define LRM_FIELD_PARAMS(PT)                                                                                 \
    const PT *__restrict__ planes, int C, int H, int W, const float *__restrict__ params,                   \
        const int *__restrict__ dims, int n_layers, int flags, float radius, float density_bias, int smem_floats
#define LRM_FIELD_PASS planes, C, H, W, params, dims, n_layers, flags, radius, density_bias, smem_floats

// Point queries: density (n) and, when want_rgb, rgb (n, 3).
template <typename PT>
LRM_DEVICE_FN void lrm_field_query_body(int64_t n, const float* __restrict__ points, LRM_FIELD_PARAMS(PT),
                                        int want_rgb, float* __restrict__ density, float* __restrict__ rgb) {
    const float* w = lrm_stage_params(params, smem_floats);
    LRM_FOR_EACH(i, n) {
        float out[4];
        lrm_field_eval_point(points + 3 * i, planes, C, H, W, w, dims, n_layers, flags, radius, density_bias,
                             want_rgb, out);
        density[i] = out[0];
        if (want_rgb)
            for (int c = 0; c < 3; ++c) rgb[3 * i + c] = out[1 + c];
    }
}

// Fine indices of node t of level s (m = count(R, s) nodes per axis; x slowest, z fastest).
LRM_DEVICE_FN void lrm_level_node(int64_t R, int64_t s, int64_t m, int64_t t, int64_t* x, int64_t* y, int64_t* z) {
    *x = lrm_lattice_node(R, s, t / (m * m));
    *y = lrm_lattice_node(R, s, (t / m) % m);
    *z = lrm_lattice_node(R, s, t % m);
}

// Decodes grid node (x, y, z) into the grid (activated density).
template <typename PT>
LRM_DEVICE_FN void lrm_decode_node(int64_t R, int64_t x, int64_t y, int64_t z, const float* __restrict__ axis,
                                   const PT* __restrict__ planes, int C, int H, int W, const float* w,
                                   const int* __restrict__ dims, int n_layers, int flags, float radius,
                                   float density_bias, float* __restrict__ grid) {
    const float pos[3] = {axis[x], axis[y], axis[z]};
    float out[4];
    lrm_field_eval_point(pos, planes, C, H, W, w, dims, n_layers, flags, radius, density_bias, 0, out);
    grid[(x * R + y) * R + z] = out[0];
}
#define LRM_DECODE_PASS planes, C, H, W, w, dims, n_layers, flags, radius, density_bias, grid

// Refinement level s -> s/2, new node (x, y, z): true when it lies in an active level-s cell (it must be
// decoded); otherwise fills it by clamped trilinear interpolation. Nodes of level s keep their values.
LRM_DEVICE_FN bool lrm_c2f_fill_or_flag(const unsigned char* __restrict__ mask, float* __restrict__ grid, int64_t R,
                                        int64_t s, int64_t nc, int64_t x, int64_t y, int64_t z) {
    if (lrm_on_lattice(R, s, x) && lrm_on_lattice(R, s, y) && lrm_on_lattice(R, s, z)) return false;
    if (lrm_c2f_node_active(mask, nc, s, x, y, z)) return true;
    grid[(x * R + y) * R + z] = lrm_c2f_fill(grid, R, s, nc, x, y, z);
    return false;
}

// Activated density at every node of lattice level s (n = count(R, s)^3); s = 1 is the dense grid.
template <typename PT>
LRM_DEVICE_FN void lrm_field_lattice_body(int64_t n, int64_t R, int64_t s, const float* __restrict__ axis,
                                          LRM_FIELD_PARAMS(PT), float* __restrict__ grid) {
    const float* w = lrm_stage_params(params, smem_floats);
    const int64_t m = lrm_lattice_count(R, s);
    LRM_FOR_EACH(t, n) {
        int64_t x, y, z;
        lrm_level_node(R, s, m, t, &x, &y, &z);
        lrm_decode_node(R, x, y, z, axis, LRM_DECODE_PASS);
    }
}

// Refines level s -> s/2: each new node of level s/2 (n = count(R, s/2)^3 threads) is evaluated when it lies
// in an active level-s cell and filled by clamped trilinear interpolation otherwise.
template <typename PT>
LRM_DEVICE_FN void lrm_field_c2f_level_body(int64_t n, int64_t R, int64_t s, const unsigned char* __restrict__ mask,
                                            const float* __restrict__ axis, LRM_FIELD_PARAMS(PT),
                                            float* __restrict__ grid) {
    const float* w = lrm_stage_params(params, smem_floats);
    const int64_t s2 = s / 2, m2 = lrm_lattice_count(R, s2), nc = lrm_lattice_count(R, s) - 1;
    LRM_FOR_EACH(t, n) {
        int64_t x, y, z;
        lrm_level_node(R, s2, m2, t, &x, &y, &z);
        if (lrm_c2f_fill_or_flag(mask, grid, R, s, nc, x, y, z)) lrm_decode_node(R, x, y, z, axis, LRM_DECODE_PASS);
    }
}

LRM_KERNEL void lrm_field_query_f32(int64_t n, const float* __restrict__ points, LRM_FIELD_PARAMS(float),
                                    int want_rgb, float* __restrict__ density, float* __restrict__ rgb) {
    lrm_field_query_body<float>(n, points, LRM_FIELD_PASS, want_rgb, density, rgb);
}
LRM_KERNEL void lrm_field_query_f16(int64_t n, const float* __restrict__ points, LRM_FIELD_PARAMS(unsigned short),
                                    int want_rgb, float* __restrict__ density, float* __restrict__ rgb) {
    lrm_field_query_body<unsigned short>(n, points, LRM_FIELD_PASS, want_rgb, density, rgb);
}
LRM_KERNEL void lrm_field_lattice_f32(int64_t n, int64_t R, int64_t s, const float* __restrict__ axis,
                                      LRM_FIELD_PARAMS(float), float* __restrict__ grid) {
    lrm_field_lattice_body<float>(n, R, s, axis, LRM_FIELD_PASS, grid);
}
LRM_KERNEL void lrm_field_lattice_f16(int64_t n, int64_t R, int64_t s, const float* __restrict__ axis,
                                      LRM_FIELD_PARAMS(unsigned short), float* __restrict__ grid) {
    lrm_field_lattice_body<unsigned short>(n, R, s, axis, LRM_FIELD_PASS, grid);
}
LRM_KERNEL void lrm_field_c2f_level_f32(int64_t n, int64_t R, int64_t s, const unsigned char* __restrict__ mask,
                                        const float* __restrict__ axis, LRM_FIELD_PARAMS(float),
                                        float* __restrict__ grid) {
    lrm_field_c2f_level_body<float>(n, R, s, mask, axis, LRM_FIELD_PASS, grid);
}
LRM_KERNEL void lrm_field_c2f_level_f16(int64_t n, int64_t R, int64_t s, const unsigned char* __restrict__ mask,
                                        const float* __restrict__ axis, LRM_FIELD_PARAMS(unsigned short),
                                        float* __restrict__ grid) {
    lrm_field_c2f_level_body<unsigned short>(n, R, s, mask, axis, LRM_FIELD_PASS, grid);
}

// Compacted refinement, the GPU's way (lrm_field_c2f_level evaluates in place, which on a GPU runs every
// warp that holds one node near the surface at the cost of a full one). Step 1, over new nodes t0 .. t0+n-1
// of level s/2: fill those outside active cells, flag those inside (need[t - t0] = 1).
LRM_KERNEL void lrm_c2f_level_split(int64_t n, int64_t t0, int64_t R, int64_t s,
                                    const unsigned char* __restrict__ mask, float* __restrict__ grid,
                                    unsigned char* __restrict__ need) {
    const int64_t s2 = s / 2, m2 = lrm_lattice_count(R, s2), nc = lrm_lattice_count(R, s) - 1;
    LRM_FOR_EACH(i, n) {
        int64_t x, y, z;
        lrm_level_node(R, s2, m2, t0 + i, &x, &y, &z);
        need[i] = lrm_c2f_fill_or_flag(mask, grid, R, s, nc, x, y, z) ? 1 : 0;
    }
}

// Step 2: decodes the flagged nodes, t = t0 + idx[i] (n = number of flags set), one per thread.
template <typename PT>
LRM_DEVICE_FN void lrm_field_c2f_points_body(int64_t n, const int64_t* __restrict__ idx, int64_t t0, int64_t R,
                                             int64_t s, const float* __restrict__ axis, LRM_FIELD_PARAMS(PT),
                                             float* __restrict__ grid) {
    const float* w = lrm_stage_params(params, smem_floats);
    const int64_t s2 = s / 2, m2 = lrm_lattice_count(R, s2);
    LRM_FOR_EACH(i, n) {
        int64_t x, y, z;
        lrm_level_node(R, s2, m2, t0 + idx[i], &x, &y, &z);
        lrm_decode_node(R, x, y, z, axis, LRM_DECODE_PASS);
    }
}
LRM_KERNEL void lrm_field_c2f_points_f32(int64_t n, const int64_t* __restrict__ idx, int64_t t0, int64_t R,
                                         int64_t s, const float* __restrict__ axis, LRM_FIELD_PARAMS(float),
                                         float* __restrict__ grid) {
    lrm_field_c2f_points_body<float>(n, idx, t0, R, s, axis, LRM_FIELD_PASS, grid);
}
LRM_KERNEL void lrm_field_c2f_points_f16(int64_t n, const int64_t* __restrict__ idx, int64_t t0, int64_t R,
                                         int64_t s, const float* __restrict__ axis, LRM_FIELD_PARAMS(unsigned short),
                                         float* __restrict__ grid) {
    lrm_field_c2f_points_body<unsigned short>(n, idx, t0, R, s, axis, LRM_FIELD_PASS, grid);
}

// Level-s cell activity (n = nc^3 cells, nc = count(R, s) - 1) from the grid values around each cell;
// level is given in the same space (see lrm_c2f_cell_active).
LRM_KERNEL void lrm_c2f_mask(int64_t n, int64_t R, int64_t s, const float* __restrict__ grid, float level,
                             float margin_rel, float margin_abs, int space, int nbhd,
                             unsigned char* __restrict__ mask) {
    const int64_t nc = lrm_lattice_count(R, s) - 1;
    LRM_FOR_EACH(t, n) {
        const int64_t c[3] = {t / (nc * nc), (t / nc) % nc, t % nc};
        mask[t] = lrm_c2f_cell_active(grid, R, s, nc, c, level, margin_rel, margin_abs, space, nbhd) ? 1 : 0;
    }
}

// One axis of a separable box dilation of the cell mask (n = nc^3): out = OR of in over +-radius cells.
LRM_KERNEL void lrm_c2f_dilate(int64_t n, int64_t nc, int axis, int radius, const unsigned char* __restrict__ in,
                               unsigned char* __restrict__ out) {
    const int64_t stride = axis == 0 ? nc * nc : (axis == 1 ? nc : 1);
    LRM_FOR_EACH(t, n) {
        const int64_t c = (t / stride) % nc;
        const int64_t a = c - radius > 0 ? c - radius : 0;
        const int64_t b = c + radius < nc - 1 ? c + radius : nc - 1;
        unsigned char any = 0;
        for (int64_t q = a; q <= b; ++q) any |= in[t + (q - c) * stride];
        out[t] = any ? 1 : 0;
    }
}

// ================================================================================================
// CPU C ABI: tiled evaluator. A tile of TILE points goes through every layer before the next tile, so its
// activations stay in L1; layers are register-blocked micro-GEMMs over transposed, zero-padded weights.
// ================================================================================================
#if LRM_HOST_API && !LRM_CUDA
#include <omp.h>

#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

namespace lrm_field_cpu {

// GCC/Clang vector extensions sized to the target's registers: portable SIMD without intrinsics.
// MR x NB_MAX accumulators + NB_MAX weight vectors + 1 broadcast must fit the register file.
#if defined(__AVX512F__)
constexpr int VL = 16, NB_MAX = 4;  // 32 zmm
#elif defined(__AVX__)
constexpr int VL = 8, NB_MAX = 2;  // 16 ymm
#else
constexpr int VL = 4, NB_MAX = 2;  // SSE (16 xmm) / NEON
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
constexpr int TILE = 16;  // points per tile
constexpr int MR = 4;     // points per micro-kernel

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct AlignedBuf {
    float* p = nullptr;
    explicit AlignedBuf(int64_t n) { p = (float*)std::aligned_alloc(64, (size_t)round_up(n * 4, 64)); }
    ~AlignedBuf() { std::free(p); }
    AlignedBuf(const AlignedBuf&) = delete;
    AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// exp for the SiLU: Cody-Waite reduction + degree-6 polynomial (Cephes expf), ~1 ulp, vectorised.
static inline vf vexp(vf x) {
    const vf hi = vf{} + 88.0f, lo = vf{} - 87.3f;  // keeps 2^n a normal float
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
    const vf t = x * 1.44269504088896341f + magic;
    const vf n = t - magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const vf y = p * r * r + r + 1.0f;
    const vi e = (((vi)t - 0x4B400000) + 127) << 23;
    return y * (vf)e;
}

struct Net {
    int L = 0, C = 0, H = 0, W = 0, flags = 0, ld = 0;
    float radius = 1.f, density_bias = 0.f;
    std::vector<int> I, O, Op;
    std::vector<int64_t> woff;  // per layer: W^T (I x Op) then bias (Op), 64-byte aligned
    AlignedBuf* w = nullptr;
    AlignedBuf* planes = nullptr;  // (3, H, W, C)
    std::vector<float> row0;       // last layer's density row (density-only decoding is a dot product)
    float b0 = 0.f;
    ~Net() {
        delete w;
        delete planes;
    }
};

static int build_net_impl(Net& net, const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                          const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias) {
    if (!planes || !params || !dims || n_layers < 1 || C < 1 || H < 1 || W < 1 || !(radius > 0.f))
        return LRM_FIELD_EINVAL;
    if (dims[0] != 3 * C || dims[n_layers] != 4) return LRM_FIELD_EINVAL;
    for (int l = 0; l <= n_layers; ++l)
        if (dims[l] < 1) return LRM_FIELD_EINVAL;
    net.L = n_layers;
    net.C = (int)C;
    net.H = (int)H;
    net.W = (int)W;
    net.flags = flags;
    net.radius = radius;
    net.density_bias = density_bias;
    int64_t total = 0, widest = dims[0];
    for (int l = 0; l < n_layers; ++l) {
        net.I.push_back(dims[l]);
        net.O.push_back(dims[l + 1]);
        net.Op.push_back((int)round_up(dims[l + 1], VL));
        net.woff.push_back(total);
        total += round_up((int64_t)dims[l] * net.Op[l] + net.Op[l], VL);
        widest = widest > net.Op[l] ? widest : net.Op[l];
    }
    net.ld = (int)round_up(widest, VL);
    net.w = new (std::nothrow) AlignedBuf(total);
    net.planes = new (std::nothrow) AlignedBuf(3 * C * H * W);
    if (!net.w || !net.w->p || !net.planes || !net.planes->p) return LRM_FIELD_ENOMEM;
    const float* src = params;
    for (int l = 0; l < n_layers; ++l) {
        const int I = net.I[l], O = net.O[l], Op = net.Op[l];
        float* wt = net.w->p + net.woff[l];
        for (int64_t q = 0; q < (int64_t)I * Op + Op; ++q) wt[q] = 0.f;
        for (int o = 0; o < O; ++o)
            for (int i = 0; i < I; ++i) wt[(int64_t)i * Op + o] = src[(int64_t)o * I + i];
        for (int o = 0; o < O; ++o) wt[(int64_t)I * Op + o] = src[(int64_t)O * I + o];
        if (l == n_layers - 1) {
            net.row0.assign(src, src + I);
            net.b0 = src[(int64_t)O * I];
        }
        src += (int64_t)O * I + O;
    }
    float* dst = net.planes->p;
    const int64_t HW = H * W;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < 3 * H; ++r) {  // (plane, row) pairs
        const int64_t pl = r / H, y = r % H;
        for (int64_t x = 0; x < W; ++x)
            for (int64_t c = 0; c < C; ++c)
                dst[((pl * H + y) * W + x) * C + c] = planes[(pl * C + c) * HW + y * W + x];
    }
    return LRM_FIELD_OK;
}

// The entry points are extern "C": no exception may leave them (the layer vectors can throw bad_alloc).
static int build_net(Net& net, const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                     const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias) {
    try {
        return build_net_impl(net, planes, C, H, W, params, dims, n_layers, flags, radius, density_bias);
    } catch (const std::bad_alloc&) {
        return LRM_FIELD_ENOMEM;
    }
}

// out[MR rows][NB*VL cols] = in[MR rows][0..I) . wt[0..I)[cols] + b[cols]
template <int NB>
static inline __attribute__((always_inline)) void micro(const float* __restrict in, int ld, int I,
                                                        const float* __restrict wt, int Op,
                                                        const float* __restrict b, float* __restrict out) {
    vf acc[MR][NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
        const vf bj = ((const vf*)b)[j];
#pragma GCC unroll 4
        for (int p = 0; p < MR; ++p) acc[p][j] = bj;
    }
    for (int i = 0; i < I; ++i) {
        const vf* wr = (const vf*)(wt + (int64_t)i * Op);
        vf w[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
            w[j] = wr[j];
            // Keep w in a register: otherwise GCC folds the load into every FMA (MR loads per vector),
            // which costs ~15 % on AVX-512.
#if defined(__x86_64__) || defined(__i386__)
            __asm__("" : "+v"(w[j]));
#elif defined(__aarch64__)
            __asm__("" : "+w"(w[j]));
#endif
        }
#pragma GCC unroll 4
        for (int p = 0; p < MR; ++p) {
            const float x = in[p * ld + i];
#pragma GCC unroll 4
            for (int j = 0; j < NB; ++j) acc[p][j] += x * w[j];
        }
    }
#pragma GCC unroll 4
    for (int p = 0; p < MR; ++p)
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) ((vf*)(out + p * ld))[j] = acc[p][j];
}

static void linear_tile(const Net& net, int l, const float* __restrict in, float* __restrict out) {
    const int I = net.I[l], Op = net.Op[l], ld = net.ld;
    const float* wt = net.w->p + net.woff[l];
    const float* b = wt + (int64_t)I * Op;
    for (int o = 0; o < Op;) {
        const int nb = (Op - o) / VL >= NB_MAX ? NB_MAX : (Op - o) / VL;
        for (int t0 = 0; t0 < TILE; t0 += MR) {
            const float* src = in + t0 * ld;
            float* dst = out + t0 * ld + o;
            switch (nb) {
                case 4: micro<4>(src, ld, I, wt + o, Op, b + o, dst); break;
                case 3: micro<3>(src, ld, I, wt + o, Op, b + o, dst); break;
                case 2: micro<2>(src, ld, I, wt + o, Op, b + o, dst); break;
                default: micro<1>(src, ld, I, wt + o, Op, b + o, dst); break;
            }
        }
        o += nb * VL;
    }
}

static void hidden_act_tile(float* buf, int ld, int Op, int flags) {
    const vf zero = vf{};
    for (int t = 0; t < TILE; ++t) {
        vf* row = (vf*)(buf + t * ld);
        if (flags & LRM_FIELD_RELU) {
            for (int j = 0; j < Op / VL; ++j) row[j] = row[j] > zero ? row[j] : zero;
        } else {
            for (int j = 0; j < Op / VL; ++j) row[j] = row[j] / (1.0f + vexp(-row[j]));
        }
    }
}

// Decodes n <= TILE points (xyz, world units). A and B: TILE * ld floats each, 64-byte aligned.
// rgb == nullptr: density only (the colour rows of the last layer are never computed).
static void eval_tile(const Net& net, const float* __restrict pts, int n, float* __restrict A,
                      float* __restrict B, float* __restrict density, float* __restrict rgb) {
    const int ld = net.ld, C = net.C, H = net.H, W = net.W;
    const int64_t plane_size = (int64_t)H * W * C;
    for (int t = 0; t < TILE; ++t) {
        float* row = A + t * ld;
        for (int i = 0; i < ld; ++i) row[i] = 0.f;
        if (t >= n) continue;  // padding rows stay zero (finite) and are never read back
        const float p[3] = {pts[3 * t] / net.radius, pts[3 * t + 1] / net.radius, pts[3 * t + 2] / net.radius};
        for (int pl = 0; pl < 3; ++pl) {
            float u, v;
            lrm_plane_uv(p, pl, net.flags, &u, &v);
            LrmTaps taps;
            lrm_bilinear_taps(u, v, H, W, &taps);
            const float* base = net.planes->p + pl * plane_size;
            float* __restrict f = row + pl * C;
            for (int k = 0; k < 4; ++k) {
                if (taps.idx[k] < 0) continue;
                const float* __restrict s = base + taps.idx[k] * C;
                const float wk = taps.w[k];
                for (int c = 0; c < C; ++c) f[c] += wk * s[c];
            }
        }
    }
    float* in = A;
    float* out = B;
    for (int l = 0; l < net.L - 1; ++l) {
        linear_tile(net, l, in, out);
        hidden_act_tile(out, ld, net.Op[l], net.flags);
        float* tmp = in;
        in = out;
        out = tmp;
    }
    const int last = net.L - 1;
    if (!rgb) {
        const int I = net.I[last];
        const float* w0 = net.row0.data();
        for (int t = 0; t < n; ++t) {
            const float* h = in + t * ld;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int i = 0; i < I; ++i) acc += h[i] * w0[i];
            density[t] = lrm_density_act(acc + net.b0, net.flags, net.density_bias);
        }
        return;
    }
    linear_tile(net, last, in, out);
    for (int t = 0; t < n; ++t) {
        const float* o = out + t * ld;
        density[t] = lrm_density_act(o[0], net.flags, net.density_bias);
        for (int c = 0; c < 3; ++c) rgb[3 * t + c] = lrm_color_act(o[1 + c], net.flags);
    }
}

// Per-thread scratch and a queue of grid nodes waiting to be decoded as one tile.
struct Worker {
    const Net& net;
    float* grid;
    AlignedBuf A, B;
    float pts[TILE * 3];
    int64_t dst[TILE];
    int n = 0;
    Worker(const Net& net_, float* grid_) : net(net_), grid(grid_), A(TILE * net_.ld), B(TILE * net_.ld) {}
    bool ok() const { return A.p && B.p; }
    void flush() {
        if (!n) return;
        float d[TILE];
        eval_tile(net, pts, n, A.p, B.p, d, nullptr);
        for (int t = 0; t < n; ++t) grid[dst[t]] = d[t];
        n = 0;
    }
    void push(float x, float y, float z, int64_t idx) {
        pts[3 * n] = x;
        pts[3 * n + 1] = y;
        pts[3 * n + 2] = z;
        dst[n] = idx;
        if (++n == TILE) flush();
    }
};

// Evaluates every node of lattice level s (s = 1: the dense grid). Returns the number of points decoded,
// or -1 when scratch allocation failed.
static int64_t eval_lattice(const Net& net, const float* axis, int64_t R, int64_t s, float* grid) {
    const int64_t m = lrm_lattice_count(R, s);
    bool failed = false;
#pragma omp parallel
    {
        Worker wk(net, grid);
        if (!wk.ok()) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t r = 0; r < m * m; ++r) {
            if (!wk.ok()) continue;
            const int64_t x = lrm_lattice_node(R, s, r / m), y = lrm_lattice_node(R, s, r % m);
            const int64_t base = (x * R + y) * R;
            for (int64_t c = 0; c < m; ++c) {
                const int64_t z = lrm_lattice_node(R, s, c);
                wk.push(axis[x], axis[y], axis[z], base + z);
            }
        }
        if (wk.ok()) wk.flush();
    }
    return failed ? -1 : m * m * m;
}

// Per-axis lookup tables for level s (replace divisions in the per-node loop).
struct AxisTables {
    std::vector<int64_t> c_lo, c_hi, lo, hi;
    std::vector<float> t;
    AxisTables(int64_t R, int64_t s, int64_t nc) : c_lo(R), c_hi(R), lo(R), hi(R), t(R) {
        for (int64_t x = 0; x < R; ++x) {
            lrm_cells_of(x, s, nc, &c_lo[x], &c_hi[x]);
            lrm_cell_bounds(c_hi[x], s, R, &lo[x], &hi[x]);
            t[x] = (float)(x - lo[x]) / (float)(hi[x] - lo[x]);
        }
    }
};

// Refines level s -> s/2 (see lrm_field_c2f_level_body). Returns points decoded, -1 on allocation failure.
static int64_t eval_level(const Net& net, const float* axis, int64_t R, int64_t s, const unsigned char* mask,
                          float* grid) {
    const int64_t s2 = s / 2, m2 = lrm_lattice_count(R, s2), nc = lrm_lattice_count(R, s) - 1;
    const AxisTables tab(R, s, nc);
    int64_t evaluated = 0;
    bool failed = false;
#pragma omp parallel reduction(+ : evaluated)
    {
        Worker wk(net, grid);
        // nothrow: a bad_alloc thrown inside an OpenMP region would end the process
        std::unique_ptr<unsigned char[]> rowmask(new (std::nothrow) unsigned char[nc > 0 ? nc : 1]);
        if (!wk.ok() || !rowmask) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t r = 0; r < m2 * m2; ++r) {
            if (!wk.ok() || !rowmask) continue;
            const int64_t x = lrm_lattice_node(R, s2, r / m2), y = lrm_lattice_node(R, s2, r % m2);
            const bool xy_old = lrm_on_lattice(R, s, x) && lrm_on_lattice(R, s, y);
            // OR of the (up to 4) mask rows of the cells around this (x, y) line.
            bool any = false;
            for (int64_t c = 0; c < nc; ++c) {
                const unsigned char v = mask[(tab.c_lo[x] * nc + tab.c_lo[y]) * nc + c] |
                                        mask[(tab.c_lo[x] * nc + tab.c_hi[y]) * nc + c] |
                                        mask[(tab.c_hi[x] * nc + tab.c_lo[y]) * nc + c] |
                                        mask[(tab.c_hi[x] * nc + tab.c_hi[y]) * nc + c];
                rowmask[c] = v;
                any |= v != 0;
            }
            const int64_t base = (x * R + y) * R;
            const float tx = tab.t[x], ty = tab.t[y];
            const int64_t b00 = (tab.lo[x] * R + tab.lo[y]) * R, b01 = (tab.lo[x] * R + tab.hi[y]) * R;
            const int64_t b10 = (tab.hi[x] * R + tab.lo[y]) * R, b11 = (tab.hi[x] * R + tab.hi[y]) * R;
            for (int64_t c = 0; c < m2; ++c) {
                const int64_t z = lrm_lattice_node(R, s2, c);
                if (xy_old && lrm_on_lattice(R, s, z)) continue;  // known from level s
                if (any && (rowmask[tab.c_lo[z]] | rowmask[tab.c_hi[z]])) {
                    wk.push(axis[x], axis[y], axis[z], base + z);
                    ++evaluated;
                    continue;
                }
                const int64_t z0 = tab.lo[z], z1 = tab.hi[z];
                const float tz = tab.t[z];
                const float v[8] = {grid[b00 + z0], grid[b00 + z1], grid[b01 + z0], grid[b01 + z1],
                                    grid[b10 + z0], grid[b10 + z1], grid[b11 + z0], grid[b11 + z1]};
                const float c00 = v[0] + (v[1] - v[0]) * tz, c01 = v[2] + (v[3] - v[2]) * tz;
                const float c10 = v[4] + (v[5] - v[4]) * tz, c11 = v[6] + (v[7] - v[6]) * tz;
                const float c0 = c00 + (c01 - c00) * ty, c1 = c10 + (c11 - c10) * ty;
                float f = c0 + (c1 - c0) * tx, vlo = v[0], vhi = v[0];
                for (int k = 1; k < 8; ++k) {
                    vlo = v[k] < vlo ? v[k] : vlo;
                    vhi = v[k] > vhi ? v[k] : vhi;
                }
                grid[base + z] = f < vlo ? vlo : (f > vhi ? vhi : f);  // stays on the corners' side
            }
        }
        if (wk.ok()) wk.flush();
    }
    return failed ? -1 : evaluated;
}

}  // namespace lrm_field_cpu

#include "host_api.h"

extern "C" {

int32_t lrm_field_simd_lanes(void) { return lrm_field_cpu::VL; }

void lrm_field_set_num_threads(int32_t n) {
    if (n > 0) omp_set_num_threads(n);
}

int32_t lrm_field_get_num_threads(void) { return omp_get_max_threads(); }

// Decodes n points (n, 3) (world units). density (n): activated, or raw with LRM_FIELD_RAW_DENSITY.
// rgb (n, 3) may be NULL: then only the density row of the last layer is computed.
// planes: (3, C, H, W) float32 as the model produces them.
int lrm_field_query(const float* planes, int64_t C, int64_t H, int64_t W, const float* params, const int32_t* dims,
                    int32_t n_layers, int32_t flags, float radius, float density_bias, const float* points, int64_t n,
                    float* density, float* rgb) {
    using namespace lrm_field_cpu;
    if (n < 0 || (n > 0 && (!points || !density))) return LRM_FIELD_EINVAL;
    Net net;
    int st = build_net(net, planes, C, H, W, params, dims, n_layers, flags, radius, density_bias);
    if (st != LRM_FIELD_OK) return st;
    const int64_t tiles = (n + TILE - 1) / TILE;
    bool failed = false;
#pragma omp parallel
    {
        AlignedBuf A(TILE * net.ld), B(TILE * net.ld);
        if (!A.p || !B.p) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t tile = 0; tile < tiles; ++tile) {
            if (!A.p || !B.p) continue;
            const int64_t i0 = tile * TILE;
            const int cnt = (int)(n - i0 < TILE ? n - i0 : TILE);
            eval_tile(net, points + 3 * i0, cnt, A.p, B.p, density + i0, rgb ? rgb + 3 * i0 : nullptr);
        }
    }
    return failed ? LRM_FIELD_ENOMEM : LRM_FIELD_OK;
}

// Dense activated-density grid (R, R, R) at the nodes (axis[i], axis[j], axis[k]).
int lrm_field_density_grid(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                           const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias,
                           const float* axis, int64_t R, float* grid) {
    using namespace lrm_field_cpu;
    if (R < 2 || !axis || !grid || (flags & LRM_FIELD_RAW_DENSITY)) return LRM_FIELD_EINVAL;
    Net net;
    int st = build_net(net, planes, C, H, W, params, dims, n_layers, flags, radius, density_bias);
    if (st != LRM_FIELD_OK) return st;
    return eval_lattice(net, axis, R, 1, grid) < 0 ? LRM_FIELD_ENOMEM : LRM_FIELD_OK;
}

// Coarse-to-fine grid for meshing at `level`: the dense lattice of stride coarse_stride (a power of two) is
// decoded, then each halving of the stride decodes only the nodes inside active cells (level within the
// corner range +- margin_abs + margin_rel * range, then dilated by `dilation` cells) and fills the rest by
// clamped trilinear interpolation. The test runs in `space` (0 values, 1 log, 2 inverse softplus: the raw
// scale of exp / softplus densities) with the range over the cell (nbhd 0) or its 3x3x3 neighbourhood
// (nbhd 1). Nodes of every decoded cell equal the dense grid's values, so marching cubes sees the same
// surface. n_evaluated (may be NULL) receives the number of decoded points.
// Defaults of lrm_rt (CoarseToFine): margin_rel 1, margin_abs 0, raw space, nbhd 0, dilation 1.
int lrm_field_density_grid_c2f(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                               const int32_t* dims, int32_t n_layers, int32_t flags, float radius,
                               float density_bias, const float* axis, int64_t R, float level, int64_t coarse_stride,
                               float margin_rel, float margin_abs, int32_t space, int32_t nbhd, int32_t dilation,
                               float* grid, int64_t* n_evaluated) {
    using namespace lrm_field_cpu;
    if (R < 2 || !axis || !grid || (flags & LRM_FIELD_RAW_DENSITY) || coarse_stride < 1 ||
        (coarse_stride & (coarse_stride - 1)) || dilation < 0 || !(margin_rel >= 0.f) || !(margin_abs >= 0.f) ||
        space < 0 || space > 2)
        return LRM_FIELD_EINVAL;
    Net net;
    int st = build_net(net, planes, C, H, W, params, dims, n_layers, flags, radius, density_bias);
    if (st != LRM_FIELD_OK) return st;
    int64_t s = coarse_stride;
    int64_t total = eval_lattice(net, axis, R, s, grid);
    if (total < 0) return LRM_FIELD_ENOMEM;
    std::vector<unsigned char> mask, tmp;
    try {
        for (; s > 1; s /= 2) {
            const int64_t nc = lrm_lattice_count(R, s) - 1, cells = nc * nc * nc;
            mask.resize(cells);
            tmp.resize(cells);
            lrm_c2f_mask(cells, R, s, grid, lrm_c2f_space(level, space), margin_rel, margin_abs, space, nbhd,
                         mask.data());
            if (dilation > 0) {
                lrm_c2f_dilate(cells, nc, 0, dilation, mask.data(), tmp.data());
                lrm_c2f_dilate(cells, nc, 1, dilation, tmp.data(), mask.data());
                lrm_c2f_dilate(cells, nc, 2, dilation, mask.data(), tmp.data());
                mask.swap(tmp);
            }
            const int64_t e = eval_level(net, axis, R, s, mask.data(), grid);
            if (e < 0) return LRM_FIELD_ENOMEM;
            total += e;
        }
    } catch (const std::bad_alloc&) {
        return LRM_FIELD_ENOMEM;
    }
    if (n_evaluated) *n_evaluated = total;
    return LRM_FIELD_OK;
}

}  // extern "C"
#endif  // LRM_HOST_API && !LRM_CUDA
