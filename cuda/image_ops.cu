// Image preprocessing shared by the Python package (ctypes) and the C library (src/preprocess.cpp), so both give
// the same bytes from one copy: box reduction of large images, and the colour distances and binary mask
// operations of the weight-free removal of a uniform background (the 8-connected flood fill from the image
// border; square dilation / erosion with torch max-pool semantics, pixels outside the image never winning).
// Kernels where the work is per pixel; the flood fill is serial and the mask operations memory-bound, and both
// pipelines preprocess on the CPU, so those have host entry points only.
#include "compat.cuh"

// Means of f x f blocks of an (h, w, 4) RGBA image, one logical thread per output pixel (partial blocks at the
// right and bottom edges average what they hold): alpha the rounded mean, colour the alpha-weighted mean (so
// transparent pixels' colours do not bleed into the object's edge), integer arithmetic rounding half up.
LRM_KERNEL void lrm_box_reduce_rows(int64_t n_out, const unsigned char* __restrict__ in, int64_t h, int64_t w,
                                    int64_t f, unsigned char* __restrict__ out) {
    const int64_t ow = (w + f - 1) / f;
    LRM_FOR_EACH(i, n_out) {
        const int64_t oy = i / ow, ox = i % ow;
        const int64_t y1 = oy * f + f < h ? oy * f + f : h, x1 = ox * f + f < w ? ox * f + f : w;
        int64_t sa = 0, sc[3] = {0, 0, 0};
        for (int64_t y = oy * f; y < y1; ++y)
            for (int64_t x = ox * f; x < x1; ++x) {
                const unsigned char* q = in + (y * w + x) * 4;
                for (int c = 0; c < 3; ++c) sc[c] += (int64_t)q[c] * q[3];
                sa += q[3];
            }
        const int64_t n = (y1 - oy * f) * (x1 - ox * f);
        unsigned char* o = out + i * 4;
        for (int c = 0; c < 3; ++c) o[c] = (unsigned char)(sa > 0 ? (sc[c] + sa / 2) / sa : 0);
        o[3] = (unsigned char)((sa + n / 2) / n);
    }
}

// Distance of each pixel's RGB to a background colour (lrm_rt.preprocess._colour_distance), one logical thread
// per pixel: (rgb - colour) @ YCbCr.T in float32 as numpy's matmul evaluates it (a product, then two fused
// multiply-adds), chroma at half weight, squares summed left to right, square root. `stride`: bytes per pixel.
LRM_KERNEL void lrm_colour_distance_px(int64_t n, const unsigned char* __restrict__ px, int64_t stride,
                                       float c0, float c1, float c2, float* __restrict__ out) {
    const float k[3][3] = {{0.299f, 0.587f, 0.114f}, {-0.168736f, -0.331264f, 0.5f}, {0.5f, -0.418688f, -0.081312f}};
    LRM_FOR_EACH(i, n) {
        const unsigned char* q = px + i * stride;
        const float d[3] = {(float)q[0] - c0, (float)q[1] - c1, (float)q[2] - c2};
        float s = 0.f;
        for (int r = 0; r < 3; ++r) {
            float acc = lrm_mul_rn(d[0], k[r][0]);
            acc = fmaf(d[1], k[r][1], acc);
            acc = fmaf(d[2], k[r][2], acc);
            if (r) acc = acc * 0.5f;
            s = r ? lrm_add_rn(s, lrm_mul_rn(acc, acc)) : lrm_mul_rn(acc, acc);
        }
        out[i] = sqrtf(s);
    }
}

#if LRM_HOST_API && !LRM_CUDA
#include "host_api.h"

extern "C" int lrm_colour_distance(const uint8_t* px, int64_t n, int64_t stride, const float* colour, float* out) {
    if (n < 0 || stride < 3) return -1;
    lrm_colour_distance_px(n, px, stride, colour[0], colour[1], colour[2], out);
    return 0;
}

extern "C" int lrm_box_reduce(const uint8_t* in, int64_t h, int64_t w, int64_t f, uint8_t* out) {
    if (h < 1 || w < 1 || f < 1) return -1;
    lrm_box_reduce_rows(((h + f - 1) / f) * ((w + f - 1) / f), in, h, w, f, out);
    return 0;
}

#include <algorithm>
#include <new>
#include <vector>

extern "C" int lrm_border_fill(const uint8_t* candidate, int64_t h, int64_t w, uint8_t* region) {
    if (h < 1 || w < 1) return -1;
    memset(region, 0, (size_t)(h * w));
    try {
        std::vector<int64_t> stack;
        auto push = [&](int64_t i) {
            if (candidate[i] && !region[i]) {
                region[i] = 1;
                stack.push_back(i);
            }
        };
        for (int64_t x = 0; x < w; ++x) push(x), push((h - 1) * w + x);
        for (int64_t y = 0; y < h; ++y) push(y * w), push(y * w + w - 1);
        while (!stack.empty()) {
            const int64_t i = stack.back(), y = i / w, x = i % w;
            stack.pop_back();
            for (int64_t dy = y > 0 ? -1 : 0; dy <= (y + 1 < h ? 1 : 0); ++dy)
                for (int64_t dx = x > 0 ? -1 : 0; dx <= (x + 1 < w ? 1 : 0); ++dx) push(i + dy * w + dx);
        }
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

// out = max over the (2r + 1)^2 window of m (or min, for erode; masks hold 0 / 1, so OR / AND), along rows, then
// along columns as whole rows combined; out may be m.
static int mask_window(const uint8_t* m, int64_t h, int64_t w, int32_t r, bool erode, uint8_t* out) {
    if (h < 1 || w < 1 || r < 0) return -1;
    try {
        std::vector<uint8_t> tmp((size_t)(h * w));
#pragma omp parallel for schedule(static)
        for (int64_t y = 0; y < h; ++y) {
            const uint8_t* row = m + y * w;
            uint8_t* t = tmp.data() + y * w;
            for (int64_t x = 0; x < w; ++x) t[x] = row[x] != 0;
            for (int64_t d = 1; d <= r; ++d)
                for (int64_t x = 0; x < w; ++x) {
                    const uint8_t a = x >= d ? row[x - d] != 0 : (uint8_t)erode;
                    const uint8_t b = x + d < w ? row[x + d] != 0 : (uint8_t)erode;
                    t[x] = erode ? (uint8_t)(t[x] & a & b) : (uint8_t)(t[x] | a | b);
                }
        }
#pragma omp parallel for schedule(static)
        for (int64_t y = 0; y < h; ++y) {
            uint8_t* o = out + y * w;
            const int64_t k0 = y - r > 0 ? y - r : 0, k1 = y + r < h - 1 ? y + r : h - 1;
            for (int64_t x = 0; x < w; ++x) o[x] = tmp[(size_t)(k0 * w + x)];
            for (int64_t k = k0 + 1; k <= k1; ++k) {
                const uint8_t* t = tmp.data() + k * w;
                for (int64_t x = 0; x < w; ++x) o[x] = erode ? (uint8_t)(o[x] & t[x]) : (uint8_t)(o[x] | t[x]);
            }
        }
    } catch (const std::bad_alloc&) {
        return -3;
    }
    return 0;
}

extern "C" int lrm_mask_dilate(const uint8_t* m, int64_t h, int64_t w, int32_t r, uint8_t* out) {
    return mask_window(m, h, w, r, false, out);
}

extern "C" int lrm_mask_erode(const uint8_t* m, int64_t h, int64_t w, int32_t r, uint8_t* out) {
    return mask_window(m, h, w, r, true, out);
}
#endif  // LRM_HOST_API && !LRM_CUDA
