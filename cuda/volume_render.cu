// Volume rendering of a triplane field, deterministic modes of both families, one logical thread per ray:
// ray/box limits, sample placement, field decoding (field.cuh's fused sampling + MLP), compositing.
// The torch reference is lrm_rt/render.py (render_triposr, render_openlrm); the per-ray pieces below follow
// its float32 operations one by one, because OpenLRM's deterministic sampling puts the first coarse sample
// exactly on the box face, where the last bit of the sample position decides in-box or out-of-box.
//
// GPU (NVRTC/CuPy, one thread per ray; fixed-size per-thread scratch):
//   lrm_render_triposr_{f32,f16}: one pass.
//   OpenLRM, three launches, because the reference couples the rays of one call through two reductions:
//     lrm_render_openlrm_limits  -> per ray (start, start) if the ray hits the box, else (+inf, -inf);
//       host: lim = (min, max) of those, or (-1, -2) when no ray hits (the reference's miss markers) --
//       rays that miss the box start at the smallest and end at the largest *start* of the hitting rays;
//     lrm_render_openlrm_{f32,f16} -> rgb, opacity, unclamped depth, per-ray (min, max) sample depth;
//       host: zlim = (min, max) over all rays;
//     lrm_render_depth_clamp      -> depth: NaN (no weight) -> +inf, +-inf -> +-FLT_MAX, clamped to zlim.
// CPU C ABI (lrm_render_triposr / lrm_render_openlrm): the same per-ray functions, but samples are decoded in
// waves of many rays through lrm_field_query (the tiled SIMD evaluator) instead of point by point.
#include "field.cuh"

// Per-pass sample limit of OpenLRM (coarse and fine each): per-ray scratch lives in fixed-size local arrays.
#ifndef LRM_RENDER_MAX_SAMPLES
#define LRM_RENDER_MAX_SAMPLES 128
#endif
#define LRM_RENDER_MIN_COARSE 4  // the importance pdf uses coarse weights [1:-1] of n_coarse - 1: >= 1 bin

#define LRM_RENDER_FLT_MAX 3.402823466e+38f

LRM_DEVICE_FN float lrm_inf() {
#if LRM_ON_DEVICE
    return __int_as_float(0x7f800000);
#else
    return HUGE_VALF;
#endif
}

// ---- float32 steps rounded like torch (lrm_mul_rn / lrm_add_rn, compat.cuh): sample positions stay bit-equal
// to the reference's. (What decides the in/out flips on the faces is the ray-limit formula itself: start =
// max(min((-1 - o) * (1/d), ...)); taking (-1 - o) / d instead flips ~13 % of the first samples of random rays.)

