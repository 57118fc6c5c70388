// UV-space rasterisation for texture baking (lrm_rt.texture.rasterise): which face colours each texel, and
// with which barycentric weights.
//
// The caller sets up each face (lrm_rt.texture._raster_setup, float64 -> float32): its texel box lo..hi
// (grown by the margin, clipped to the texture) and 12 coefficients: vertex k's weight at a texel centre is
// w_k = gx_k * x + gy_k * y + g0_k (x, y counted from the box's corner) and w_k * ds_k is the signed distance
// to the edge opposite vertex k, in texels. A texel within `margin` of all three edges is a candidate; the
// face it lies deepest in wins, ties to the lower face index, through a 64-bit atomic max of
// (ordered distance, ~face), so the result does not depend on the order the faces run in.
// Every product and sum is rounded on its own, as numpy evaluates them, so the numpy reference in
// lrm_rt.texture gives the same texels, faces and weights.
#include "compat.cuh"

// float -> uint32 with the same order (negative floats below positive ones); -0 counts as +0
LRM_DEVICE_FN uint32_t lrm_uv_order(float v) {
    if (v == 0.f) v = 0.f;
#if LRM_ON_DEVICE
    uint32_t u = __float_as_uint(v);
#else
    uint32_t u;
    memcpy(&u, &v, sizeof u);
#endif
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

LRM_DEVICE_FN void lrm_uv_atomic_max(unsigned long long* p, unsigned long long v) {
#if LRM_ON_DEVICE
    atomicMax(p, v);
#else
    unsigned long long cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
#endif
}

// (gx * x + gy * y) + g0 for vertex k; c = gx[3], gy[3], g0[3], ds[3]
LRM_DEVICE_FN float lrm_uv_weight(const float* c, int k, float x, float y) {
    return lrm_add_rn(lrm_add_rn(lrm_mul_rn(c[k], x), lrm_mul_rn(c[3 + k], y)), c[6 + k]);
}

// One logical thread per face: every texel of its box, tested and offered to the per-texel maximum `best`
// (zeroed by the caller; 0 = no face). A face with hi < lo (degenerate) offers none.
LRM_KERNEL void lrm_uv_raster_faces(int64_t n_faces, const float* __restrict__ coef, const int64_t* __restrict__ lo,
                                    const int64_t* __restrict__ hi, int64_t size, float margin,
                                    unsigned long long* __restrict__ best) {
    LRM_FOR_EACH(f, n_faces) {
        const float* c = coef + 12 * f;
        const int64_t x0 = lo[2 * f], y0 = lo[2 * f + 1];
        const int64_t w = hi[2 * f] - x0 + 1, h = hi[2 * f + 1] - y0 + 1;
        const unsigned long long tag = 0xffffffffull - (unsigned long long)f;
        for (int64_t y = 0; y < h; ++y) {
            for (int64_t x = 0; x < w; ++x) {
                float d = 0.f;
                for (int k = 0; k < 3; ++k) {
                    const float dk = lrm_mul_rn(lrm_uv_weight(c, k, (float)x, (float)y), c[9 + k]);
                    d = (k == 0 || dk < d) ? dk : d;
                }
                if (d >= -margin) {
                    lrm_uv_atomic_max(best + (y0 + y) * size + x0 + x,
                                      ((unsigned long long)lrm_uv_order(d) << 32) | tag);
                }
            }
        }
    }
}

// One logical thread per texel: the winning face (-1: none) and its weights, clipped at 0 and normalised.
LRM_KERNEL void lrm_uv_raster_resolve(int64_t n_texels, const unsigned long long* __restrict__ best,
                                      const float* __restrict__ coef, const int64_t* __restrict__ lo, int64_t size,
                                      int32_t* __restrict__ face, float* __restrict__ weight) {
    LRM_FOR_EACH(t, n_texels) {
        const unsigned long long key = best[t];
        if (key == 0) {
            face[t] = -1;
            continue;
        }
        const int64_t f = (int64_t)(0xffffffffull - (key & 0xffffffffull));
        const float x = (float)(t % size - lo[2 * f]), y = (float)(t / size - lo[2 * f + 1]);
        float w[3];
        for (int k = 0; k < 3; ++k) {
            const float v = lrm_uv_weight(coef + 12 * f, k, x, y);
            w[k] = v > 0.f ? v : 0.f;
        }
        const float s = lrm_add_rn(lrm_add_rn(w[0], w[1]), w[2]);
        for (int k = 0; k < 3; ++k) weight[3 * t + k] = w[k] / s;
        face[t] = (int32_t)f;
    }
}

// CPU build only (under nvcc the kernels above are __global__ and cannot be called like this).
#if LRM_HOST_API && !LRM_CUDA
#include "host_api.h"

extern "C" int lrm_uv_rasterise(int64_t n_faces, const float* coef, const int64_t* lo, const int64_t* hi,
                                int64_t size, float margin, unsigned long long* best, int32_t* face, float* weight) {
    if (n_faces < 0 || n_faces > 0x7fffffffll || size < 1 || !(margin >= 0.f)) return -1;
    lrm_uv_raster_faces(n_faces, coef, lo, hi, size, margin, best);
    lrm_uv_raster_resolve(size * size, best, coef, lo, size, face, weight);
    return 0;
}
#endif  // LRM_HOST_API && !LRM_CUDA
