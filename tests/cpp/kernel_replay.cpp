// Replays one call of the CPU kernels' C ABI (cuda/host_api.h) from a file of named arrays and writes what
// it returns in the same format. It is the test harness for builds this Python cannot load: the kernels
// cross-compiled for aarch64 (Jetson) and run under qemu, compared with the same program built for this
// machine (tests/test_kernel_targets.py).
//
//   kernel_replay OP IN OUT       OP: query | grid | openlrm | triposr | mc | image | uv
//
// File format (little-endian): records of u32 name length, name, u64 byte count, bytes. Scalars travel as
// the float64 array "s"; their order per OP is the one read below.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "host_api.h"

namespace {

using Bytes = std::vector<char>;
using Arrays = std::map<std::string, Bytes>;

Arrays read_arrays(const char* path) {
    Arrays out;
    FILE* f = std::fopen(path, "rb");
    if (!f) throw std::runtime_error(std::string("cannot open ") + path);
    uint32_t len;
    while (std::fread(&len, 4, 1, f) == 1) {
        std::string name(len, '\0');
        uint64_t n = 0;
        if (std::fread(&name[0], 1, len, f) != len || std::fread(&n, 8, 1, f) != 1) break;
        Bytes b(n);
        if (n && std::fread(b.data(), 1, n, f) != n) throw std::runtime_error("truncated input " + name);
        out[name] = std::move(b);
    }
    std::fclose(f);
    return out;
}

void write_arrays(const char* path, const Arrays& arrays) {
    FILE* f = std::fopen(path, "wb");
    if (!f) throw std::runtime_error(std::string("cannot write ") + path);
    for (const auto& [name, b] : arrays) {
        uint32_t len = (uint32_t)name.size();
        uint64_t n = b.size();
        std::fwrite(&len, 4, 1, f);
        std::fwrite(name.data(), 1, len, f);
        std::fwrite(&n, 8, 1, f);
        std::fwrite(b.data(), 1, n, f);
    }
    std::fclose(f);
}

template <class T>
const T* in(const Arrays& a, const char* name) {
    auto it = a.find(name);
    if (it == a.end()) throw std::runtime_error(std::string("missing input ") + name);
    return it->second.empty() ? nullptr : reinterpret_cast<const T*>(it->second.data());
}

template <class T>
int64_t count(const Arrays& a, const char* name) {
    return (int64_t)(a.at(name).size() / sizeof(T));
}

template <class T>
T* out(Arrays& a, const char* name, int64_t n) {
    a[name] = Bytes(n * sizeof(T));
    return reinterpret_cast<T*>(a[name].data());
}

// The field arguments every field / render entry takes: planes (3, C, H, W), params, dims; s[0..5].
struct Field {
    const float *planes, *params;
    const int32_t* dims;
    int64_t C, H, W;
    int32_t n_layers, flags;
    float radius, density_bias;
};

Field field(const Arrays& a, const double* s) {
    return {in<float>(a, "planes"), in<float>(a, "params"), in<int32_t>(a, "dims"), (int64_t)s[0], (int64_t)s[1],
            (int64_t)s[2], (int32_t)(count<int32_t>(a, "dims") - 1), (int32_t)s[3], (float)s[4], (float)s[5]};
}

int run(const std::string& op, const Arrays& a, Arrays& r) {
    const double* s = in<double>(a, "s");
    if (op == "query") {
        Field f = field(a, s);
        const int64_t n = count<float>(a, "points") / 3;
        float* rgb = s[6] != 0 ? out<float>(r, "rgb", n * 3) : nullptr;
        return lrm_field_query(f.planes, f.C, f.H, f.W, f.params, f.dims, f.n_layers, f.flags, f.radius,
                               f.density_bias, in<float>(a, "points"), n, out<float>(r, "density", n), rgb);
    }
    if (op == "grid") {  // s[6] level, s[7] coarse stride (0: dense), s[8..12] margins, space, nbhd, dilation
        Field f = field(a, s);
        const int64_t R = count<float>(a, "axis");
        float* grid = out<float>(r, "grid", R * R * R);
        if (s[7] == 0)
            return lrm_field_density_grid(f.planes, f.C, f.H, f.W, f.params, f.dims, f.n_layers, f.flags, f.radius,
                                          f.density_bias, in<float>(a, "axis"), R, grid);
        return lrm_field_density_grid_c2f(f.planes, f.C, f.H, f.W, f.params, f.dims, f.n_layers, f.flags, f.radius,
                                          f.density_bias, in<float>(a, "axis"), R, (float)s[6], (int64_t)s[7],
                                          (float)s[8], (float)s[9], (int32_t)s[10], (int32_t)s[11], (int32_t)s[12],
                                          grid, out<int64_t>(r, "n_evaluated", 1));
    }
    if (op == "openlrm") {  // s[6] n_coarse, s[7] n_fine, s[8] oob_sigma, s[9] white_back, s[10] bg_color
        Field f = field(a, s);
        const int64_t n = count<float>(a, "rays_o") / 3;
        const int32_t nc = (int32_t)s[6], nf = (int32_t)s[7];
        return lrm_render_openlrm(f.planes, f.C, f.H, f.W, f.params, f.dims, f.n_layers, f.flags, f.radius,
                                  f.density_bias, in<float>(a, "rays_o"), in<float>(a, "rays_d"), n, nc, nf,
                                  in<float>(a, "u_fine"), (float)s[8], (int32_t)s[9], (float)s[10],
                                  out<float>(r, "rgb", n * 3), out<float>(r, "opacity", n), out<float>(r, "depth", n),
                                  out<float>(r, "depths_coarse", n * nc), out<float>(r, "depths_fine", n * nf));
    }
    if (op == "triposr") {  // s[6] samples per ray
        Field f = field(a, s);
        const int64_t n = count<float>(a, "rays_o") / 3;
        return lrm_render_triposr(f.planes, f.C, f.H, f.W, f.params, f.dims, f.n_layers, f.flags, f.radius,
                                  f.density_bias, in<float>(a, "rays_o"), in<float>(a, "rays_d"), n, (int32_t)s[6],
                                  out<float>(r, "rgb", n * 3), out<float>(r, "opacity", n));
    }
    if (op == "mc") {  // s[0..2] grid shape, s[3] level
        void* plan = nullptr;
        int64_t nv = 0, nf = 0;
        int st = lrm_mc_plan_dense(in<float>(a, "grid"), (int64_t)s[0], (int64_t)s[1], (int64_t)s[2], (float)s[3],
                                   &plan, &nv, &nf);
        if (st) return st;
        st = lrm_mc_plan_emit(plan, out<float>(r, "vertices", nv * 3), out<int64_t>(r, "faces", nf * 3));
        lrm_mc_plan_free(plan);
        return st;
    }
    if (op == "image") {  // rgba (h, w, 4), mask (h, w); s: h, w, reduce factor, radius, colour[3]
        const int64_t h = (int64_t)s[0], w = (int64_t)s[1], fct = (int64_t)s[2];
        const int32_t rad = (int32_t)s[3];
        const float colour[3] = {(float)s[4], (float)s[5], (float)s[6]};
        const uint8_t *rgba = in<uint8_t>(a, "rgba"), *mask = in<uint8_t>(a, "mask");
        const int64_t reduced = ((h + fct - 1) / fct) * ((w + fct - 1) / fct) * 4;
        int st = lrm_box_reduce(rgba, h, w, fct, out<uint8_t>(r, "reduced", reduced));
        st = st ? st : lrm_colour_distance(rgba, h * w, 4, colour, out<float>(r, "distance", h * w));
        st = st ? st : lrm_border_fill(mask, h, w, out<uint8_t>(r, "filled", h * w));
        st = st ? st : lrm_mask_dilate(mask, h, w, rad, out<uint8_t>(r, "dilated", h * w));
        return st ? st : lrm_mask_erode(mask, h, w, rad, out<uint8_t>(r, "eroded", h * w));
    }
    if (op == "uv") {  // coef (F, 12), lo / hi (F, 2) int64; s: texture side, edge margin
        const int64_t size = (int64_t)s[0], n = count<float>(a, "coef") / 12;
        return lrm_uv_rasterise(n, in<float>(a, "coef"), in<int64_t>(a, "lo"), in<int64_t>(a, "hi"), size,
                                (float)s[1], out<unsigned long long>(r, "best", size * size),
                                out<int32_t>(r, "face", size * size), out<float>(r, "weight", size * size * 3));
    }
    throw std::runtime_error("unknown op " + op);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: kernel_replay OP IN OUT\n");
        return 2;
    }
    try {
        Arrays a = read_arrays(argv[2]), r;
        const int32_t status = run(argv[1], a, r);
        *out<int32_t>(r, "status", 1) = status;
        *out<int32_t>(r, "simd_lanes", 1) = lrm_field_simd_lanes();
        write_arrays(argv[3], r);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kernel_replay: %s\n", e.what());
        return 1;
    }
    return 0;
}