// torch.minimum / maximum / amax / amin propagate NaN (fminf / fmaxf would drop it).
LRM_DEVICE_FN float lrm_nan_min(float a, float b) { return (a != a || b != b) ? a + b : (a < b ? a : b); }
LRM_DEVICE_FN float lrm_nan_max(float a, float b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// o + z * d as torch computes it (multiply, round, add, round).
LRM_DEVICE_FN void lrm_ray_point(const float* o, const float* d, float z, float* p) {
    for (int k = 0; k < 3; ++k) p[k] = lrm_add_rn(o[k], lrm_mul_rn(z, d[k]));
}

// Element i of torch.linspace(start, end, steps) (its scalar CPU formula: from both ends towards the middle).
LRM_DEVICE_FN float lrm_linspace(float start, float end, int steps, int i) {
    if (steps == 1) return start;
    const float step = (end - start) / (float)(steps - 1);
    return i < steps / 2 ? lrm_add_rn(start, lrm_mul_rn(step, (float)i))
                         : end - lrm_mul_rn(step, (float)(steps - i - 1));
}

// ================================================================================================ TripoSR

// Ray / cube [-r', r']^3, r' = radius * 0.999 (the reference shrinks the box by 1e-3); t_near >= 0;
// the ray is valid when t_far - t_near > 0.01. Direction components below 1e-6 in magnitude become +1e-6.
LRM_DEVICE_FN bool lrm_triposr_ray_box(const float* o, const float* d, float radius, float* t_near, float* t_far) {
    const float r = radius * 0.999f;
    float tn = 0.f, tf = 0.f;
    for (int k = 0; k < 3; ++k) {
        const float dk = fabsf(d[k]) < 1e-6f ? 1e-6f : d[k];
        const float t0 = (r - o[k]) / dk, t1 = (-r - o[k]) / dk;
        const float lo = lrm_nan_min(t0, t1), hi = lrm_nan_max(t0, t1);
        tn = k == 0 ? lo : lrm_nan_max(tn, lo);
        tf = k == 0 ? hi : lrm_nan_min(tf, hi);
    }
    tn = tn < 0.f ? 0.f : tn;  // clamp_min(0) keeps NaN
    const bool valid = tf - tn > 0.01f;
    *t_near = valid ? tn : 0.f;
    *t_far = valid ? tf : 0.f;
    return valid;
}

// Front-to-back compositing state. T is torch's CPU cumprod, which accumulates in double and rounds each prefix.
struct LrmTripoAccum {
    double cum;
    float rgb[3];
    float opacity;
};

LRM_DEVICE_FN void lrm_triposr_accum_init(LrmTripoAccum* a) {
    a->cum = 1.0;
    a->rgb[0] = a->rgb[1] = a->rgb[2] = 0.f;
    a->opacity = 0.f;
}

// Adds sample i of n (density sigma, colour c). Returns false once T has become exactly 0: every later
// weight is then alpha * 0 = 0, so the ray can stop (the result is unchanged for finite colours).
LRM_DEVICE_FN bool lrm_triposr_accum(LrmTripoAccum* a, int i, int n, float sigma, const float* c) {
    const float delta = lrm_linspace(0.f, 1.f, n + 1, i + 1) - lrm_linspace(0.f, 1.f, n + 1, i);
    const float alpha = 1.f - expf(-delta * sigma);
    const float w = alpha * (float)a->cum;
    for (int k = 0; k < 3; ++k) a->rgb[k] += w * c[k];
    a->opacity += w;
    a->cum *= (double)((1.f - alpha) + 1e-10f);
    return (float)a->cum != 0.f;
}

// Sample i of n along the ray: z = t_near (1 - t) + t_far t at the midpoints t of linspace(0, 1, n + 1).
LRM_DEVICE_FN float lrm_triposr_depth(float t_near, float t_far, int i, int n) {
    const float t = (lrm_linspace(0.f, 1.f, n + 1, i) + lrm_linspace(0.f, 1.f, n + 1, i + 1)) / 2.f;
    return lrm_add_rn(lrm_mul_rn(t_near, 1.f - t), lrm_mul_rn(t_far, t));
}

// White background: rgb + (1 - opacity); a ray that misses the box is white with opacity 0.
LRM_DEVICE_FN void lrm_triposr_finish(const LrmTripoAccum* a, bool valid, float* rgb, float* opacity) {
    for (int k = 0; k < 3; ++k) rgb[k] = valid ? a->rgb[k] + (1.f - a->opacity) : 1.f;
    *opacity = valid ? a->opacity : 0.f;
}

// ================================================================================================ OpenLRM

// get_ray_limits_box for [-1, 1]^3 (fixed in the reference, whatever the field radius): (start, end), hit
// when end > start.
LRM_DEVICE_FN bool lrm_openlrm_ray_limits(const float* o, const float* d, float* start, float* end) {
    float s = 0.f, e = 0.f;
    for (int k = 0; k < 3; ++k) {
        const float inv = 1.f / d[k];
        const float t0 = (-1.f - o[k]) * inv, t1 = (1.f - o[k]) * inv;
        const float lo = lrm_nan_min(t0, t1), hi = lrm_nan_max(t0, t1);
        s = k == 0 ? lo : lrm_nan_max(s, lo);
        e = k == 0 ? hi : lrm_nan_min(e, hi);
    }
    *start = s;
    *end = e;
    return e > s;
}

// Coarse depth i of n without jitter: start + (i / (n - 1)) * (end - start).
LRM_DEVICE_FN float lrm_openlrm_coarse_depth(float start, float end, int n, int i) {
    return lrm_add_rn(start, lrm_mul_rn((float)i / (float)(n - 1), end - start));
}

LRM_DEVICE_FN bool lrm_openlrm_inbox(const float* p) {
    return p[0] >= -1.f && p[0] <= 1.f && p[1] >= -1.f && p[1] <= 1.f && p[2] >= -1.f && p[2] <= 1.f;
}

// MipRayMarcher2 over samples ord[0..n) (identity when ord is NULL) of depths z, raw densities s and colours
// c (3 per sample; may be NULL when only the weights are wanted): colours and raw densities averaged over
// each interval, then density activation; alpha = 1 - exp(-sigma * dz); T = exclusive cumprod(1 - alpha +
// 1e-10). Writes the n - 1 weights to w (may be NULL), sum w c to rgb (when c), sum w, sum w z_mid / sum w.
LRM_DEVICE_FN void lrm_mip_march(const float* z, const float* s, const float* c, const unsigned short* ord, int n,
                                 int flags, float density_bias, float* w, float* rgb, float* opacity,
                                 float* depth) {
    double cum = 1.0;
    float acc_c[3] = {0.f, 0.f, 0.f}, acc_w = 0.f, acc_d = 0.f;
    for (int i = 0; i + 1 < n; ++i) {
        const int a = ord ? ord[i] : i, b = ord ? ord[i + 1] : i + 1;
        const float delta = z[b] - z[a];
        const float sigma = lrm_density_act((s[a] + s[b]) / 2.f, flags & ~LRM_FIELD_RAW_DENSITY, density_bias);
        const float alpha = 1.f - expf(-(sigma * delta));
        const float wi = alpha * (float)cum;
        cum *= (double)((1.f - alpha) + 1e-10f);
        if (w) w[i] = wi;
        if (c)
            for (int k = 0; k < 3; ++k) acc_c[k] += wi * ((c[3 * a + k] + c[3 * b + k]) / 2.f);
        acc_w += wi;
        acc_d += wi * ((z[a] + z[b]) / 2.f);
    }
    if (rgb)
        for (int k = 0; k < 3; ++k) rgb[k] = acc_c[k];
    if (opacity) *opacity = acc_w;
    if (depth) *depth = acc_d / acc_w;  // 0 / 0 = NaN for an empty ray: lrm_render_depth_value handles it
}

// Fine depths from the coarse weights w (n_c - 1 of them) by inverse CDF at u[0..n_f) (NULL: linspace(0, 1)).
// Weights: max_pool1d(2, 1, pad 1) -> avg_pool1d(2, 1) -> + 0.01, of which [1:-1] (+ 1e-5, normalised) weight
// the bins between the coarse mid-points; searchsorted(right) then linear interpolation inside the bin.
LRM_DEVICE_FN void lrm_importance_depths(const float* zc, const float* w, int n_c, const float* u, int n_f,
                                         float* zf) {
    const int nb = n_c - 3;  // of the n_c - 1 smoothed weights, [1:-1] are used
    float wp[LRM_RENDER_MAX_SAMPLES], cdf[LRM_RENDER_MAX_SAMPLES];
    float sum = 0.f;
    for (int k = 0; k < nb; ++k) {
        const int j = k + 1;  // smoothed weights 0 and n_c - 2 are dropped
        const float m0 = fmaxf(w[j - 1], w[j]), m1 = fmaxf(w[j], w[j + 1]);  // j + 1 <= n_c - 2: no padding
        wp[k] = ((m0 + m1) / 2.f + 0.01f) + 1e-5f;
        sum += wp[k];
    }
    double run = 0.0;  // torch's CPU cumsum accumulates in double too
    cdf[0] = 0.f;
    for (int k = 0; k < nb; ++k) {
        run += (double)(wp[k] / sum);
        cdf[k + 1] = (float)run;
    }
    for (int q = 0; q < n_f; ++q) {
        const float uq = u ? u[q] : lrm_linspace(0.f, 1.f, n_f, q);
        int lo = 0, hi = nb + 1;  // first index with cdf > u
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (cdf[mid] > uq) hi = mid;
            else lo = mid + 1;
        }
        const int below = lo - 1 > 0 ? lo - 1 : 0, above = lo < nb ? lo : nb;
        const float c0 = cdf[below], c1 = cdf[above];
        const float bin0 = 0.5f * (zc[below] + zc[below + 1]), bin1 = 0.5f * (zc[above] + zc[above + 1]);
        float denom = c1 - c0;
        denom = denom < 1e-5f ? 1.f : denom;
        zf[q] = lrm_add_rn(bin0, lrm_mul_rn((uq - c0) / denom, bin1 - bin0));
    }
}

