// Triplane -> density grid -> marching cubes -> world-space vertices -> vertex colours, on the CPU build of the
// kernels in cuda/ (their plain C ABI), with the same settings as lrm_rt/mesh.py + NativeFieldBackend:
// coarse-to-fine grids from R >= 64 (exact near the surface), PyMCubes' inside convention (value > level).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <new>

#include "field.cuh"  // flag bits and status codes of the field ABI
#include "internal.hpp"

#include "host_api.h"  // host C ABI of the CPU build of cuda/*.cu

namespace lrm {

namespace {

int field_flags(const FieldSpec& f) {
    return (f.third_zy ? LRM_FIELD_THIRD_ZY : 0) | (f.relu ? LRM_FIELD_RELU : 0) | (f.softplus ? LRM_FIELD_SOFTPLUS : 0) |
           (f.color_clamp ? LRM_FIELD_COLOR_CLAMP : 0);
}

void check_field(int st, const char* what) {
    if (st == LRM_FIELD_ENOMEM) fail(LRM_ERR_OUT_OF_MEMORY, std::string(what) + ": out of memory");
    if (st != LRM_FIELD_OK) fail(LRM_ERR_INTERNAL, std::string(what) + " failed with status " + std::to_string(st));
}

// lrm_rt.field.native.auto_coarse_stride: the coarsest lattice keeps >= ~32 cells per axis.
int64_t auto_coarse_stride(int64_t r) {
    int64_t s = 1;
    while ((r - 1) / (2 * s) >= 32) s *= 2;
    return s;
}

// Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit (as lrm_rt.field.native does);
// -1 when unknown. Checked before the grid is allocated: with overcommit, a too-large grid could otherwise be
// "allocated" and get the whole host process killed later.
int64_t available_host_memory() {
    int64_t avail = -1;
    std::ifstream mi("/proc/meminfo");
    std::string key;
    int64_t kb;
    std::string unit;
    while (mi >> key >> kb) {
        std::getline(mi, unit);
        if (key == "MemAvailable:") {
            avail = kb * 1024;
            break;
        }
    }
    std::ifstream lim("/sys/fs/cgroup/memory.max"), cur("/sys/fs/cgroup/memory.current");
    std::string limit;
    int64_t used = 0;
    if (lim >> limit && cur >> used && limit != "max") {
        const int64_t room = std::atoll(limit.c_str()) - used;
        avail = avail < 0 ? room : std::min(avail, room);
    }
    return avail;
}

}  // namespace

std::vector<float> grid_axis(const ModelInfo& m, int resolution) {
    // torch.linspace on the CPU, whose kernel this torch build compiles with fused multiply-adds:
    // start + step * i for the first half, end - step * (R - 1 - i) for the second.
    const int64_t R = resolution;
    const bool tsr = m.family == "triposr";
    const float r = (float)m.field.radius;
    const float start = tsr ? 0.f : -r, end = tsr ? 1.f : r;
    const float step = (end - start) / (float)(R - 1);
    std::vector<float> axis((size_t)R);
    for (int64_t i = 0; i < R; ++i)
        axis[(size_t)i] = i < R / 2 ? std::fmaf(step, (float)i, start) : std::fmaf(-step, (float)(R - 1 - i), end);
    if (tsr) {  // TripoSR rescales linspace(0, 1) to [-r, r]: two float32 tensor ops
        const float scale = (float)(2.0 * m.field.radius), shift = (float)m.field.radius;
        for (float& a : axis) a = a * scale - shift;
    }
    return axis;
}

void check_finite(const std::vector<float>& triplane) {
    int64_t bad = 0;
    for (float v : triplane) bad += !std::isfinite(v);
    if (bad)
        fail(LRM_ERR_NUMERIC, "the triplane holds " + std::to_string(bad) +
                                  " NaN/inf values; the network output is not meshable (check the input image and the export)");
}

void extract_mesh_cpu(const ModelInfo& m, const float* triplane, int resolution, float threshold, bool colors,
                      MeshData& out) {
    const int64_t R = resolution;
    const int flags = field_flags(m.field);
    const int32_t L = (int32_t)m.decoder_dims.size() - 1;
    const float radius = (float)m.field.radius;
    const std::vector<float> axis = grid_axis(m, resolution);

    double t0 = now_seconds();
    const int64_t need = R * R * R * 4 + (R >= 64 ? 2 * ((R - 1) / 2 + 1) * ((R - 1) / 2 + 1) * ((R - 1) / 2 + 1) : 0);
    const int64_t avail = available_host_memory();
    if (avail >= 0 && need > avail)
        fail(LRM_ERR_OUT_OF_MEMORY, "a " + std::to_string(R) + "^3 density grid needs " + std::to_string(need) +
                                        " bytes, only " + std::to_string(avail) + " are available; lower mc_resolution");
    std::vector<float> grid;
    try {
        grid.resize((size_t)(R * R * R));
    } catch (const std::bad_alloc&) {
        fail(LRM_ERR_OUT_OF_MEMORY, "a " + std::to_string(R) + "^3 density grid (" + std::to_string(R * R * R * 4) +
                                        " bytes) does not fit in memory; lower mc_resolution");
    }
    if (R >= 64) {  // NativeFieldBackend "auto" mode with CoarseToFine() defaults
        const int32_t space = m.field.softplus ? 2 : 1;
        check_field(lrm_field_density_grid_c2f(triplane, m.tri_C, m.tri_H, m.tri_W, m.decoder_params.data(),
                                               m.decoder_dims.data(), L, flags, radius, m.field.density_bias,
                                               axis.data(), R, threshold, auto_coarse_stride(R), 1.0f, 0.0f, space,
                                               0, 1, grid.data(), nullptr),
                    "density grid");
    } else {
        check_field(lrm_field_density_grid(triplane, m.tri_C, m.tri_H, m.tri_W, m.decoder_params.data(),
                                           m.decoder_dims.data(), L, flags, radius, m.field.density_bias, axis.data(),
                                           R, grid.data()),
                    "density grid");
    }
    out.timings.density_grid = now_seconds() - t0;

    t0 = now_seconds();
    void* plan = nullptr;
    int64_t nv = 0, nf = 0;
    const int st = lrm_mc_plan_dense(grid.data(), R, R, R, threshold, &plan, &nv, &nf);
    if (st == -2) fail(LRM_ERR_NUMERIC, "the density grid holds NaN values; it cannot be meshed");
    if (st == -3) fail(LRM_ERR_OUT_OF_MEMORY, "out of memory in marching cubes");
    if (st != 0) fail(LRM_ERR_INTERNAL, "marching cubes failed with status " + std::to_string(st));
    std::unique_ptr<void, void (*)(void*)> keep(plan, lrm_mc_plan_free);
    if (nv > INT32_MAX) fail(LRM_ERR_UNSUPPORTED, "mesh has more than 2^31 vertices; lower mc_resolution");
    std::vector<float> grid_verts((size_t)(nv * 3));
    std::vector<int64_t> faces((size_t)(nf * 3));
    if (lrm_mc_plan_emit(plan, grid_verts.data(), faces.data()) != 0) fail(LRM_ERR_INTERNAL, "marching cubes emit failed");
    keep.reset();
    if (nf == 0) {  // which way the level should move (as lrm_rt.mesh.empty_mesh_reason)
        const auto mm = std::minmax_element(grid.begin(), grid.end());
        char msg[200];
        if (*mm.second < threshold)
            std::snprintf(msg, sizeof msg, "the density stays below the level %g everywhere (highest %.4g): lower "
                          "mc_threshold", (double)threshold, (double)*mm.second);
        else if (*mm.first >= threshold)
            std::snprintf(msg, sizeof msg, "the density is above the level %g everywhere in the box (lowest %.4g): "
                          "raise mc_threshold", (double)threshold, (double)*mm.first);
        else
            std::snprintf(msg, sizeof msg, "no surface at the level %g", (double)threshold);
        out.empty_reason = msg;
    }
    grid.clear();
    grid.shrink_to_fit();
    // grid index units -> world, in double as lrm_rt.mesh.grid_to_world does (numpy float64)
    out.vertices.resize((size_t)(nv * 3));
    const double r = m.field.radius, span = 2.0 * r, denom = (double)(R - 1);
    for (size_t i = 0; i < out.vertices.size(); ++i) out.vertices[i] = (float)((double)grid_verts[i] / denom * span - r);
    out.faces.resize(faces.size());
    for (size_t i = 0; i < faces.size(); ++i) out.faces[i] = (int32_t)faces[i];
    out.timings.marching_cubes = now_seconds() - t0;

    out.colors.clear();
    if (colors && nv > 0) {
        t0 = now_seconds();
        std::vector<float> density((size_t)nv);
        out.colors.resize((size_t)(nv * 3));
        check_field(lrm_field_query(triplane, m.tri_C, m.tri_H, m.tri_W, m.decoder_params.data(), m.decoder_dims.data(),
                                    L, flags, radius, m.field.density_bias, out.vertices.data(), nv, density.data(),
                                    out.colors.data()),
                    "vertex colours");
        out.timings.vertex_colors = now_seconds() - t0;
    }
}

}  // namespace lrm
