// Mesh writers: binary PLY, OBJ and glTF 2.0 binary (GLB), each with smooth vertex normals and vertex colours. Each
// file is written to a temporary name beside the target and renamed, so a failure never leaves a partial file behind.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "internal.hpp"

namespace lrm {

namespace {

static_assert(sizeof(float) == 4, "IEEE float32 expected");

bool little_endian() {
    const uint16_t one = 1;
    unsigned char b;
    std::memcpy(&b, &one, 1);
    return b == 1;
}

template <class T>
void put(std::string& s, T v) {  // little-endian (checked in write_mesh)
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    s.append(b, sizeof(T));
}

uint8_t quantise(float c) {  // lrm_rt.mesh._vertex_rgba: clip(rint(c * 255), 0, 255)
    const float v = std::nearbyint(c * 255.0f);
    return (uint8_t)(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
}

// Unit vertex normals: the area-weighted sum of the faces' normals, (0, 0, 1) where they cancel (as Python's
// lrm_rt.mesh.vertex_normals). Every format carries them: without them viewers shade each face flat.
std::vector<float> vertex_normals(const MeshData& m) {
    const size_t nv = m.vertices.size() / 3, nf = m.faces.size() / 3;
    std::vector<double> acc(nv * 3, 0.0);
    const float* v = m.vertices.data();
    for (size_t f = 0; f < nf; ++f) {
        const int32_t* t = &m.faces[3 * f];
        const float *a = v + 3 * t[0], *b = v + 3 * t[1], *c = v + 3 * t[2];
        const double u[3] = {(double)b[0] - a[0], (double)b[1] - a[1], (double)b[2] - a[2]};
        const double w[3] = {(double)c[0] - a[0], (double)c[1] - a[1], (double)c[2] - a[2]};
        const double n[3] = {u[1] * w[2] - u[2] * w[1], u[2] * w[0] - u[0] * w[2], u[0] * w[1] - u[1] * w[0]};
        for (int k = 0; k < 3; ++k)
            for (int i = 0; i < 3; ++i) acc[3 * (size_t)t[k] + i] += n[i];
    }
    std::vector<float> out(nv * 3);
    for (size_t i = 0; i < nv; ++i) {
        const double* n = &acc[3 * i];
        const double len = std::sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]);
        for (int k = 0; k < 3; ++k) out[3 * i + k] = len > 0 ? (float)(n[k] / len) : (k == 2 ? 1.0f : 0.0f);
    }
    return out;
}

std::string ply(const MeshData& m) {
    const size_t nv = m.vertices.size() / 3, nf = m.faces.size() / 3;
    const bool col = !m.colors.empty();
    std::string s = "ply\nformat binary_little_endian 1.0\ncomment written by lrm_rt\nelement vertex " + std::to_string(nv) +
                    "\nproperty float x\nproperty float y\nproperty float z"
                    "\nproperty float nx\nproperty float ny\nproperty float nz\n";
    if (col) s += "property uchar red\nproperty uchar green\nproperty uchar blue\n";
    s += "element face " + std::to_string(nf) + "\nproperty list uchar int vertex_indices\nend_header\n";
    s.reserve(s.size() + nv * 27 + nf * 13);
    const std::vector<float> normals = vertex_normals(m);
    for (size_t i = 0; i < nv; ++i) {
        for (int k = 0; k < 3; ++k) put<float>(s, m.vertices[3 * i + k]);
        for (int k = 0; k < 3; ++k) put<float>(s, normals[3 * i + k]);
        if (col)
            for (int k = 0; k < 3; ++k) put<uint8_t>(s, quantise(m.colors[3 * i + k]));
    }
    for (size_t f = 0; f < nf; ++f) {
        put<uint8_t>(s, 3);
        for (int k = 0; k < 3; ++k) put<int32_t>(s, m.faces[3 * f + k]);
    }
    return s;
}

std::string obj(const MeshData& m) {
    const size_t nv = m.vertices.size() / 3, nf = m.faces.size() / 3;
    const bool col = !m.colors.empty();
    std::string s = "# written by lrm_rt\n";
    s.reserve(nv * (col ? 110 : 70) + nf * 40);
    for (size_t i = 0; i < nv; ++i) {
        s += 'v';
        for (int k = 0; k < 3; ++k) s += ' ' + number_text(m.vertices[3 * i + k]);
        if (col)  // clipped: OpenLRM's colours reach 1.001, and a channel above 1 makes readers take the row as 0..255
            for (int k = 0; k < 3; ++k) s += ' ' + number_text(std::min(std::max(m.colors[3 * i + k], 0.0f), 1.0f));
        s += '\n';
    }
    const std::vector<float> normals = vertex_normals(m);
    char line[96];
    for (size_t i = 0; i < nv; ++i) {
        const float* n = &normals[3 * i];
        s.append(line, (size_t)std::snprintf(line, sizeof line, "vn %.6f %.6f %.6f\n", n[0], n[1], n[2]));
    }
    for (size_t f = 0; f < nf; ++f) {  // "a//a": vertex a with normal a
        s += 'f';
        for (int k = 0; k < 3; ++k) {
            const std::string i = std::to_string(m.faces[3 * f + k] + 1);
            s += ' ' + i + "//" + i;
        }
        s += '\n';
    }
    return s;
}

std::string glb(const MeshData& m) {
    const size_t nv = m.vertices.size() / 3, nf = m.faces.size() / 3;
    const bool col = !m.colors.empty();
    float lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
    for (size_t i = 0; i < nv; ++i)
        for (int k = 0; k < 3; ++k) {
            lo[k] = std::min(lo[k], m.vertices[3 * i + k]);
            hi[k] = std::max(hi[k], m.vertices[3 * i + k]);
        }
    const std::vector<float> normals = vertex_normals(m);
    // Binary chunk: positions, normals, colours (float RGB), indices; every view starts 4-byte aligned. Each
    // block is one buffer view and one accessor of the same index.
    std::string bin, views, acc;
    size_t blocks = 0;
    const auto add = [&](const void* data, size_t bytes, int target, const std::string& accessor) {
        const size_t index = blocks++;
        views += std::string(views.empty() ? "" : ",") + "{\"buffer\":0,\"byteOffset\":" + std::to_string(bin.size()) +
                 ",\"byteLength\":" + std::to_string(bytes) + ",\"target\":" + std::to_string(target) + "}";
        acc += std::string(acc.empty() ? "" : ",") + "{\"bufferView\":" + std::to_string(index) + "," + accessor + "}";
        if (bytes) bin.append(static_cast<const char*>(data), bytes);
        while (bin.size() % 4) bin += '\0';
        return index;
    };
    const auto vec3 = [](const float* v) {
        return "[" + number_text(v[0]) + "," + number_text(v[1]) + "," + number_text(v[2]) + "]";
    };
    const std::string n_vec3 = "\"componentType\":5126,\"count\":" + std::to_string(nv) + ",\"type\":\"VEC3\"";
    std::string attrs = "\"POSITION\":" + std::to_string(add(m.vertices.data(), nv * 12, 34962,
                                                             n_vec3 + ",\"min\":" + vec3(lo) + ",\"max\":" + vec3(hi)));
    attrs += ",\"NORMAL\":" + std::to_string(add(normals.data(), nv * 12, 34962, n_vec3));
    if (col) attrs += ",\"COLOR_0\":" + std::to_string(add(m.colors.data(), nv * 12, 34962, n_vec3));
    const size_t next = add(m.faces.data(), nf * 12, 34963,  // int32 >= 0 == uint32
                            "\"componentType\":5125,\"count\":" + std::to_string(nf * 3) + ",\"type\":\"SCALAR\"");
    std::string json = "{\"asset\":{\"version\":\"2.0\",\"generator\":\"lrm_rt " LRM_RT_VERSION_STRING
                       "\"},\"scene\":0,\"scenes\":[{\"nodes\":[0]}],\"nodes\":[{\"mesh\":0}],"
                       "\"meshes\":[{\"primitives\":[{\"attributes\":{" +
                       attrs + "},\"indices\":" + std::to_string(next) +
                       ",\"mode\":4}]}],\"buffers\":[{\"byteLength\":" + std::to_string(bin.size()) +
                       "}],\"bufferViews\":[" + views + "],\"accessors\":[" + acc + "]}";
    while (json.size() % 4) json += ' ';

    std::string out;
    put<uint32_t>(out, 0x46546C67u);  // "glTF"
    put<uint32_t>(out, 2u);
    put<uint32_t>(out, (uint32_t)(12 + 8 + json.size() + 8 + bin.size()));
    put<uint32_t>(out, (uint32_t)json.size());
    put<uint32_t>(out, 0x4E4F534Au);  // "JSON"
    out += json;
    put<uint32_t>(out, (uint32_t)bin.size());
    put<uint32_t>(out, 0x004E4942u);  // "BIN\0"
    out += bin;
    return out;
}

lrm_mesh_format format_from_path(const std::string& path) {
    const size_t dot = path.rfind('.');
    std::string ext = dot == std::string::npos ? "" : path.substr(dot + 1);
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return (char)std::tolower(c); });
    if (ext == "ply") return LRM_MESH_PLY;
    if (ext == "obj") return LRM_MESH_OBJ;
    if (ext == "glb") return LRM_MESH_GLB;
    fail(LRM_ERR_INVALID_ARGUMENT, "unknown mesh format for " + path + " (use .ply, .obj or .glb, or pass the format)");
}

