// Family preprocessing, ported from lrm_rt/preprocess.py (itself bit-exact with TripoSR run.py and OpenLRM
// infer_single), including its weight-free removal of a uniform background from opaque images:
//   TripoSR: resize_foreground(ratio) -> rgb*a + bg*(1-a) in float32 -> uint8 by truncation -> /255 ->
//            bilinear, align_corners=False, antialias=True -> (x - mean) / std
//   OpenLRM: /255 -> rgb*a + bg*(1-a) in float32 -> bicubic (A = -0.75), align_corners=True -> clamp [0, 1]
//            -> (x - mean) / std when the encoder normalises (v1.0)
// The float arithmetic follows torch's CPU kernels operation by operation (float32 except where torch promotes
// to double), including where its compiled loops fuse multiply-adds (measured against torch 2.13 on AVX-512):
// bit-exact on the fixture inputs; a few border values of upscaled (bicubic) images differ by < 1e-6, and other
// torch builds may round differently at the 1e-7 level (the contract, and the tests, are 1e-5).
// The library is compiled with -ffp-contract=off: the uint8 truncation of the TripoSR composite must see numpy's
// separately rounded products, and where torch's build fuses a multiply-add, the code says fmaf() explicitly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <utility>

#include "host_api.h"
#include "internal.hpp"

