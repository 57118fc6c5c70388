// Header-only C++ wrapper of the lrm_rt C API: RAII handles (std::unique_ptr with the API's free functions) and
// exceptions (lrm::Error, carrying the status code) instead of status codes. C++11 or later.
//
//   lrm::Context ctx("exports/triposr");              // throws lrm::Error on failure
//   lrm::Mesh mesh = ctx.reconstruct_file("chair.png");
//   mesh.write("chair.glb");
#ifndef LRM_RT_HPP
#define LRM_RT_HPP

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lrm_rt.h"

namespace lrm {

class Error : public std::runtime_error {
public:
    Error(lrm_status status, const std::string& message)
        : std::runtime_error(std::string(lrm_status_string(status)) + ": " + message), status_(status) {}
    lrm_status status() const noexcept { return status_; }

private:
    lrm_status status_;
};

namespace detail {
struct ContextDeleter {
    void operator()(lrm_context* p) const noexcept { lrm_free(p); }
};
struct MeshDeleter {
    void operator()(lrm_mesh* p) const noexcept { lrm_mesh_free(p); }
};
struct ImageDeleter {
    void operator()(lrm_image* p) const noexcept { lrm_image_free(p); }
};
// The calling thread's own message (lrm_last_error(NULL)): a shared context's last error may be another thread's.
inline void check(lrm_status status) {
    if (status != LRM_OK) throw Error(status, lrm_last_error(nullptr));
}
}  // namespace detail

inline lrm_params default_params() { return lrm_default_params(); }

class Mesh {
public:
    explicit Mesh(lrm_mesh* raw) : p_(raw) {}
    int64_t vertex_count() const { return lrm_mesh_vertex_count(p_.get()); }
    int64_t face_count() const { return lrm_mesh_face_count(p_.get()); }
    const float* vertices() const { return lrm_mesh_vertices(p_.get()); }  // vertex_count * 3
    const int32_t* faces() const { return lrm_mesh_faces(p_.get()); }      // face_count * 3
    const float* colors() const { return lrm_mesh_colors(p_.get()); }      // vertex_count * 3 or nullptr
    bool has_colors() const { return colors() != nullptr; }
    lrm_timings timings() const {
        lrm_timings t;
        detail::check(lrm_mesh_timings(p_.get(), &t));
        return t;
    }
    void write(const std::string& path, lrm_mesh_format format = LRM_MESH_AUTO) const {
        detail::check(lrm_mesh_write(p_.get(), path.c_str(), format));
    }
    lrm_mesh* get() const noexcept { return p_.get(); }
    lrm_mesh* release() noexcept { return p_.release(); }

private:
    std::unique_ptr<lrm_mesh, detail::MeshDeleter> p_;
};

class Image {
public:
    explicit Image(const std::string& path) {
        lrm_image* raw = nullptr;
        detail::check(lrm_image_load(path.c_str(), &raw));
        p_.reset(raw);
    }
    int32_t width() const { return lrm_image_width(p_.get()); }
    int32_t height() const { return lrm_image_height(p_.get()); }
    const uint8_t* pixels() const { return lrm_image_pixels(p_.get()); }  // RGBA8, stride 4 * width
    int64_t stride() const { return 4LL * width(); }

private:
    std::unique_ptr<lrm_image, detail::ImageDeleter> p_;
};

class Context {
public:
    explicit Context(const std::string& export_dir, const lrm_params& params = lrm_default_params()) {
        lrm_context* raw = nullptr;
        detail::check(lrm_create(export_dir.c_str(), &params, &raw));
        p_.reset(raw);
    }
    lrm_model_info info() const {
        lrm_model_info i;
        check(lrm_get_model_info(p_.get(), &i));
        return i;
    }
    Mesh reconstruct_rgba(const uint8_t* pixels, int32_t width, int32_t height, int64_t stride_bytes) {
        lrm_mesh* raw = nullptr;
        check(lrm_reconstruct_rgba(p_.get(), pixels, width, height, stride_bytes, &raw));
        return Mesh(raw);
    }
    Mesh reconstruct(const Image& image) {
        return reconstruct_rgba(image.pixels(), image.width(), image.height(), image.stride());
    }
    Mesh reconstruct_file(const std::string& path) {
        lrm_mesh* raw = nullptr;
        check(lrm_reconstruct_file(p_.get(), path.c_str(), &raw));
        return Mesh(raw);
    }
    std::vector<float> preprocess(const Image& image) {
        const int64_t s = info().input_size;
        std::vector<float> out(static_cast<size_t>(3 * s * s));
        check(lrm_preprocess_rgba(p_.get(), image.pixels(), image.width(), image.height(), image.stride(), out.data(),
                                  static_cast<int64_t>(out.size())));
        return out;
    }
    // Problems the calling thread's last reconstruct / preprocess met in its image without stopping, one a line.
    static std::string last_warnings() { return lrm_last_warnings(); }
    lrm_context* get() const noexcept { return p_.get(); }

private:
    void check(lrm_status s) const { detail::check(s); }
    std::unique_ptr<lrm_context, detail::ContextDeleter> p_;
};

}  // namespace lrm

#endif  // LRM_RT_HPP