void write_atomic(const std::string& path, const std::string& data) {
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    if (!is_dir(dir)) fail(LRM_ERR_IO, "output directory does not exist: " + dir);
    if (is_dir(path)) fail(LRM_ERR_IO, "output path is a directory: " + path);
    // rename() would replace a device node or FIFO (e.g. /dev/null, when the directory is writable) with a regular
    // file. Checked through symbolic links; a link to a regular file is itself replaced, its target left as it was.
    if (path_exists(path) && !is_file(path))
        fail(LRM_ERR_IO, "output path exists and is not a regular file (a device, FIFO or socket): " + path);
    // A new file opened with mode 0666 gets the usual permissions (umask applied by the kernel); mkstemp would make
    // it 0600, and reading the umask to widen that afterwards (umask(0); umask(m)) races with other threads.
    static std::atomic<unsigned> counter{0};
    static const unsigned salt = std::random_device{}();
    std::string tmpl;
    int fd = -1;
    for (int attempt = 0; fd < 0 && attempt < 100; ++attempt) {
        char suffix[48];
        std::snprintf(suffix, sizeof suffix, ".tmp%ld.%x.%u", (long)::getpid(), salt, counter.fetch_add(1));
        tmpl = path + suffix;
        fd = ::open(tmpl.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) fail(LRM_ERR_IO, "cannot create a file in " + dir + " (" + std::strerror(errno) + ")");
    size_t done = 0;
    while (done < data.size()) {
        const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            const int e = errno;
            ::close(fd);
            ::unlink(tmpl.c_str());
            fail(LRM_ERR_IO, "cannot write " + path + " (" + std::strerror(e) + ")");
        }
        done += (size_t)n;
    }
    if (::close(fd) != 0 || ::rename(tmpl.c_str(), path.c_str()) != 0) {
        const int e = errno;
        ::unlink(tmpl.c_str());
        fail(LRM_ERR_IO, "cannot write " + path + " (" + std::strerror(e) + ")");
    }
}

}  // namespace

void write_mesh(const MeshData& mesh, const std::string& path, lrm_mesh_format format) {
    if (!little_endian()) fail(LRM_ERR_UNSUPPORTED, "mesh writers need a little-endian host");
    if (format == LRM_MESH_AUTO) format = format_from_path(path);
    if (mesh.faces.empty())
        fail(LRM_ERR_EMPTY_MESH, "the mesh is empty: " +
                                     (mesh.empty_reason.empty() ? "no surface at this threshold" : mesh.empty_reason));
    switch (format) {
        case LRM_MESH_PLY: write_atomic(path, ply(mesh)); break;
        case LRM_MESH_OBJ: write_atomic(path, obj(mesh)); break;
        case LRM_MESH_GLB: write_atomic(path, glb(mesh)); break;
        default: fail(LRM_ERR_INVALID_ARGUMENT, "unknown mesh format " + std::to_string((int)format));  // checked by the API
    }
}

}  // namespace lrm