// Stable insertion sort of idx[0..n) by z: both runs are (nearly) sorted already, so this is ~linear.
LRM_DEVICE_FN void lrm_sort_idx(const float* z, unsigned short* idx, int n) {
    for (int i = 1; i < n; ++i) {
        const unsigned short v = idx[i];
        int j = i - 1;
        while (j >= 0 && z[idx[j]] > z[v]) {
            idx[j + 1] = idx[j];
            --j;
        }
        idx[j + 1] = v;
    }
}

// Order of the merged samples z[0..n_c + n_f) (coarse then fine) by depth. Ties hold the same point (same
// depth on the same ray), so their order, unspecified in torch.sort, does not change the result.
LRM_DEVICE_FN void lrm_merge_order(const float* z, int n_c, int n_f, unsigned short* tmp, unsigned short* ord) {
    for (int i = 0; i < n_c + n_f; ++i) tmp[i] = (unsigned short)i;
    lrm_sort_idx(z, tmp, n_c);
    lrm_sort_idx(z, tmp + n_c, n_f);
    int a = 0, b = n_c, o = 0;
    while (a < n_c && b < n_c + n_f) ord[o++] = z[tmp[b]] < z[tmp[a]] ? tmp[b++] : tmp[a++];
    while (a < n_c) ord[o++] = tmp[a++];
    while (b < n_c + n_f) ord[o++] = tmp[b++];
}

// Background: v1.1 rgb + bg (1 - sum w); v1.0 white_back (rgb + 1) - sum w.
LRM_DEVICE_FN void lrm_openlrm_background(float* rgb, float opacity, int white_back, float bg) {
    for (int k = 0; k < 3; ++k) rgb[k] = white_back ? (rgb[k] + 1.f) - opacity : rgb[k] + bg * (1.f - opacity);
}