namespace lrm {

namespace {

struct Rgba {  // contiguous RGBA8
    int64_t w = 0, h = 0;
    std::vector<uint8_t> px;
};

struct Box {  // first and last row / column holding alpha > 0; y1 < 0 when there is none
    int64_t y0, y1, x0, x1;
};

Box alpha_box(const Rgba& in) {
    Box b{in.h, -1, in.w, -1};
    for (int64_t y = 0; y < in.h; ++y)
        for (int64_t x = 0; x < in.w; ++x)
            if (in.px[(size_t)((y * in.w + x) * 4 + 3)] > 0) {
                b.y0 = std::min(b.y0, y), b.y1 = std::max(b.y1, y);
                b.x0 = std::min(b.x0, x), b.x1 = std::max(b.x1, x);
            }
    return b;
}

// lrm_rt.preprocess.box_reduce: means of f x f blocks (cuda/image_ops.cu, shared with the Python package).
Rgba box_reduce(const Rgba& in, int64_t f) {
    Rgba out;
    out.w = (in.w + f - 1) / f;
    out.h = (in.h + f - 1) / f;
    out.px.resize((size_t)(out.w * out.h * 4));
    if (lrm_box_reduce(in.px.data(), in.h, in.w, f, out.px.data()) != 0) fail(LRM_ERR_IMAGE, "empty image");
    return out;
}

// lrm_rt.preprocess.reduce_large: images over max_side (kMaxWorkSide) are box-reduced by the smallest integer
// factor that brings them within, which bounds the memory of everything after.
Rgba reduce_large(Rgba img, int64_t max_side = kMaxWorkSide) {
    const int64_t f = (std::max(img.w, img.h) + max_side - 1) / max_side;
    return f > 1 ? box_reduce(img, f) : img;
}

// lrm_rt.preprocess._fit_canvas: reduce so the canvas resize_foreground pads the object to stays within
// kMaxWorkSide (a small foreground_ratio multiplies the object's side).
Rgba fit_canvas(Rgba img, double ratio) {
    const Box b = alpha_box(img);
    if (b.y1 < 0) return img;  // resize_foreground names the problem
    const int64_t canvas = (int64_t)((double)std::max(b.y1 - b.y0, b.x1 - b.x0) / ratio);
    if (canvas <= kMaxWorkSide) return img;
    const int64_t max_side = std::max(img.w, img.h) * kMaxWorkSide / canvas;
    return reduce_large(std::move(img), max_side);
}

// TripoSR's framing: crop to the alpha > 0 box (exclusive max, as the reference), pad to a square, then pad so
// the object spans `ratio` of the side. Padding is transparent black.
Rgba resize_foreground(const Rgba& in, double ratio) {
    const Box b = alpha_box(in);
    const int64_t y0 = b.y0, y1 = b.y1, x0 = b.x0, x1 = b.x1;
    if (y1 < 0) fail(LRM_ERR_IMAGE, "alpha channel is empty (every pixel fully transparent)");
    if (y1 <= y0 || x1 <= x0) fail(LRM_ERR_IMAGE, "foreground is too small to frame (under 2 pixels wide or tall)");
    const int64_t h = y1 - y0, w = x1 - x0, side = std::max(h, w);
    const int64_t top = (side - h) / 2, left = (side - w) / 2;
    // Python int(side / ratio). Bounded before the conversion and the allocation: lrm_create only accepts ratios in
    // [kMinForegroundRatio, 1], but a side of a long thin image over the ratio could still pass kMaxImagePixels, and
    // new_side^2 * 4 must not overflow.
    const double framed = std::floor((double)side / ratio);
    if (!(framed >= (double)side && framed <= (double)kMaxImagePixels))
        fail(LRM_ERR_IMAGE, "framing the " + std::to_string(side) + "-pixel-wide foreground at the model's "
                            "foreground_ratio needs a canvas over " + std::to_string(kMaxImagePixels) + " pixels a side");
    const int64_t new_side = (int64_t)framed;
    const int64_t off = (new_side - side) / 2;  // >= 0: new_side >= side
    Rgba out;
    out.w = out.h = new_side;
    out.px.assign((size_t)(new_side * new_side * 4), 0);
    for (int64_t y = 0; y < h; ++y)
        std::memcpy(&out.px[((off + top + y) * new_side + off + left) * 4], &in.px[((y0 + y) * in.w + x0) * 4],
                    (size_t)w * 4);
    return out;
}

// ---- uniform-background removal (lrm_rt.preprocess.remove_uniform_background), for images whose alpha is all 255:
// background colour = median of the border, background = pixels near that colour connected to the border (8-neighbour
// flood fill), a soft alpha ramp on colour distance in a 2-pixel band around it, specks removed by an opening.

// Colour distances and 8-bit mask ops with torch max-pool semantics: cuda/image_ops.cu, shared with the Python
// package.
std::vector<float> colour_distances(const uint8_t* px, int64_t n, int64_t stride, const float colour[3]) {
    std::vector<float> out((size_t)n);
    if (lrm_colour_distance(px, n, stride, colour, out.data()) != 0) throw std::bad_alloc();
    return out;
}

std::vector<uint8_t> dilate(const std::vector<uint8_t>& m, int64_t h, int64_t w, int r) {
    std::vector<uint8_t> out(m.size());
    if (lrm_mask_dilate(m.data(), h, w, r, out.data()) != 0) throw std::bad_alloc();
    return out;
}

std::vector<uint8_t> erode(const std::vector<uint8_t>& m, int64_t h, int64_t w, int r) {
    std::vector<uint8_t> out(m.size());
    if (lrm_mask_erode(m.data(), h, w, r, out.data()) != 0) throw std::bad_alloc();
    return out;
}

// numpy.percentile(v, q) with the default linear method, in numpy's own arithmetic.
double percentile(std::vector<float> v, double q) {
    std::sort(v.begin(), v.end());
    const double n = (double)v.size();
    const double virt = n * q + (1.0 + q * (1.0 - 1.0 - 1.0)) - 1.0;
    const double prev = std::floor(virt);
    const int64_t i0 = std::min(std::max((int64_t)prev, (int64_t)0), (int64_t)v.size() - 1);
    const int64_t i1 = std::min(i0 + 1, (int64_t)v.size() - 1);
    const double t = virt - prev;
    const float a = v[(size_t)i0], b = v[(size_t)i1], diff = b - a;
    return t >= 0.5 ? (double)b - (double)diff * (1.0 - t) : (double)a + (double)diff * t;
}

// Returns false when the border is not uniform (the image is then used whole); otherwise writes the alpha.
bool remove_uniform_background(Rgba& img) {
    const int64_t h = img.h, w = img.w;
    int64_t bw = std::max<int64_t>(1, std::min(h, w) / 100);
    bw = std::min(h, w) >= 2 ? std::max<int64_t>(1, std::min({bw, h / 2, w / 2})) : 1;
    std::vector<const uint8_t*> border;
    auto px = [&](int64_t y, int64_t x) { return &img.px[(size_t)((y * w + x) * 4)]; };
    for (int64_t y = 0; y < bw; ++y)
        for (int64_t x = 0; x < w; ++x) border.push_back(px(y, x));
    for (int64_t y = h - bw; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) border.push_back(px(y, x));
    for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < bw; ++x) border.push_back(px(y, x));
    for (int64_t y = 0; y < h; ++y)
        for (int64_t x = w - bw; x < w; ++x) border.push_back(px(y, x));
    float colour[3];
    for (int c = 0; c < 3; ++c) {  // np.median: the middle value, or the mean of the two middle values
        std::vector<float> v;
        v.reserve(border.size());
        for (const uint8_t* p : border) v.push_back((float)p[c]);
        const size_t n = v.size(), mid = n / 2;
        std::nth_element(v.begin(), v.begin() + (long)mid, v.end());
        const float hi = v[mid];
        if (n % 2) {
            colour[c] = hi;
        } else {
            const float lo = *std::max_element(v.begin(), v.begin() + (long)mid);
            colour[c] = (lo + hi) / 2.0f;
        }
    }
    std::vector<uint8_t> border_rgb;
    border_rgb.reserve(border.size() * 3);
    for (const uint8_t* p : border) border_rgb.insert(border_rgb.end(), p, p + 3);
    std::vector<float> inliers;
    for (const float d : colour_distances(border_rgb.data(), (int64_t)border.size(), 3, colour))
        if (d <= 24.0f) inliers.push_back(d);
    if ((double)inliers.size() / (double)border.size() < 0.85) return false;
    const double noise = inliers.empty() ? 0.0 : percentile(inliers, 0.95);
    const double lo = std::max(6.0, 1.5 * noise + 2.0), hi = lo + 40.0;
    const float flo = (float)lo, span = (float)(hi - lo);  // numpy 2: float32 array op Python float -> float32

