// Internal interfaces of the lrm_rt library (not installed). Everything here throws lrm::Error; the C API
// boundary (api.cpp) turns it, and any other exception, into a status code and a message.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lrm_rt.h"

namespace lrm {

struct Error : std::runtime_error {
    lrm_status status;
    Error(lrm_status s, const std::string& msg) : std::runtime_error(msg), status(s) {}
};

[[noreturn]] inline void fail(lrm_status s, const std::string& msg) { throw Error(s, msg); }

double now_seconds();
// Shortest round-trip text of a number, locale-independent (mesh files, messages).
std::string number_text(float v);
std::string number_text(double v);
// Throws LRM_ERR_IO when the file is missing, unreadable, larger than max_bytes or reads short.
std::string read_file(const std::string& path, const char* what, uint64_t max_bytes = UINT64_MAX);
bool is_file(const std::string& path);  // these three follow symbolic links
bool is_dir(const std::string& path);
bool path_exists(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);
std::string sha256_hex(const std::string& data);
std::string sha256_file(const std::string& path);
int64_t file_size(const std::string& path);  // -1 when missing

// ---- images (image_io.cpp)

struct Image {
    int32_t width = 0, height = 0;
    std::vector<uint8_t> rgba;  // height * width * 4, rows contiguous
};

// Largest image accepted (pixels), as the Python loader's decompression-bomb guard.
constexpr int64_t kMaxImagePixels = 8192LL * 8192LL;
constexpr uint64_t kMaxImageFileBytes = 1ULL << 30;  // as lrm_rt.preprocess.MAX_IMAGE_FILE_BYTES
// Images (and framed canvases) with a longer side are box-reduced first (lrm_rt.preprocess.MAX_WORK_SIDE).
constexpr int64_t kMaxWorkSide = 4096;
// The largest marching-cubes grid side (lrm_params and a manifest's default): the Python CLI's --mc-resolution bound.
constexpr int kMaxMcResolution = 4096;
// Smallest TripoSR framing ratio accepted (lrm_rt.preprocess.MIN_FOREGROUND_RATIO): the object spans this share
// of the framed canvas's side.
constexpr double kMinForegroundRatio = 0.05;

Image load_image(const std::string& path);
Image decode_image(const std::string& bytes, const std::string& source);

// ---- export directory (manifest.cpp)

struct FieldSpec {
    double radius = 1.0;  // kept in double: grid -> world follows the Python reference's float64 math
    bool third_zy = false, relu = false, softplus = false, color_clamp = false;
    float density_bias = -1.f;
};

struct ModelInfo {
    std::string dir, name, family, version;
    int input_size = 0;
    bool normalize = false;
    float mean[3] = {0, 0, 0}, stdev[3] = {1, 1, 1};
    double foreground_ratio = 0.0;  // TripoSR framing; 0 = none
    double background[3] = {1, 1, 1};
    int mc_resolution = 256;
    double mc_threshold = 25.0;
    std::vector<float> camera;  // OpenLRM source camera (16), empty for TripoSR
    int tri_C = 0, tri_H = 0, tri_W = 0;
    FieldSpec field;
    std::vector<float> decoder_params;  // per layer W (out x in) then b, back to back
    std::vector<int32_t> decoder_dims;  // [in0, out0, ..., out_{L-1}]
    // network artifact
    std::string aoti_file, aoti_device;
    int64_t aoti_bytes = -1;
    std::string aoti_sha256;
    std::string tensorrt_encoder, tensorrt_transformer;  // engine files (optional)
};

ModelInfo read_export_dir(const std::string& dir);

// ---- preprocessing (preprocess.cpp)

struct Preprocessed {
    std::vector<float> pixels;  // (1, 3, S, S) normalised
    std::vector<std::string> warnings;
};

Preprocessed preprocess(const ModelInfo& m, const uint8_t* pixels, int32_t width, int32_t height, int64_t stride);

// ---- network (network_*.cpp)

class NetworkBackend {
public:
    virtual ~NetworkBackend() = default;
    virtual std::string name() const = 0;
    // pixels (1, 3, S, S), camera (16) or nullptr -> triplane (3, C, H, W) float32 on the host.
    virtual std::vector<float> run(const float* pixels, const float* camera) = 0;
    virtual void set_threads(int threads) { (void)threads; }
};

std::unique_ptr<NetworkBackend> make_network(const ModelInfo& m, const lrm_params& p);

// ---- mesh extraction (mesh.cpp)

struct MeshData {
    std::vector<float> vertices;  // V * 3, world units
    std::vector<int32_t> faces;   // F * 3
    std::vector<float> colors;    // V * 3 or empty
    lrm_timings timings{};
    std::string empty_reason;  // why marching cubes found no surface, when it found none
};

void check_finite(const std::vector<float>& triplane);
// Density grid + marching cubes + vertex colours on the CPU kernels (cuda/*.cu compiled as C++).
void extract_mesh_cpu(const ModelInfo& m, const float* triplane, int resolution, float threshold, bool colors,
                      MeshData& out);
#if defined(LRM_RT_WITH_CUDA)
// Same stages with the CUDA kernels (field_cuda.cu).
void extract_mesh_cuda(const ModelInfo& m, const float* triplane, int resolution, float threshold, bool colors,
                       int device_index, MeshData& out);
#endif
// The family's marching-cubes grid axis (R values), as torch computes it in the Python reference.
std::vector<float> grid_axis(const ModelInfo& m, int resolution);

// ---- mesh files (mesh_io.cpp)

void write_mesh(const MeshData& mesh, const std::string& path, lrm_mesh_format format);

}  // namespace lrm