// torch.nan_to_num(depth, nan=inf).clamp(lo, hi).
LRM_DEVICE_FN float lrm_render_depth_value(float v, float lo, float hi) {
    if (v != v) {
        v = lrm_inf();  // an empty ray (0 / 0) goes to the far end
    } else {
        v = v > LRM_RENDER_FLT_MAX ? LRM_RENDER_FLT_MAX : (v < -LRM_RENDER_FLT_MAX ? -LRM_RENDER_FLT_MAX : v);
    }
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

// Ray limits with the reference's fill for rays that miss: lim = (lo, hi) from lrm_render_openlrm_limits.
LRM_DEVICE_FN void lrm_openlrm_ray_range(const float* o, const float* d, const float* lim, float* start,
                                         float* end) {
    if (!lrm_openlrm_ray_limits(o, d, start, end)) {
        *start = lim[0];
        *end = lim[1];
    }
}

LRM_DEVICE_FN bool lrm_openlrm_counts_ok(int n_c, int n_f) {
    return n_c >= LRM_RENDER_MIN_COARSE && n_c <= LRM_RENDER_MAX_SAMPLES && n_f >= 1 &&
           n_f <= LRM_RENDER_MAX_SAMPLES;
}

// ================================================================================================ kernels

#define LRM_RENDER_FIELD_PARAMS(PT)                                                                          \
    const PT *__restrict__ planes, int C, int H, int W, const float *__restrict__ params,                   \
        const int *__restrict__ dims, int n_layers, int flags, float radius, float density_bias, int smem_floats

// TripoSR: rgb (n, 3), opacity (n) for rays (n, 3); n_samples midpoint samples per ray.
template <typename PT>
LRM_DEVICE_FN void lrm_render_triposr_body(int64_t n, const float* __restrict__ rays_o,
                                           const float* __restrict__ rays_d, int n_samples,
                                           LRM_RENDER_FIELD_PARAMS(PT), float* __restrict__ rgb,
                                           float* __restrict__ opacity) {
    const float* wts = lrm_stage_params(params, smem_floats);
    LRM_FOR_EACH(r, n) {
        const float* o = rays_o + 3 * r;
        const float* d = rays_d + 3 * r;
        float tn, tf;
        const bool valid = lrm_triposr_ray_box(o, d, radius, &tn, &tf);
        LrmTripoAccum acc;
        lrm_triposr_accum_init(&acc);
        for (int i = 0; valid && i < n_samples; ++i) {
            float p[3], out[4];
            lrm_ray_point(o, d, lrm_triposr_depth(tn, tf, i, n_samples), p);
            lrm_field_eval_point(p, planes, C, H, W, wts, dims, n_layers, flags & ~LRM_FIELD_RAW_DENSITY, radius,
                                 density_bias, 1, out);
            if (!lrm_triposr_accum(&acc, i, n_samples, out[0], out + 1)) break;
        }
        lrm_triposr_finish(&acc, valid, rgb + 3 * r, opacity + r);
    }
}

LRM_KERNEL void lrm_render_triposr_f32(int64_t n, const float* __restrict__ rays_o, const float* __restrict__ rays_d,
                                       int n_samples, LRM_RENDER_FIELD_PARAMS(float), float* __restrict__ rgb,
                                       float* __restrict__ opacity) {
    lrm_render_triposr_body<float>(n, rays_o, rays_d, n_samples, planes, C, H, W, params, dims, n_layers, flags,
                                   radius, density_bias, smem_floats, rgb, opacity);
}
LRM_KERNEL void lrm_render_triposr_f16(int64_t n, const float* __restrict__ rays_o, const float* __restrict__ rays_d,
                                       int n_samples, LRM_RENDER_FIELD_PARAMS(unsigned short),
                                       float* __restrict__ rgb, float* __restrict__ opacity) {
    lrm_render_triposr_body<unsigned short>(n, rays_o, rays_d, n_samples, planes, C, H, W, params, dims, n_layers,
                                            flags, radius, density_bias, smem_floats, rgb, opacity);
}

// OpenLRM pass 1: lohi (n, 2) = (start, start) for rays hitting [-1, 1]^3, else (+inf, -inf).
LRM_KERNEL void lrm_render_openlrm_limits(int64_t n, const float* __restrict__ rays_o,
                                          const float* __restrict__ rays_d, float* __restrict__ lohi) {
    LRM_FOR_EACH(r, n) {
        float s, e;
        const bool hit = lrm_openlrm_ray_limits(rays_o + 3 * r, rays_d + 3 * r, &s, &e);
        lohi[2 * r] = hit ? s : lrm_inf();
        lohi[2 * r + 1] = hit ? s : -lrm_inf();
    }
}

// Decodes OpenLRM sample i (depth z[i]) of a ray: raw density and colour, or (oob_sigma, 0) outside the box.
template <typename PT>
LRM_DEVICE_FN void lrm_openlrm_sample(const float* o, const float* d, float z, const PT* planes, int C, int H,
                                      int W, const float* wts, const int* dims, int n_layers, int flags,
                                      float radius, float density_bias, float oob_sigma, float* s, float* c) {
    float p[3];
    lrm_ray_point(o, d, z, p);
    if (!lrm_openlrm_inbox(p)) {
        *s = oob_sigma;
        c[0] = c[1] = c[2] = 0.f;
        return;
    }
    float out[4];
    lrm_field_eval_point(p, planes, C, H, W, wts, dims, n_layers, flags | LRM_FIELD_RAW_DENSITY, radius,
                         density_bias, 1, out);
    *s = out[0];
    c[0] = out[1];
    c[1] = out[2];
    c[2] = out[3];
}

// OpenLRM pass 2: lim (2) from pass 1; u_fine (n_fine) the importance draws (deterministic: linspace(0, 1)).
// Outputs rgb (n, 3) with background, opacity (n), unclamped depth (n), zrange (n, 2) = (min, max) sample
// depth of the ray, and (may be NULL) depths_coarse (n, n_coarse), depths_fine (n, n_fine).
template <typename PT>
LRM_DEVICE_FN void lrm_render_openlrm_body(int64_t n, const float* __restrict__ rays_o,
                                           const float* __restrict__ rays_d, const float* __restrict__ lim,
                                           int n_coarse, int n_fine, const float* __restrict__ u_fine,
                                           float oob_sigma, int white_back, float bg, LRM_RENDER_FIELD_PARAMS(PT),
                                           float* __restrict__ rgb, float* __restrict__ opacity,
                                           float* __restrict__ depth, float* __restrict__ zrange,
                                           float* __restrict__ depths_coarse, float* __restrict__ depths_fine) {
    const float* wts = lrm_stage_params(params, smem_floats);
    const bool ok = lrm_openlrm_counts_ok(n_coarse, n_fine);  // hosts check first; never overrun the scratch
    const int S = n_coarse + n_fine;
    LRM_FOR_EACH(r, n) {
        if (!ok) {
            rgb[3 * r] = rgb[3 * r + 1] = rgb[3 * r + 2] = opacity[r] = depth[r] = nanf("");
            zrange[2 * r] = zrange[2 * r + 1] = nanf("");
            continue;
        }
        const float* o = rays_o + 3 * r;
        const float* d = rays_d + 3 * r;
        float z[2 * LRM_RENDER_MAX_SAMPLES], s[2 * LRM_RENDER_MAX_SAMPLES], c[6 * LRM_RENDER_MAX_SAMPLES];
        float w[LRM_RENDER_MAX_SAMPLES];
        unsigned short tmp[2 * LRM_RENDER_MAX_SAMPLES], ord[2 * LRM_RENDER_MAX_SAMPLES];
        float start, end;
        lrm_openlrm_ray_range(o, d, lim, &start, &end);
        for (int i = 0; i < n_coarse; ++i) {
            z[i] = lrm_openlrm_coarse_depth(start, end, n_coarse, i);
            lrm_openlrm_sample(o, d, z[i], planes, C, H, W, wts, dims, n_layers, flags, radius, density_bias,
                               oob_sigma, s + i, c + 3 * i);
        }
        lrm_mip_march(z, s, nullptr, nullptr, n_coarse, flags, density_bias, w, nullptr, nullptr, nullptr);
        lrm_importance_depths(z, w, n_coarse, u_fine, n_fine, z + n_coarse);
        for (int i = n_coarse; i < S; ++i)
            lrm_openlrm_sample(o, d, z[i], planes, C, H, W, wts, dims, n_layers, flags, radius, density_bias,
                               oob_sigma, s + i, c + 3 * i);
        lrm_merge_order(z, n_coarse, n_fine, tmp, ord);
        float op, dep;
        lrm_mip_march(z, s, c, ord, S, flags, density_bias, nullptr, rgb + 3 * r, &op, &dep);
        lrm_openlrm_background(rgb + 3 * r, op, white_back, bg);
        opacity[r] = op;
        depth[r] = dep;
        float zmin = z[0], zmax = z[0];
        for (int i = 1; i < S; ++i) {
            zmin = lrm_nan_min(zmin, z[i]);
            zmax = lrm_nan_max(zmax, z[i]);
        }
        zrange[2 * r] = zmin;
        zrange[2 * r + 1] = zmax;
        if (depths_coarse)
            for (int i = 0; i < n_coarse; ++i) depths_coarse[r * n_coarse + i] = z[i];
        if (depths_fine)
            for (int i = 0; i < n_fine; ++i) depths_fine[r * n_fine + i] = z[n_coarse + i];
    }
}

#define LRM_RENDER_OPENLRM_KERNEL(NAME, PT)                                                                      \
    LRM_KERNEL void NAME(int64_t n, const float* __restrict__ rays_o, const float* __restrict__ rays_d,           \
                         const float* __restrict__ lim, int n_coarse, int n_fine, const float* __restrict__ u_fine, \
                         float oob_sigma, int white_back, float bg, LRM_RENDER_FIELD_PARAMS(PT),                 \
                         float* __restrict__ rgb, float* __restrict__ opacity, float* __restrict__ depth,         \
                         float* __restrict__ zrange, float* __restrict__ depths_coarse,                          \
                         float* __restrict__ depths_fine) {                                                       \
        lrm_render_openlrm_body<PT>(n, rays_o, rays_d, lim, n_coarse, n_fine, u_fine, oob_sigma, white_back, bg,  \
                                    planes, C, H, W, params, dims, n_layers, flags, radius, density_bias,         \
                                    smem_floats, rgb, opacity, depth, zrange, depths_coarse, depths_fine);        \
    }
LRM_RENDER_OPENLRM_KERNEL(lrm_render_openlrm_f32, float)
LRM_RENDER_OPENLRM_KERNEL(lrm_render_openlrm_f16, unsigned short)

// OpenLRM pass 3: zlim (2) = (min, max) of zrange over all rays of the call.
LRM_KERNEL void lrm_render_depth_clamp(int64_t n, const float* __restrict__ zlim, float* __restrict__ depth) {
    LRM_FOR_EACH(r, n) { depth[r] = lrm_render_depth_value(depth[r], zlim[0], zlim[1]); }
}

// ================================================================================================
// CPU C ABI. Rays go through in chunks; each chunk's samples are decoded in waves by lrm_field_query (tiled
// SIMD MLP over many points at once), the per-ray steps around it run as OpenMP loops over rays.
// Field arguments as lrm_field_query (planes (3, C, H, W), packed decoder, dims, flags of the family).
// ================================================================================================
#if LRM_HOST_API && !LRM_CUDA
#include <new>
#include <vector>

#include "host_api.h"

namespace lrm_render_cpu {

constexpr int64_t CHUNK_RAYS = 8192;
constexpr int WAVE = 32;  // TripoSR samples per ray per decoding wave: rays whose T reached 0 drop out

struct Field {
    const float* planes;
    int64_t C, H, W;
    const float* params;
    const int32_t* dims;
    int32_t n_layers, flags;
    float radius, density_bias;

    int query(int32_t fl, const float* pts, int64_t n, float* density, float* rgb) const {
        if (n == 0) return LRM_FIELD_OK;
        return lrm_field_query(planes, C, H, W, params, dims, n_layers, fl, radius, density_bias, pts, n, density,
                               rgb);
    }
};

static int triposr(const Field& f, const float* rays_o, const float* rays_d, int64_t n_rays, int n_samples,
                   float* rgb, float* opacity) {
    const int32_t fl = f.flags & ~LRM_FIELD_RAW_DENSITY;
    const int64_t cap = n_rays < CHUNK_RAYS ? n_rays : CHUNK_RAYS;
    std::vector<float> tn(cap), tf(cap), pts, dens, col;
    std::vector<unsigned char> valid(cap), live(cap);
    std::vector<LrmTripoAccum> acc(cap);
    std::vector<int64_t> active;
    pts.resize(cap * WAVE * 3);
    dens.resize(cap * WAVE);
    col.resize(cap * WAVE * 3);
    active.reserve(cap);
    for (int64_t r0 = 0; r0 < n_rays; r0 += cap) {
        const int64_t nr = n_rays - r0 < cap ? n_rays - r0 : cap;
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nr; ++k) {
            const int64_t r = r0 + k;
            valid[k] = lrm_triposr_ray_box(rays_o + 3 * r, rays_d + 3 * r, f.radius, &tn[k], &tf[k]);
            live[k] = valid[k];
            lrm_triposr_accum_init(&acc[k]);
        }
        for (int s0 = 0; s0 < n_samples; s0 += WAVE) {
            active.clear();
            for (int64_t k = 0; k < nr; ++k)
                if (live[k]) active.push_back(k);
            if (active.empty()) break;
            const int ws = n_samples - s0 < WAVE ? n_samples - s0 : WAVE;
            const int64_t na = (int64_t)active.size();
#pragma omp parallel for schedule(static)
            for (int64_t a = 0; a < na; ++a) {
                const int64_t k = active[a], r = r0 + k;
                for (int j = 0; j < ws; ++j)
                    lrm_ray_point(rays_o + 3 * r, rays_d + 3 * r, lrm_triposr_depth(tn[k], tf[k], s0 + j, n_samples),
                                  &pts[(a * ws + j) * 3]);
            }
            const int st = f.query(fl, pts.data(), na * ws, dens.data(), col.data());
            if (st != LRM_FIELD_OK) return st;
#pragma omp parallel for schedule(static)
            for (int64_t a = 0; a < na; ++a) {
                const int64_t k = active[a];
                for (int j = 0; j < ws; ++j)
                    if (!lrm_triposr_accum(&acc[k], s0 + j, n_samples, dens[a * ws + j], &col[(a * ws + j) * 3])) {
                        live[k] = 0;
                        break;
                    }
            }
        }
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nr; ++k) lrm_triposr_finish(&acc[k], valid[k], rgb + 3 * (r0 + k), opacity + r0 + k);
    }
    return LRM_FIELD_OK;
}

