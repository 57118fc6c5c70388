// lrm-rt-reconstruct: image -> mesh with the lrm_rt C++ wrapper, printing per-stage timings.
//
//   lrm-rt-reconstruct EXPORT_DIR IMAGE OUT.{ply,obj,glb} [--mc-resolution N] [--mc-threshold T]
//                      [--threads N] [--device cpu|cuda] [--orientation native|y_up] [--no-vertex-colors]
//
// EXPORT_DIR comes from `lrm-rt export --model M --out EXPORT_DIR --aoti`.
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "lrm_rt.hpp"

static int usage() {
    std::fprintf(stderr,
                 "usage: lrm-rt-reconstruct EXPORT_DIR IMAGE OUT.{ply,obj,glb} [--mc-resolution N] "
                 "[--mc-threshold T] [--threads N] [--device cpu|cuda] [--orientation native|y_up] "
                 "[--no-vertex-colors]\n");
    return 2;
}

// One line naming the option and the value, status 2 (as `lrm-rt`): the library checks the ranges.
static int bad_value(const std::string& option, const char* value, const char* expected) {
    std::fprintf(stderr, "error: %s: expected %s, got '%s'\n", option.c_str(), expected, value);
    return 2;
}

// The whole text as a decimal int32 (no silent truncation of 4294967328 to 32).
static bool parse_int(const char* s, int32_t* out) {
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s, &end, 10);
    if (end == s || *end != '\0' || errno == ERANGE || v < INT32_MIN || v > INT32_MAX) return false;
    *out = (int32_t)v;
    return true;
}

// The whole text as a finite float (an underflow to a tiny or zero value is a value, as in Python).
static bool parse_float(const char* s, float* out) {
    char* end = nullptr;
    const float v = std::strtof(s, &end);
    if (end == s || *end != '\0' || !std::isfinite(v)) return false;
    *out = v;
    return true;
}

int main(int argc, char** argv) {
    if (argc < 4) return usage();
    lrm_params params = lrm::default_params();
    for (int i = 4; i < argc; ++i) {
        const std::string a = argv[i];
        const bool takes_value = a == "--mc-resolution" || a == "--threads" || a == "--mc-threshold" ||
                                 a == "--device" || a == "--orientation";
        if (takes_value && i + 1 >= argc) {
            std::fprintf(stderr, "error: %s needs a value\n", a.c_str());
            return 2;
        }
        const char* v = takes_value ? argv[++i] : nullptr;
        if (a == "--mc-resolution") {
            if (!parse_int(v, &params.mc_resolution)) return bad_value(a, v, "a 32-bit integer");
        } else if (a == "--threads") {
            if (!parse_int(v, &params.threads)) return bad_value(a, v, "a 32-bit integer");
        } else if (a == "--mc-threshold") {
            if (!parse_float(v, &params.mc_threshold)) return bad_value(a, v, "a finite number");
        } else if (a == "--device") {
            const std::string d = v;
            if (d != "cpu" && d != "cuda") return bad_value(a, v, "cpu or cuda");
            params.device = d == "cuda" ? LRM_DEVICE_CUDA : LRM_DEVICE_CPU;
        } else if (a == "--orientation") {
            const std::string o = v;
            if (o != "native" && o != "y_up") return bad_value(a, v, "native or y_up");
            params.orientation = o == "y_up" ? LRM_ORIENTATION_Y_UP : LRM_ORIENTATION_NATIVE;
        } else if (a == "--no-vertex-colors") {
            params.vertex_colors = 0;
        } else {
            std::fprintf(stderr, "error: unknown option '%s'\n", a.c_str());
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
    } catch (const lrm::Error& e) {  // status 2 as `lrm-rt` for errors the input causes; 1 for internal ones
        std::fprintf(stderr, "error: %s\n", e.what());
        return e.status() == LRM_ERR_INTERNAL ? 1 : 2;
    }
    return 0;
}