    const std::vector<float> dist = colour_distances(img.px.data(), h * w, 4, colour);
    // core: background candidates 8-connected to the border
    std::vector<uint8_t> candidate((size_t)(h * w)), core((size_t)(h * w));
    for (size_t i = 0; i < candidate.size(); ++i) candidate[i] = dist[i] < flo;
    if (lrm_border_fill(candidate.data(), h, w, core.data()) != 0) throw std::bad_alloc();
    const std::vector<uint8_t> band = dilate(core, h, w, 2);
    std::vector<float> alpha((size_t)(h * w));
    std::vector<uint8_t> solid((size_t)(h * w));
    for (size_t i = 0; i < alpha.size(); ++i) {
        const float ramp = std::min(std::max((dist[i] - flo) / span, 0.0f), 1.0f);
        alpha[i] = core[i] ? 0.0f : (band[i] ? ramp : 1.0f);
        solid[i] = alpha[i] >= 0.5f;
    }
    // Opening of the solid foreground, then keep what lies within 2 pixels of it.
    const std::vector<uint8_t> near = dilate(dilate(erode(solid, h, w, 1), h, w, 1), h, w, 2);
    bool any = false;
    for (size_t i = 0; i < alpha.size(); ++i) {
        const uint8_t a = near[i] ? (uint8_t)std::nearbyint(alpha[i] * 255.0f) : 0;
        img.px[4 * i + 3] = a;
        any |= a != 0;
    }
    if (!any) fail(LRM_ERR_IMAGE, "no foreground found: the image is a single uniform colour");
    return true;
}

// ---- antialiased bilinear (torch _upsample_bilinear2d_aa, float32 input): separable, width first.

struct AaAxis {
    int64_t max_interp = 0;
    std::vector<int64_t> xmin, xsize;
    std::vector<float> w;  // out * max_interp
};

AaAxis aa_axis(int64_t in, int64_t out) {
    AaAxis ax;
    const float scale = (float)in / (float)out;
    // Mixed float/double promotions as in torch's _compute_indices_min_size_weights_aa (scalar_t = float).
    const float support = (scale >= 1.0) ? (float)((2 * 0.5) * scale) : (float)(2 * 0.5);
    ax.max_interp = (int64_t)std::ceil(support) * 2 + 1;
    ax.xmin.resize(out);
    ax.xsize.resize(out);
    ax.w.assign((size_t)(out * ax.max_interp), 0.f);
    const float invscale = (scale >= 1.0) ? (float)(1.0 / scale) : 1.0f;
    for (int64_t i = 0; i < out; ++i) {
        const float center = (float)(scale * (i + 0.5));
        const int64_t xmin = std::max((int64_t)((double)(center - support) + 0.5), (int64_t)0);
        int64_t xsize = std::min((int64_t)((double)(center + support) + 0.5), in) - xmin;
        xsize = std::min(std::max(xsize, (int64_t)0), ax.max_interp);
        float* wt = &ax.w[(size_t)(i * ax.max_interp)];
        float total = 0.f;
        for (int64_t j = 0; j < xsize; ++j) {
            float x = (float)(((double)((float)(j + xmin) - center) + 0.5) * invscale);
            if (x < 0.0) x = -x;
            const float v = x < 1.0 ? (float)(1.0 - x) : 0.f;
            wt[j] = v;
            total += v;
        }
        if (total != 0.f)
            for (int64_t j = 0; j < xsize; ++j) wt[j] /= total;
        ax.xmin[i] = xmin;
        ax.xsize[i] = xsize;
    }
    return ax;
}

// One output of torch's interpolate_aa_single_dim loop (acc = v0 * w0; acc += v_j * w_j) as its compiled code rounds
// it: the loop runs in blocks of 4 iterations whose products are computed as a vector and then added in order, and
// the remaining 0-3 iterations are fused multiply-adds (matched bit for bit against torch 2.13 for 2..21 taps).
template <class At>
inline float aa_sum(At at, const float* w, int64_t n) {
    float acc = at(0) * w[0];
    const int64_t plain = 4 * ((n - 1) / 4);
    for (int64_t j = 1; j < n; ++j) acc = j <= plain ? acc + at(j) * w[j] : std::fmaf(at(j), w[j], acc);
    return acc;
}

// src: (3, H, W) float planes -> (3, S, S).
std::vector<float> resize_bilinear_aa(const std::vector<float>& src, int64_t H, int64_t W, int64_t S) {
    std::vector<float> tmp, out;
    const float* cur = src.data();
    int64_t cw = W;
    if (W != S) {  // horizontal pass (skipped by torch when the size is unchanged)
        const AaAxis ax = aa_axis(W, S);
        tmp.resize((size_t)(3 * H * S));
        for (int64_t r = 0; r < 3 * H; ++r) {
            const float* row = cur + r * W;
            for (int64_t x = 0; x < S; ++x) {
                const float* wt = &ax.w[(size_t)(x * ax.max_interp)];
                const float* s = row + ax.xmin[x];
                tmp[(size_t)(r * S + x)] = aa_sum([s](int64_t j) { return s[j]; }, wt, ax.xsize[x]);
            }
        }
        cur = tmp.data();
        cw = S;
    }
    if (H == S) return std::vector<float>(cur, cur + 3 * H * cw);
    const AaAxis ay = aa_axis(H, S);
    out.resize((size_t)(3 * S * S));
    for (int64_t c = 0; c < 3; ++c)
        for (int64_t y = 0; y < S; ++y) {
            const float* wt = &ay.w[(size_t)(y * ay.max_interp)];
            const float* base = cur + (c * H + ay.xmin[y]) * cw;
            float* o = &out[(size_t)((c * S + y) * S)];
            for (int64_t x = 0; x < cw; ++x)
                o[x] = aa_sum([base, cw, x](int64_t j) { return base[j * cw + x]; }, wt, ay.xsize[y]);
        }
    return out;
}

// ---- bicubic, align_corners=True, no antialias (torch upsample_bicubic2d, float32): outer H, inner W.

struct CubicAxis {
    std::vector<int64_t> idx;  // out * 4 clamped source indices
    std::vector<float> w;      // out * 4
};

// torch's cubic_convolution1/2; the one multiply-add its build fuses (found by matching its weights) is explicit.
inline float cubic1(float x, float A) { return ((A + 2) * x - (A + 3)) * x * x + 1; }
inline float cubic2(float x, float A) { return std::fmaf(A * x - 5 * A, x, 8 * A) * x - 4 * A; }

CubicAxis cubic_axis(int64_t in, int64_t out) {
    CubicAxis ax;
    ax.idx.resize((size_t)(out * 4));
    ax.w.resize((size_t)(out * 4));
    const float scale = out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.f;
    const float A = -0.75f;
    for (int64_t i = 0; i < out; ++i) {
        const float real = scale * (float)i;
        const int64_t i0 = std::min(std::max((int64_t)std::floor(real), (int64_t)0), in - 1);
        const float t = std::min(std::max(real - (float)i0, 0.f), 1.f);
        const float x2 = (float)(1.0 - t);
        float* w = &ax.w[(size_t)(4 * i)];
        w[0] = cubic2((float)(t + 1.0), A);
        w[1] = cubic1(t, A);
        w[2] = cubic1(x2, A);
        w[3] = cubic2((float)(x2 + 1.0), A);
        for (int j = 0; j < 4; ++j) ax.idx[(size_t)(4 * i + j)] = std::max(std::min(i0 - 1 + j, in - 1), (int64_t)0);
    }
    return ax;
}

// One 4-tap sum in the order and with the fusions of torch's compiled Interpolate<> loop (tap 1 first, then
// fused multiply-adds of taps 0, 2, 3); matched bit for bit against torch 2.13's output.
inline float taps4(float v0, float v1, float v2, float v3, const float* w) {
    float o = v1 * w[1];
    o = std::fmaf(v0, w[0], o);
    o = std::fmaf(v2, w[2], o);
    return std::fmaf(v3, w[3], o);
}

std::vector<float> resize_bicubic_ac(const std::vector<float>& src, int64_t H, int64_t W, int64_t S) {
    const CubicAxis ay = cubic_axis(H, S), ax = cubic_axis(W, S);
    std::vector<float> out((size_t)(3 * S * S));
    for (int64_t c = 0; c < 3; ++c)
        for (int64_t y = 0; y < S; ++y) {
            for (int64_t x = 0; x < S; ++x) {
                const int64_t* xi = &ax.idx[(size_t)(4 * x)];
                const float* xw = &ax.w[(size_t)(4 * x)];
                const float* wy = &ay.w[(size_t)(4 * y)];
                float t[4];
                for (int k = 0; k < 4; ++k) {
                    const float* row = src.data() + (c * H + ay.idx[(size_t)(4 * y + k)]) * W;
                    t[k] = taps4(row[xi[0]], row[xi[1]], row[xi[2]], row[xi[3]], xw);
                }
                const float acc = taps4(t[0], t[1], t[2], t[3], wy);
                out[(size_t)((c * S + y) * S + x)] = std::min(std::max(acc, 0.f), 1.f);  // torch.clamp(x, 0, 1)
            }
        }
    return out;
}

}  // namespace

