/* Host C ABI of the CPU build of the kernel sources in this folder: what lrm_rt.kernels loads through ctypes and what the C library
 * (src/) links against. Included by the .cu files that define these functions, so the compiler checks that
 * every definition matches its declaration. Status codes: 0 ok; others in field.cuh / marching_cubes.cu. */
#ifndef LRM_RT_CUDA_HOST_API_H
#define LRM_RT_CUDA_HOST_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cuda/triplane_field.cu: planes (3, C, H, W) float32; params = each layer's weight (out, in) then bias;
 * dims = [in0, out0, in1, out1, ...]; flags = LRM_FIELD_* bits (field.cuh). */
int32_t lrm_field_simd_lanes(void); /* float lanes of the vector code this build chose: 16, 8 or 4 */
void lrm_field_set_num_threads(int32_t n);
int32_t lrm_field_get_num_threads(void);
int lrm_field_query(const float* planes, int64_t C, int64_t H, int64_t W, const float* params, const int32_t* dims,
                    int32_t n_layers, int32_t flags, float radius, float density_bias, const float* points, int64_t n,
                    float* density, float* rgb);
int lrm_field_density_grid(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                           const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias,
                           const float* axis, int64_t R, float* grid);
int lrm_field_density_grid_c2f(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                               const int32_t* dims, int32_t n_layers, int32_t flags, float radius,
                               float density_bias, const float* axis, int64_t R, float level, int64_t coarse_stride,
                               float margin_rel, float margin_abs, int32_t space, int32_t nbhd, int32_t dilation,
                               float* grid, int64_t* n_evaluated);

/* cuda/marching_cubes.cu: plan on a dense (R0, R1, R2) grid, then emit into caller buffers, then free. */
int lrm_mc_plan_dense(const float* grid, int64_t R0, int64_t R1, int64_t R2, float level, void** plan,
                      int64_t* n_vertices, int64_t* n_faces);
int lrm_mc_plan_emit(void* plan, float* vertices, int64_t* faces);
void lrm_mc_plan_free(void* plan);

/* cuda/volume_render.cu: one ray per (rays_o, rays_d) row, deterministic family renderers. */
int lrm_render_triposr(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                       const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias,
                       const float* rays_o, const float* rays_d, int64_t n_rays, int32_t n_samples, float* rgb,
                       float* opacity);
int lrm_render_openlrm(const float* planes, int64_t C, int64_t H, int64_t W, const float* params,
                       const int32_t* dims, int32_t n_layers, int32_t flags, float radius, float density_bias,
                       const float* rays_o, const float* rays_d, int64_t n_rays, int32_t n_coarse, int32_t n_fine,
                       const float* u_fine, float oob_sigma, int32_t white_back, float bg_color, float* rgb,
                       float* opacity, float* depth, float* depths_coarse, float* depths_fine);

/* cuda/uv_raster.cu: texels of a texture of side `size` covered by faces in UV space. Per face: coef (F, 12) =
 * gx[3], gy[3], g0[3], ds[3] and its texel box lo, hi (F, 2) as (x, y); best (size * size) zeroed by the caller;
 * out: face (size * size, -1 = none) and weight (size * size, 3). -1: bad arguments. */
int lrm_uv_rasterise(int64_t n_faces, const float* coef, const int64_t* lo, const int64_t* hi, int64_t size,
                     float margin, unsigned long long* best, int32_t* face, float* weight);

/* cuda/image_ops.cu. lrm_box_reduce: means of f x f blocks of an RGBA image (h, w, 4) into out (ceil(h / f),
 * ceil(w / f), 4). On (h, w) masks of 0 / 1 bytes; -1: bad arguments, -3: out of memory:
 * region = the pixels of candidate 8-connected to the image border; out = max (dilate) or min (erode) over the
 * (2r + 1)^2 window, pixels outside the image ignored (out may be m). */
int lrm_box_reduce(const uint8_t* in, int64_t h, int64_t w, int64_t f, uint8_t* out);
/* out[i] = distance of pixel i's RGB (px + i * stride) to colour[3] (lrm_rt.preprocess._colour_distance). */
int lrm_colour_distance(const uint8_t* px, int64_t n, int64_t stride, const float* colour, float* out);
int lrm_border_fill(const uint8_t* candidate, int64_t h, int64_t w, uint8_t* region);
int lrm_mask_dilate(const uint8_t* m, int64_t h, int64_t w, int32_t r, uint8_t* out);
int lrm_mask_erode(const uint8_t* m, int64_t h, int64_t w, int32_t r, uint8_t* out);

#ifdef __cplusplus
}
#endif
#endif
