// CUDA path of the mesh stages (LRM_RT_WITH_CUDA=ON): dense density grid, marching cubes and vertex colours with the
// kernels of cuda/*.cu compiled by nvcc, launched from here; the scans between the marching-cubes passes use thrust,
// in the same order as lrm_rt/mc.py's CuPy path, so the mesh matches the CPU build's (deterministic, welded).
//
// UNVERIFIED: this file is compiled by nvcc (CMake with -DLRM_RT_WITH_CUDA=ON) but has not run on a GPU; CI has none.
#include <cuda_runtime.h>
#include <thrust/binary_search.h>
#include <thrust/copy.h>
#include <thrust/count.h>
#include <thrust/device_ptr.h>
#include <thrust/execution_policy.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>
#include <thrust/scan.h>
#include <thrust/transform.h>
#include <thrust/transform_scan.h>

#include <cstring>

// The CPU build of the same sources defines these names as extern "C" host functions in this library too.
#define lrm_mc_classify lrm_cuda_mc_classify
#define lrm_mc_emit_vertices lrm_cuda_mc_emit_vertices
#define lrm_mc_emit_faces lrm_cuda_mc_emit_faces
#define lrm_field_query_f32 lrm_cuda_field_query_f32
#define lrm_field_query_f16 lrm_cuda_field_query_f16
#define lrm_field_lattice_f32 lrm_cuda_field_lattice_f32
#define lrm_field_lattice_f16 lrm_cuda_field_lattice_f16
#define lrm_field_c2f_level_f32 lrm_cuda_field_c2f_level_f32
#define lrm_field_c2f_level_f16 lrm_cuda_field_c2f_level_f16
#define lrm_c2f_mask lrm_cuda_c2f_mask
#define lrm_c2f_dilate lrm_cuda_c2f_dilate
#define lrm_c2f_level_split lrm_cuda_c2f_level_split
#define lrm_field_c2f_points_f32 lrm_cuda_field_c2f_points_f32
#define lrm_field_c2f_points_f16 lrm_cuda_field_c2f_points_f16
#include "marching_cubes.cu"
#include "triplane_field.cu"

#include "internal.hpp"

namespace lrm {

namespace {

void cuda_check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return;
    cudaGetLastError();  // clear a sticky launch error so the next call starts clean
    if (e == cudaErrorMemoryAllocation)
        fail(LRM_ERR_OUT_OF_MEMORY, std::string(what) + ": out of GPU memory; lower mc_resolution");
    fail(LRM_ERR_BACKEND, std::string(what) + ": " + cudaGetErrorString(e));
}

template <class T>
struct DeviceBuffer {
    T* p = nullptr;
    size_t n = 0;
    explicit DeviceBuffer(size_t count, const char* what) : n(count) {
        if (count) cuda_check(cudaMalloc(&p, count * sizeof(T)), what);
    }
    DeviceBuffer(const T* host, size_t count, const char* what) : DeviceBuffer(count, what) {
        if (count) cuda_check(cudaMemcpy(p, host, count * sizeof(T), cudaMemcpyHostToDevice), what);
    }
    ~DeviceBuffer() { cudaFree(p); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    std::vector<T> download(const char* what) const {
        std::vector<T> h(n);
        if (n) cuda_check(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), what);
        return h;
    }
};

dim3 blocks_for(int64_t n) {  // the kernels are grid-stride loops: a capped grid covers any n
    const int64_t b = (n + 255) / 256;
    return dim3((unsigned)(b < (1 << 20) ? (b > 0 ? b : 1) : (1 << 20)));
}

__host__ __device__ inline int64_t popc3(unsigned m) { return (m & 1u) + ((m >> 1) & 1u) + ((m >> 2) & 1u); }

struct HasEdges {
    const unsigned char* f;
    __host__ __device__ bool operator()(int64_t p) const { return (f[p] & LRM_MC_EDGE_MASK) != 0; }
};
struct HasTris {
    const unsigned char* f;
    __host__ __device__ bool operator()(int64_t p) const { return ((f[p] >> LRM_MC_TRI_SHIFT) & LRM_MC_TRI_MASK) != 0; }
};
struct IsNan {
    __host__ __device__ bool operator()(unsigned char f) const { return (f & LRM_MC_NAN_BIT) != 0; }
};
struct EdgeCount {
    const unsigned char* f;
    __host__ __device__ int64_t operator()(int64_t p) const { return popc3(f[p] & LRM_MC_EDGE_MASK); }
};
struct TriCount {
    const unsigned char* f;
    __host__ __device__ int64_t operator()(int64_t p) const { return (f[p] >> LRM_MC_TRI_SHIFT) & LRM_MC_TRI_MASK; }
};
struct RowStart {
    int64_t row_len;
    __host__ __device__ int64_t operator()(int64_t r) const { return r * row_len; }
};

int field_flags(const FieldSpec& f) {
    return (f.third_zy ? LRM_FIELD_THIRD_ZY : 0) | (f.relu ? LRM_FIELD_RELU : 0) | (f.softplus ? LRM_FIELD_SOFTPLUS : 0) |
           (f.color_clamp ? LRM_FIELD_COLOR_CLAMP : 0);
}

}  // namespace