Preprocessed preprocess(const ModelInfo& m, const uint8_t* pixels, int32_t width, int32_t height, int64_t stride) {
    Preprocessed res;
    Rgba img;
    img.w = width;
    img.h = height;
    img.px.resize((size_t)width * height * 4);
    for (int64_t y = 0; y < height; ++y)
        std::memcpy(&img.px[(size_t)(y * width * 4)], pixels + y * stride, (size_t)width * 4);
    img = reduce_large(std::move(img));
    uint8_t amin = 255, amax = 0;
    int64_t see_through = 0;  // pixels less than half opaque
    for (size_t i = 3; i < img.px.size(); i += 4) {
        amin = std::min(amin, img.px[i]);
        amax = std::max(amax, img.px[i]);
        see_through += img.px[i] < 128;
    }
    if (amax == 0) fail(LRM_ERR_IMAGE, "alpha channel is empty (every pixel fully transparent)");
    if (amax < 128) fail(LRM_ERR_IMAGE, "alpha channel has no pixel at least half opaque: nothing to reconstruct");
    // Foreground mask: the alpha channel when it separates something (both references use any alpha; as in
    // lrm_rt.preprocess.foreground, one under half opaque on fewer than 0.01 % of the pixels is a stray soft pixel
    // of an opaque image and is ignored); for an opaque image, the removal of a uniform background (no weights),
    // else the whole image with a warning (Python without rembg does the same).
    bool has_mask = amin < 255;
    const double n_pixels = (double)img.w * (double)img.h;
    if (has_mask && (double)see_through < std::max(1.0, 1e-4 * n_pixels)) {
        for (size_t i = 3; i < img.px.size(); i += 4) img.px[i] = 255;
        res.warnings.push_back("alpha channel is opaque almost everywhere: ignored, the background is found from "
                               "the colours instead");
        has_mask = false;
    }
    if (!has_mask) {
        has_mask = remove_uniform_background(img);
        if (!has_mask) res.warnings.push_back("background is not uniform: the whole image is used as foreground");
    }
    const int64_t S = m.input_size;
    std::vector<float> rgb01;
    const float bg[3] = {(float)m.background[0], (float)m.background[1], (float)m.background[2]};

    // TripoSR's framing (resize_foreground), for TripoSR and for any model whose config names a ratio (lrm-tiny);
    // published OpenLRM configs have none and take the image as framed.
    if (has_mask && m.foreground_ratio > 0.0)
        img = resize_foreground(fit_canvas(std::move(img), m.foreground_ratio), m.foreground_ratio);
    if (m.family == "triposr") {
        // composite_uint8: float32 products rounded one by one, then truncation to uint8 (the reference's input.png);
        // opaque images go in unchanged (the reference's Image.convert("RGB") path).
        const int64_t H = img.h, W = img.w;
        std::vector<float> planes((size_t)(3 * H * W));
        for (int64_t p = 0; p < H * W; ++p) {
            const uint8_t* q = &img.px[(size_t)(4 * p)];
            const float a = (float)q[3] / 255.0f;
            for (int c = 0; c < 3; ++c) {
                uint8_t v = q[c];
                if (has_mask) {
                    const float x = (float)q[c] / 255.0f;
                    const float prod = x * a;
                    const float rest = (1.0f - a) * bg[c];
                    v = (uint8_t)((prod + rest) * 255.0f);
                }
                planes[(size_t)(c * H * W + p)] = (float)v / 255.0f;
            }
        }
        rgb01 = resize_bilinear_aa(planes, H, W, S);
    } else {
        const int64_t H = img.h, W = img.w;
        std::vector<float> planes((size_t)(3 * H * W));
        for (int64_t p = 0; p < H * W; ++p) {
            const uint8_t* q = &img.px[(size_t)(4 * p)];
            const float a = (float)q[3] / 255.0f;
            for (int c = 0; c < 3; ++c) {
                const float x = (float)q[c] / 255.0f;
                const float prod = x * a;
                const float rest = (1.0f - a) * bg[c];
                planes[(size_t)(c * H * W + p)] = prod + rest;
            }
        }
        rgb01 = resize_bicubic_ac(planes, H, W, S);
    }
    if (m.normalize) {
        for (int c = 0; c < 3; ++c) {
            float* p = rgb01.data() + c * S * S;
            for (int64_t i = 0; i < S * S; ++i) p[i] = (p[i] - m.mean[c]) / m.stdev[c];
        }
    }
    res.pixels = std::move(rgb01);
    return res;
}

}  // namespace lrm