// Decodes the in-box samples among (ray k, sample i) of z (layout k * S + i, i in [i0, i1)) into s / c;
// the others get (oob_sigma, 0). pts/idx/dens/col: scratch sized for every sample of the chunk.
struct Scratch {
    std::vector<float> pts, dens, col;
    std::vector<int64_t> idx;
};

static int decode_samples(const Field& f, const float* rays_o, const float* rays_d, int64_t r0, int64_t nr, int S,
                          int i0, int i1, float oob_sigma, const float* z, float* s, float* c, Scratch& sc,
                          std::vector<unsigned char>& inbox) {
    const int m = i1 - i0;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nr; ++k) {
        const int64_t r = r0 + k;
        for (int i = i0; i < i1; ++i) {
            float* p = &sc.pts[(k * m + (i - i0)) * 3];
            lrm_ray_point(rays_o + 3 * r, rays_d + 3 * r, z[k * S + i], p);
            const bool in = lrm_openlrm_inbox(p);
            inbox[k * m + (i - i0)] = in;
            if (!in) {
                s[k * S + i] = oob_sigma;
                c[(k * S + i) * 3] = c[(k * S + i) * 3 + 1] = c[(k * S + i) * 3 + 2] = 0.f;
            }
        }
    }
    int64_t q = 0;  // compact the in-box points in place (q <= t, so the copy never overtakes the reads)
    for (int64_t t = 0; t < nr * m; ++t) {
        if (!inbox[t]) continue;
        for (int e = 0; e < 3; ++e) sc.pts[3 * q + e] = sc.pts[3 * t + e];
        sc.idx[q++] = (t / m) * S + i0 + t % m;
    }
    const int st = f.query(f.flags | LRM_FIELD_RAW_DENSITY, sc.pts.data(), q, sc.dens.data(), sc.col.data());
    if (st != LRM_FIELD_OK) return st;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < q; ++t) {
        const int64_t j = sc.idx[t];
        s[j] = sc.dens[t];
        for (int e = 0; e < 3; ++e) c[3 * j + e] = sc.col[3 * t + e];
    }
    return LRM_FIELD_OK;
}

