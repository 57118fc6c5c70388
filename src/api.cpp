// The C API boundary: argument validation, exception -> status translation, error messages, object lifetimes.
// Nothing thrown inside the library crosses this file.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <new>

#include "internal.hpp"

struct lrm_context {
    lrm::ModelInfo model;  // declared first: the network backend refers to it
    lrm_params params{};
    std::unique_ptr<lrm::NetworkBackend> net;
    std::string backend_name;
    double load_seconds = 0.0;
    std::mutex run_mutex;  // serialises reconstructions on one context
    mutable std::mutex error_mutex;
    std::string last_error;
};

struct lrm_mesh {
    lrm::MeshData data;
};

struct lrm_image {
    lrm::Image image;
};

namespace {

thread_local std::string t_last_error;  // the last failure on this thread
thread_local std::string t_returned;    // storage behind lrm_last_error(ctx)'s pointer
thread_local std::string t_warnings;    // preprocessing warnings of this thread's last call that preprocessed

void keep_warnings(const std::vector<std::string>& warnings) {
    t_warnings.clear();
    for (const std::string& w : warnings) t_warnings += (t_warnings.empty() ? "" : "\n") + w;
}

lrm_status record(lrm_context* ctx, lrm_status st, const std::string& msg) {
    t_last_error = msg;
    if (ctx) {
        std::lock_guard<std::mutex> lock(ctx->error_mutex);
        ctx->last_error = msg;
    }
    return st;
}

// Runs f, mapping every exception to a status and a message.
template <class F>
lrm_status guarded(lrm_context* ctx, F&& f) {
    try {
        f();
        return LRM_OK;
    } catch (const lrm::Error& e) {
        return record(ctx, e.status, e.what());
    } catch (const std::bad_alloc&) {
        return record(ctx, LRM_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return record(ctx, LRM_ERR_INTERNAL, std::string("internal error: ") + e.what());
    } catch (...) {
        return record(ctx, LRM_ERR_INTERNAL, "internal error: unknown exception");
    }
}

constexpr int32_t kMaxThreads = 1024;  // as the Python CLI's --threads

void require(bool ok, const std::string& msg) {
    if (!ok) lrm::fail(LRM_ERR_INVALID_ARGUMENT, msg);
}

void check_struct_size(size_t size) {
    require(size == sizeof(lrm_params), "lrm_params.struct_size is " + std::to_string(size) + ", expected " +
                                            std::to_string(sizeof(lrm_params)) +
                                            ": initialise params with lrm_default_params()");
}

void check_params(const lrm_params& p) {
    check_struct_size(p.struct_size);
    require(p.threads >= 0 && p.threads <= kMaxThreads, "threads must be in [0, " + std::to_string(kMaxThreads) +
                                                             "] (0 = all cores), got " + std::to_string(p.threads));
    require(p.mc_resolution == 0 || (p.mc_resolution >= 2 && p.mc_resolution <= lrm::kMaxMcResolution),
            "mc_resolution must be 0 (model default) or in [2, " + std::to_string(lrm::kMaxMcResolution) + "], got " +
                std::to_string(p.mc_resolution));
    require(std::isnan(p.mc_threshold) || std::isfinite(p.mc_threshold), "mc_threshold must be finite or NaN (default)");
    require(p.device == LRM_DEVICE_CPU || p.device == LRM_DEVICE_CUDA, "device must be LRM_DEVICE_CPU or LRM_DEVICE_CUDA");
    require(p.device_index >= 0, "device_index must be >= 0");
    require(p.orientation == LRM_ORIENTATION_NATIVE || p.orientation == LRM_ORIENTATION_Y_UP,
            "orientation must be LRM_ORIENTATION_NATIVE or LRM_ORIENTATION_Y_UP, got " + std::to_string(p.orientation));
#if !defined(LRM_RT_WITH_CUDA)
    if (p.device == LRM_DEVICE_CUDA)
        lrm::fail(LRM_ERR_UNSUPPORTED, "this lrm_rt library was built without CUDA (configure with -DLRM_RT_WITH_CUDA=ON)");
#endif
}

void check_pixels(const uint8_t* pixels, int32_t width, int32_t height, int64_t stride) {
    require(pixels != nullptr, "pixels is NULL");
    require(width > 0 && height > 0, "image size must be positive, got " + std::to_string(width) + "x" + std::to_string(height));
    if ((int64_t)width * height > lrm::kMaxImagePixels)
        lrm::fail(LRM_ERR_IMAGE, "image is too large (" + std::to_string(width) + "x" + std::to_string(height) + " pixels)");
    require(stride >= 4LL * width, "stride_bytes (" + std::to_string(stride) + ") is smaller than 4 * width (" +
                                       std::to_string(4LL * width) + ")");
}

// At most one thread per available processor: more only adds overhead to these CPU-bound loops, and libgomp calls
// exit() when the OS refuses a thread (address-space cap, pids cgroup, RLIMIT_NPROC), which no status can report.
void set_threads(lrm_context* ctx) {
    const int procs = std::max(1, omp_get_num_procs());
    const int asked = ctx->params.threads;
    const int n = asked > 0 ? std::min(asked, procs) : procs;
    omp_set_num_threads(n);  // the field kernels' OpenMP loops run on this thread's setting
    ctx->net->set_threads(asked > 0 ? n : 0);
}

lrm_mesh* reconstruct(lrm_context* ctx, const uint8_t* pixels, int32_t width, int32_t height, int64_t stride,
                      double decode_seconds) {
    std::lock_guard<std::mutex> lock(ctx->run_mutex);
    set_threads(ctx);
    const lrm::ModelInfo& m = ctx->model;
    auto mesh = std::make_unique<lrm_mesh>();
    lrm_timings& t = mesh->data.timings;
    const double t0 = lrm::now_seconds();
    lrm::Preprocessed pre = lrm::preprocess(m, pixels, width, height, stride);
    keep_warnings(pre.warnings);
    const double t1 = lrm::now_seconds();
    t.preprocess = t1 - t0;
    std::vector<float> triplane = ctx->net->run(pre.pixels.data(), m.camera.empty() ? nullptr : m.camera.data());
    t.network = lrm::now_seconds() - t1;
    lrm::check_finite(triplane);
    const int R = ctx->params.mc_resolution ? ctx->params.mc_resolution : m.mc_resolution;
    const float thr = std::isnan(ctx->params.mc_threshold) ? (float)m.mc_threshold : ctx->params.mc_threshold;
    const bool colors = ctx->params.vertex_colors != 0;
#if defined(LRM_RT_WITH_CUDA)
    if (ctx->params.device == LRM_DEVICE_CUDA)
        lrm::extract_mesh_cuda(m, triplane.data(), R, thr, colors, ctx->params.device_index, mesh->data);
    else
#endif
        lrm::extract_mesh_cpu(m, triplane.data(), R, thr, colors, mesh->data);
    if (ctx->params.orientation == LRM_ORIENTATION_Y_UP) {  // a rotation: the faces keep their winding
        std::vector<float>& v = mesh->data.vertices;
        for (size_t i = 0; i + 2 < v.size(); i += 3) {
            const float y = v[i + 1];
            v[i + 1] = v[i + 2];
            v[i + 2] = -y;
        }
    }
    t.image_decode = decode_seconds;
    t.total = lrm::now_seconds() - t0 + decode_seconds;
    return mesh.release();
}

}  // namespace

extern "C" {

const char* lrm_version(void) { return LRM_RT_VERSION_STRING; }

const char* lrm_status_string(int32_t s) {
    switch (s) {
        case LRM_OK: return "LRM_OK";
        case LRM_ERR_INVALID_ARGUMENT: return "LRM_ERR_INVALID_ARGUMENT";
        case LRM_ERR_IO: return "LRM_ERR_IO";
        case LRM_ERR_IMAGE: return "LRM_ERR_IMAGE";
        case LRM_ERR_ARTIFACT: return "LRM_ERR_ARTIFACT";
        case LRM_ERR_BACKEND: return "LRM_ERR_BACKEND";
        case LRM_ERR_UNSUPPORTED: return "LRM_ERR_UNSUPPORTED";
        case LRM_ERR_NUMERIC: return "LRM_ERR_NUMERIC";
        case LRM_ERR_EMPTY_MESH: return "LRM_ERR_EMPTY_MESH";
        case LRM_ERR_OUT_OF_MEMORY: return "LRM_ERR_OUT_OF_MEMORY";
        case LRM_ERR_INTERNAL: return "LRM_ERR_INTERNAL";
    }
    return "LRM_ERR_UNKNOWN";
}

const char* lrm_build_features(void) {
    return "cpu"
#if defined(LRM_RT_WITH_TORCH)
           ",aoti"
#endif
#if defined(LRM_RT_WITH_CUDA)
           ",cuda"
#endif
#if defined(LRM_RT_WITH_TENSORRT)
           ",tensorrt"
#endif
           ",png,pnm"
#if defined(LRM_RT_WITH_JPEG)
           ",jpeg"
#endif
        ;
}

const char* lrm_last_warnings(void) { return t_warnings.c_str(); }

const char* lrm_last_error(const lrm_context* ctx) {
    if (!ctx) return t_last_error.c_str();
    std::lock_guard<std::mutex> lock(ctx->error_mutex);
    t_returned = ctx->last_error;
    return t_returned.c_str();
}

lrm_params lrm_default_params(void) {
    lrm_params p;
    p.struct_size = sizeof(lrm_params);
    p.threads = 0;
    p.mc_resolution = 0;
    p.mc_threshold = std::numeric_limits<float>::quiet_NaN();
    p.vertex_colors = 1;
    p.device = LRM_DEVICE_CPU;
    p.device_index = 0;
    p.orientation = LRM_ORIENTATION_NATIVE;
    return p;
}

lrm_status lrm_create(const char* export_dir, const lrm_params* params, lrm_context** out) {
    if (out) *out = nullptr;
    return guarded(nullptr, [&] {
        require(out != nullptr, "out (lrm_context**) is NULL");
        require(export_dir != nullptr, "export_dir is NULL");
        require(export_dir[0] != '\0', "export_dir is empty");
        // struct_size (the first member) is checked before the rest is read: a smaller struct from another
        // header version must not be read past its end.
        if (params) check_struct_size(params->struct_size);
        const lrm_params p = params ? *params : lrm_default_params();
        check_params(p);
        const double t0 = lrm::now_seconds();
        auto ctx = std::make_unique<lrm_context>();
        ctx->params = p;
        ctx->model = lrm::read_export_dir(export_dir);
        ctx->net = lrm::make_network(ctx->model, p);
        ctx->backend_name = ctx->net->name();
        ctx->load_seconds = lrm::now_seconds() - t0;
        *out = ctx.release();
    });
}

void lrm_free(lrm_context* ctx) {
    try {
        delete ctx;
    } catch (...) {  // a backend's destructor must not take the host down
    }
}

lrm_status lrm_get_model_info(const lrm_context* ctx, lrm_model_info* out) {
    return guarded(const_cast<lrm_context*>(ctx), [&] {
        require(ctx != nullptr, "ctx is NULL");
        require(out != nullptr, "out (lrm_model_info*) is NULL");
        const lrm::ModelInfo& m = ctx->model;
        out->name = m.name.c_str();
        out->family = m.family.c_str();
        out->version = m.version.c_str();
        out->network_backend = ctx->backend_name.c_str();
        out->input_size = m.input_size;
        out->triplane_channels = m.tri_C;
        out->triplane_height = m.tri_H;
        out->triplane_width = m.tri_W;
        out->default_mc_resolution = m.mc_resolution;
        out->default_mc_threshold = (float)m.mc_threshold;
        out->radius = (float)m.field.radius;
        out->load_seconds = ctx->load_seconds;
    });
}

lrm_status lrm_reconstruct_rgba(lrm_context* ctx, const uint8_t* pixels, int32_t width, int32_t height,
                                int64_t stride_bytes, lrm_mesh** out) {
    if (out) *out = nullptr;
    return guarded(ctx, [&] {
        t_warnings.clear();
        require(ctx != nullptr, "ctx is NULL");
        require(out != nullptr, "out (lrm_mesh**) is NULL");
        check_pixels(pixels, width, height, stride_bytes);
        *out = reconstruct(ctx, pixels, width, height, stride_bytes, 0.0);
    });
}

lrm_status lrm_reconstruct_file(lrm_context* ctx, const char* image_path, lrm_mesh** out) {
    if (out) *out = nullptr;
    return guarded(ctx, [&] {
        t_warnings.clear();
        require(ctx != nullptr, "ctx is NULL");
        require(out != nullptr, "out (lrm_mesh**) is NULL");
        require(image_path != nullptr, "image_path is NULL");
        const double t0 = lrm::now_seconds();
        const lrm::Image img = lrm::load_image(image_path);
        *out = reconstruct(ctx, img.rgba.data(), img.width, img.height, 4LL * img.width, lrm::now_seconds() - t0);
    });
}

lrm_status lrm_preprocess_rgba(lrm_context* ctx, const uint8_t* pixels, int32_t width, int32_t height,
                               int64_t stride_bytes, float* out, int64_t out_count) {
    return guarded(ctx, [&] {
        t_warnings.clear();
        require(ctx != nullptr, "ctx is NULL");
        require(out != nullptr, "out (float*) is NULL");
        check_pixels(pixels, width, height, stride_bytes);
        const int64_t S = ctx->model.input_size, need = 3 * S * S;
        require(out_count == need, "out_count is " + std::to_string(out_count) + ", the encoder input needs 3 * " +
                                       std::to_string(S) + " * " + std::to_string(S) + " = " + std::to_string(need));
        const lrm::Preprocessed pre = lrm::preprocess(ctx->model, pixels, width, height, stride_bytes);
        keep_warnings(pre.warnings);
        std::copy(pre.pixels.begin(), pre.pixels.end(), out);
    });
}

lrm_status lrm_image_load(const char* path, lrm_image** out) {
    if (out) *out = nullptr;
    return guarded(nullptr, [&] {
        require(out != nullptr, "out (lrm_image**) is NULL");
        require(path != nullptr, "path is NULL");
        auto img = std::make_unique<lrm_image>();
        img->image = lrm::load_image(path);
        *out = img.release();
    });
}

int32_t lrm_image_width(const lrm_image* image) { return image ? image->image.width : 0; }
int32_t lrm_image_height(const lrm_image* image) { return image ? image->image.height : 0; }
const uint8_t* lrm_image_pixels(const lrm_image* image) { return image ? image->image.rgba.data() : nullptr; }
void lrm_image_free(lrm_image* image) { delete image; }

int64_t lrm_mesh_vertex_count(const lrm_mesh* mesh) { return mesh ? (int64_t)mesh->data.vertices.size() / 3 : 0; }
int64_t lrm_mesh_face_count(const lrm_mesh* mesh) { return mesh ? (int64_t)mesh->data.faces.size() / 3 : 0; }
const float* lrm_mesh_vertices(const lrm_mesh* mesh) {
    return mesh && !mesh->data.vertices.empty() ? mesh->data.vertices.data() : nullptr;
}
const int32_t* lrm_mesh_faces(const lrm_mesh* mesh) {
    return mesh && !mesh->data.faces.empty() ? mesh->data.faces.data() : nullptr;
}
const float* lrm_mesh_colors(const lrm_mesh* mesh) {
    return mesh && !mesh->data.colors.empty() ? mesh->data.colors.data() : nullptr;
}

lrm_status lrm_mesh_timings(const lrm_mesh* mesh, lrm_timings* out) {
    return guarded(nullptr, [&] {
        require(mesh != nullptr, "mesh is NULL");
        require(out != nullptr, "out (lrm_timings*) is NULL");
        *out = mesh->data.timings;
    });
}

lrm_status lrm_mesh_write(const lrm_mesh* mesh, const char* path, int32_t format) {
    return guarded(nullptr, [&] {
        require(mesh != nullptr, "mesh is NULL");
        require(path != nullptr && path[0] != '\0', "path is NULL or empty");
        require(format >= LRM_MESH_AUTO && format <= LRM_MESH_GLB, "unknown mesh format " + std::to_string(format));
        lrm::write_mesh(mesh->data, path, (lrm_mesh_format)format);
    });
}

void lrm_mesh_free(lrm_mesh* mesh) { delete mesh; }

}  // extern "C"
