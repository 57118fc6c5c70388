// lrm-rt-reconstruct: image -> mesh with the lrm_rt C++ wrapper, printing per-stage timings.
//
//   lrm-rt-reconstruct EXPORT_DIR IMAGE OUT.{ply,obj,glb} [--mc-resolution N] [--mc-threshold T]
//                      [--threads N] [--device cpu|cuda] [--orientation native|y_up] [--no-vertex-colors]
//
// EXPORT_DIR comes from `lrm-rt export --model M --out EXPORT_DIR --aoti`.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "lrm_rt.hpp"

static int usage() {
    std::fprintf(stderr,
                 "usage: lrm-rt-reconstruct EXPORT_DIR IMAGE OUT.{ply,obj,glb} [--mc-resolution N] "
                 "[--mc-threshold T] [--threads N] [--device cpu|cuda] [--orientation native|y_up] "
                 "[--no-vertex-colors]\n");
    return 2;
}

static bool parse_int(const char* s, int32_t* out) {
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end == s || *end != '\0') return false;
    *out = (int32_t)v;
    return true;
}

int main(int argc, char** argv) {
    if (argc < 4) return usage();
    lrm_params params = lrm::default_params();
    for (int i = 4; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "--mc-resolution" && has_value) {
            if (!parse_int(argv[++i], &params.mc_resolution)) return usage();
        } else if (a == "--threads" && has_value) {
            if (!parse_int(argv[++i], &params.threads)) return usage();
        } else if (a == "--mc-threshold" && has_value) {
            char* end = nullptr;
            params.mc_threshold = std::strtof(argv[++i], &end);
            if (*end != '\0') return usage();
        } else if (a == "--device" && has_value) {
            const std::string d = argv[++i];
            if (d != "cpu" && d != "cuda") return usage();
            params.device = d == "cuda" ? LRM_DEVICE_CUDA : LRM_DEVICE_CPU;
        } else if (a == "--orientation" && has_value) {
            const std::string o = argv[++i];
            if (o != "native" && o != "y_up") return usage();
            params.orientation = o == "y_up" ? LRM_ORIENTATION_Y_UP : LRM_ORIENTATION_NATIVE;
        } else if (a == "--no-vertex-colors") {
            params.vertex_colors = 0;
        } else {
            return usage();
        }
    }
    try {
        lrm::Context ctx(argv[1], params);
        const lrm_model_info info = ctx.info();
        std::fprintf(stderr, "%s (%s %s), network %s, loaded in %.0f ms\n", info.name, info.family, info.version,
                     info.network_backend, info.load_seconds * 1e3);
        lrm::Mesh mesh = ctx.reconstruct_file(argv[2]);
        const std::string warnings = lrm::Context::last_warnings();
        if (!warnings.empty()) std::fprintf(stderr, "warning: %s\n", warnings.c_str());
        mesh.write(argv[3]);
        const lrm_timings t = mesh.timings();
        std::fprintf(stderr, "mesh: %lld vertices, %lld faces -> %s\n", (long long)mesh.vertex_count(),
                     (long long)mesh.face_count(), argv[3]);
        std::fprintf(stderr,
                     "image_decode %.1f ms  preprocess %.1f ms  network %.1f ms  density_grid %.1f ms  "
                     "marching_cubes %.1f ms  vertex_colors %.1f ms  total %.1f ms\n",
                     t.image_decode * 1e3, t.preprocess * 1e3, t.network * 1e3, t.density_grid * 1e3,
                     t.marching_cubes * 1e3, t.vertex_colors * 1e3, t.total * 1e3);
    } catch (const lrm::Error& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