static int openlrm(const Field& f, const float* rays_o, const float* rays_d, int64_t n_rays, int n_c, int n_f,
                   const float* u_fine, float oob_sigma, int white_back, float bg, float* rgb, float* opacity,
                   float* depth, float* depths_coarse, float* depths_fine) {
    // Pass 1: the reference fills the limits of rays that miss from the hitting rays' start depths.
    float lo = lrm_inf(), hi = -lrm_inf();
#pragma omp parallel for schedule(static) reduction(min : lo) reduction(max : hi)
    for (int64_t r = 0; r < n_rays; ++r) {
        float s, e;
        if (lrm_openlrm_ray_limits(rays_o + 3 * r, rays_d + 3 * r, &s, &e)) {
            lo = s < lo ? s : lo;
            hi = s > hi ? s : hi;
        }
    }
    const float lim[2] = {lo <= hi ? lo : -1.f, lo <= hi ? hi : -2.f};  // no hit: the reference's markers
    std::vector<float> u(n_f);
    for (int q = 0; q < n_f; ++q) u[q] = u_fine ? u_fine[q] : lrm_linspace(0.f, 1.f, n_f, q);

    const int S = n_c + n_f;
    const int64_t cap = n_rays < CHUNK_RAYS ? n_rays : CHUNK_RAYS;
    std::vector<float> z(cap * S), s(cap * S), c(cap * S * 3), zr(2 * n_rays);
    std::vector<unsigned char> inbox(cap * S);
    Scratch sc;
    sc.pts.resize(cap * S * 3);
    sc.dens.resize(cap * S);
    sc.col.resize(cap * S * 3);
    sc.idx.resize(cap * S);
    for (int64_t r0 = 0; r0 < n_rays; r0 += cap) {
        const int64_t nr = n_rays - r0 < cap ? n_rays - r0 : cap;
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nr; ++k) {
            float start, end;
            lrm_openlrm_ray_range(rays_o + 3 * (r0 + k), rays_d + 3 * (r0 + k), lim, &start, &end);
            for (int i = 0; i < n_c; ++i) z[k * S + i] = lrm_openlrm_coarse_depth(start, end, n_c, i);
        }
        int st = decode_samples(f, rays_o, rays_d, r0, nr, S, 0, n_c, oob_sigma, z.data(), s.data(), c.data(), sc,
                                inbox);
        if (st != LRM_FIELD_OK) return st;
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nr; ++k) {
            float w[LRM_RENDER_MAX_SAMPLES];
            float* zk = &z[k * S];
            lrm_mip_march(zk, &s[k * S], nullptr, nullptr, n_c, f.flags, f.density_bias, w, nullptr, nullptr, nullptr);
            lrm_importance_depths(zk, w, n_c, u.data(), n_f, zk + n_c);
        }
        st = decode_samples(f, rays_o, rays_d, r0, nr, S, n_c, S, oob_sigma, z.data(), s.data(), c.data(), sc, inbox);
        if (st != LRM_FIELD_OK) return st;
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nr; ++k) {
            const int64_t r = r0 + k;
            const float* zk = &z[k * S];
            unsigned short tmp[2 * LRM_RENDER_MAX_SAMPLES], ord[2 * LRM_RENDER_MAX_SAMPLES];
            lrm_merge_order(zk, n_c, n_f, tmp, ord);
            float op;
            lrm_mip_march(zk, &s[k * S], &c[k * S * 3], ord, S, f.flags, f.density_bias, nullptr, rgb + 3 * r, &op,
                          depth + r);
            lrm_openlrm_background(rgb + 3 * r, op, white_back, bg);
            opacity[r] = op;
            float zmin = zk[0], zmax = zk[0];
            for (int i = 1; i < S; ++i) {
                zmin = lrm_nan_min(zmin, zk[i]);
                zmax = lrm_nan_max(zmax, zk[i]);
            }
            zr[2 * r] = zmin;
            zr[2 * r + 1] = zmax;
            if (depths_coarse)
                for (int i = 0; i < n_c; ++i) depths_coarse[r * n_c + i] = zk[i];
            if (depths_fine)
                for (int i = 0; i < n_f; ++i) depths_fine[r * n_f + i] = zk[n_c + i];
        }
    }
    // Pass 3: the reference clamps every depth to the [min, max] sample depth of the whole call.
    float zlim[2] = {zr[0], zr[1]};
    for (int64_t r = 1; r < n_rays; ++r) {
        zlim[0] = lrm_nan_min(zlim[0], zr[2 * r]);
        zlim[1] = lrm_nan_max(zlim[1], zr[2 * r + 1]);
    }
    lrm_render_depth_clamp(n_rays, zlim, depth);
    return LRM_FIELD_OK;
}

}  // namespace lrm_render_cpu