void extract_mesh_cuda(const ModelInfo& m, const float* triplane, int resolution, float threshold, bool colors,
                       int device_index, MeshData& out) {
    cuda_check(cudaSetDevice(device_index), "selecting the CUDA device");
    for (int32_t d : m.decoder_dims)
        if (d > LRM_FIELD_MAX_WIDTH)
            fail(LRM_ERR_UNSUPPORTED, "decoder layer of width " + std::to_string(d) + " exceeds LRM_FIELD_MAX_WIDTH (" +
                                          std::to_string(LRM_FIELD_MAX_WIDTH) + ") of the CUDA kernels");
    const int64_t R = resolution, n = R * R * R, C = m.tri_C, H = m.tri_H, W = m.tri_W;
    const int L = (int)m.decoder_dims.size() - 1, flags = field_flags(m.field);
    const float radius = (float)m.field.radius;
    // The kernels read (3, H, W, C) channel-last planes: one contiguous vector per bilinear tap.
    std::vector<float> planes_hwc((size_t)(3 * H * W * C));
    for (int64_t pl = 0; pl < 3; ++pl)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t p = 0; p < H * W; ++p)
                planes_hwc[(size_t)((pl * H * W + p) * C + c)] = triplane[(pl * C + c) * H * W + p];
    const std::vector<float> axis_h = grid_axis(m, resolution);
    DeviceBuffer<float> planes(planes_hwc.data(), planes_hwc.size(), "uploading the triplane");
    DeviceBuffer<float> params(m.decoder_params.data(), m.decoder_params.size(), "uploading the decoder");
    DeviceBuffer<int> dims(m.decoder_dims.data(), m.decoder_dims.size(), "uploading the decoder");
    DeviceBuffer<float> axis(axis_h.data(), axis_h.size(), "uploading the grid axis");

    double t0 = now_seconds();
    DeviceBuffer<float> grid((size_t)n, "allocating the density grid");
    lrm_cuda_field_lattice_f32<<<blocks_for(n), 256>>>(n, R, 1, axis.p, planes.p, (int)C, (int)H, (int)W, params.p,
                                                        dims.p, L, flags, radius, m.field.density_bias, 0, grid.p);
    cuda_check(cudaGetLastError(), "density grid kernel");
    cuda_check(cudaDeviceSynchronize(), "density grid kernel");
    out.timings.density_grid = now_seconds() - t0;

    t0 = now_seconds();
    DeviceBuffer<unsigned char> fl((size_t)n, "allocating marching-cubes flags");
    lrm_cuda_mc_classify<<<blocks_for(n), 256>>>(n, grid.p, R, R, R, threshold, fl.p);
    cuda_check(cudaGetLastError(), "marching cubes (classify)");
    auto f0 = thrust::device_pointer_cast(fl.p);
    if (thrust::count_if(thrust::device, f0, f0 + n, IsNan()) > 0)
        fail(LRM_ERR_NUMERIC, "the density grid holds NaN values; it cannot be meshed");
    const thrust::counting_iterator<int64_t> first(0);
    const int64_t np = thrust::count_if(thrust::device, first, first + n, HasEdges{fl.p});
    const int64_t nc = thrust::count_if(thrust::device, first, first + n, HasTris{fl.p});
    DeviceBuffer<int64_t> points((size_t)np, "marching cubes"), vbase((size_t)np, "marching cubes");
    DeviceBuffer<int64_t> cells((size_t)nc, "marching cubes"), tbase((size_t)nc, "marching cubes");
    DeviceBuffer<int64_t> row_start((size_t)(R * R + 1), "marching cubes");
    auto pts = thrust::device_pointer_cast(points.p), cls = thrust::device_pointer_cast(cells.p);
    thrust::copy_if(thrust::device, first, first + n, pts, HasEdges{fl.p});
    thrust::copy_if(thrust::device, first, first + n, cls, HasTris{fl.p});
    thrust::transform_exclusive_scan(thrust::device, pts, pts + np, thrust::device_pointer_cast(vbase.p), EdgeCount{fl.p},
                                     (int64_t)0, thrust::plus<int64_t>());
    thrust::transform_exclusive_scan(thrust::device, cls, cls + nc, thrust::device_pointer_cast(tbase.p), TriCount{fl.p},
                                     (int64_t)0, thrust::plus<int64_t>());
    auto rows = thrust::make_transform_iterator(first, RowStart{R});
    thrust::lower_bound(thrust::device, pts, pts + np, rows, rows + (R * R + 1), thrust::device_pointer_cast(row_start.p));
    int64_t nv = 0, nf = 0;
    if (np) {
        int64_t last_base, last_point;
        unsigned char last_flags;
        cuda_check(cudaMemcpy(&last_base, vbase.p + np - 1, 8, cudaMemcpyDeviceToHost), "marching cubes");
        cuda_check(cudaMemcpy(&last_point, points.p + np - 1, 8, cudaMemcpyDeviceToHost), "marching cubes");
        cuda_check(cudaMemcpy(&last_flags, fl.p + last_point, 1, cudaMemcpyDeviceToHost), "marching cubes");
        nv = last_base + popc3(last_flags & LRM_MC_EDGE_MASK);
    }
    if (nc) {
        int64_t last_base, last_cell;
        unsigned char last_flags;
        cuda_check(cudaMemcpy(&last_base, tbase.p + nc - 1, 8, cudaMemcpyDeviceToHost), "marching cubes");
        cuda_check(cudaMemcpy(&last_cell, cells.p + nc - 1, 8, cudaMemcpyDeviceToHost), "marching cubes");
        cuda_check(cudaMemcpy(&last_flags, fl.p + last_cell, 1, cudaMemcpyDeviceToHost), "marching cubes");
        nf = last_base + ((last_flags >> LRM_MC_TRI_SHIFT) & LRM_MC_TRI_MASK);
    }
    if (nv > INT32_MAX) fail(LRM_ERR_UNSUPPORTED, "mesh has more than 2^31 vertices; lower mc_resolution");
    DeviceBuffer<float> verts((size_t)(nv * 3), "marching cubes (vertices)");
    DeviceBuffer<int64_t> faces((size_t)(nf * 3), "marching cubes (faces)");
    if (np)
        lrm_cuda_mc_emit_vertices<<<blocks_for(np), 256>>>(np, points.p, vbase.p, fl.p, grid.p, R, R, R, threshold, verts.p);
    if (nc)
        lrm_cuda_mc_emit_faces<<<blocks_for(nc), 256>>>(nc, cells.p, tbase.p, row_start.p, points.p, vbase.p, fl.p, grid.p,
                                                        R, R, R, threshold, faces.p);
    cuda_check(cudaGetLastError(), "marching cubes (emit)");
    const std::vector<float> gv = verts.download("marching cubes (vertices)");
    const std::vector<int64_t> gf = faces.download("marching cubes (faces)");
    const double r = m.field.radius, span = 2.0 * r, denom = (double)(R - 1);
    out.vertices.resize(gv.size());
    for (size_t i = 0; i < gv.size(); ++i) out.vertices[i] = (float)((double)gv[i] / denom * span - r);
    out.faces.assign(gf.begin(), gf.end());
    out.timings.marching_cubes = now_seconds() - t0;

    out.colors.clear();
    if (colors && nv > 0) {
        t0 = now_seconds();
        DeviceBuffer<float> world(out.vertices.data(), out.vertices.size(), "vertex colours");
        DeviceBuffer<float> density((size_t)nv, "vertex colours"), rgb((size_t)(nv * 3), "vertex colours");
        lrm_cuda_field_query_f32<<<blocks_for(nv), 256>>>(nv, world.p, planes.p, (int)C, (int)H, (int)W, params.p, dims.p,
                                                           L, flags, radius, m.field.density_bias, 0, 1, density.p, rgb.p);
        cuda_check(cudaGetLastError(), "vertex colour kernel");
        out.colors = rgb.download("vertex colours");
        out.timings.vertex_colors = now_seconds() - t0;
    }
}

}  // namespace lrm