extern "C" {

// TripoSR render of n_rays rays (rays_o, rays_d: (n_rays, 3)) with n_samples >= 1 midpoint samples:
// rgb (n_rays, 3) on a white background, opacity (n_rays). Field arguments as lrm_field_query with the
// family's flags (activated density).
int lrm_render_triposr(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                       const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias,
                       const float* rays_o, const float* rays_d, int64_t n_rays, int32_t n_samples, float* rgb,
                       float* opacity) {
    if (n_rays < 0 || n_samples < 1 || (n_rays > 0 && (!rays_o || !rays_d || !rgb || !opacity)))
        return LRM_FIELD_EINVAL;
    if (n_rays == 0) return LRM_FIELD_OK;
    const lrm_render_cpu::Field f{planes, C, H, W, params, dims, n_layers, flags, radius, density_bias};
    try {
        return lrm_render_cpu::triposr(f, rays_o, rays_d, n_rays, n_samples, rgb, opacity);
    } catch (const std::bad_alloc&) {
        return LRM_FIELD_ENOMEM;
    }
}

// OpenLRM deterministic render (no jitter; importance draws u_fine (n_fine), NULL = linspace(0, 1, n_fine)).
// 4 <= n_coarse <= LRM_RENDER_MAX_SAMPLES, 1 <= n_fine <= LRM_RENDER_MAX_SAMPLES, else LRM_FIELD_EINVAL.
// oob_sigma: raw density of samples outside [-1, 1]^3 (-FLT_MAX/8 for v1.1, -FLT_MAX/3 for v1.0);
// white_back: v1.0 background (rgb + 1 - opacity), else rgb + bg_color (1 - opacity).
// Outputs rgb (n_rays, 3), opacity (n_rays), depth (n_rays) (clamped to the call's sample-depth range, as the
// reference), and, unless NULL, depths_coarse (n_rays, n_coarse), depths_fine (n_rays, n_fine).
int lrm_render_openlrm(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                       const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias,
                       const float* rays_o, const float* rays_d, int64_t n_rays, int32_t n_coarse, int32_t n_fine,
                       const float* u_fine, float oob_sigma, int32_t white_back, float bg_color, float* rgb,
                       float* opacity, float* depth, float* depths_coarse, float* depths_fine) {
    if (n_rays < 0 || !lrm_openlrm_counts_ok(n_coarse, n_fine) ||
        (n_rays > 0 && (!rays_o || !rays_d || !rgb || !opacity || !depth)))
        return LRM_FIELD_EINVAL;
    if (n_rays == 0) return LRM_FIELD_OK;
    const lrm_render_cpu::Field f{planes, C, H, W, params, dims, n_layers, flags, radius, density_bias};
    try {
        return lrm_render_cpu::openlrm(f, rays_o, rays_d, n_rays, n_coarse, n_fine, u_fine, oob_sigma, white_back,
                                       bg_color, rgb, opacity, depth, depths_coarse, depths_fine);
    } catch (const std::bad_alloc&) {
        return LRM_FIELD_ENOMEM;
    }
}

}  // extern "C"
#endif  // LRM_HOST_API && !LRM_CUDA
