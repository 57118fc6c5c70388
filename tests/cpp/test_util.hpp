// Helpers shared by the C++ test programs: files, a binary PLY reader (lrm_rt's and trimesh's layouts) and a
// nearest-neighbour Chamfer distance on a uniform grid.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace test {

inline std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + path);
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

struct PlyMesh {
    std::vector<float> v;         // V * 3
    std::vector<int64_t> f;       // F * 3
    std::vector<uint8_t> rgb;     // V * 3 (empty without colours)
    std::vector<float> n;         // V * 3 (empty without normals)
};

// Binary little-endian PLY with float x y z, optional float normals and uchar colours, triangles as uchar-count lists.
inline PlyMesh read_ply(const std::string& path) {
    const std::string d = read_file(path);
    const size_t end = d.find("end_header\n");
    if (d.compare(0, 4, "ply\n") != 0 || end == std::string::npos) throw std::runtime_error(path + ": not a PLY file");
    std::istringstream hs(d.substr(0, end));
    std::string line, element;
    int64_t nv = 0, nf = 0;
    std::vector<std::pair<std::string, std::string>> vprops;  // (type, name)
    std::string face_index_type;
    while (std::getline(hs, line)) {
        std::istringstream ls(line);
        std::string kw;
        ls >> kw;
        if (kw == "format" && line.find("binary_little_endian") == std::string::npos)
            throw std::runtime_error(path + ": only binary little-endian PLY is read");
        if (kw == "element") {
            ls >> element;
            (element == "vertex" ? nv : nf) = 0;
            int64_t n;
            ls >> n;
            (element == "vertex" ? nv : nf) = n;
        } else if (kw == "property") {
            std::string t, name;
            ls >> t;
            if (t == "list") {
                std::string ct, it;
                ls >> ct >> it;
                face_index_type = it;
            } else {
                ls >> name;
                if (element == "vertex") vprops.push_back({t, name});
            }
        }
    }
    PlyMesh m;
    const char* p = d.data() + end + 11;
    const char* const stop = d.data() + d.size();
    auto need = [&](size_t n) {
        if (p + n > stop) throw std::runtime_error(path + ": truncated");
    };
    bool has_rgb = false, has_normals = false;
    for (auto& pr : vprops) has_rgb |= pr.second == "red", has_normals |= pr.second == "nx";
    m.v.resize((size_t)nv * 3);
    if (has_rgb) m.rgb.resize((size_t)nv * 3);
    if (has_normals) m.n.resize((size_t)nv * 3);
    for (int64_t i = 0; i < nv; ++i) {
        for (auto& pr : vprops) {
            const size_t sz = pr.first == "float" ? 4 : pr.first == "uchar" ? 1 : 0;
            if (!sz) throw std::runtime_error(path + ": unsupported vertex property type " + pr.first);
            need(sz);
            if (pr.first == "float") {
                float x;
                std::memcpy(&x, p, 4);
                const int k = pr.second == "x" ? 0 : pr.second == "y" ? 1 : pr.second == "z" ? 2 : -1;
                const int j = pr.second == "nx" ? 0 : pr.second == "ny" ? 1 : pr.second == "nz" ? 2 : -1;
                if (k >= 0) m.v[(size_t)i * 3 + k] = x;
                if (j >= 0) m.n[(size_t)i * 3 + j] = x;
            } else {
                const int k = pr.second == "red" ? 0 : pr.second == "green" ? 1 : pr.second == "blue" ? 2 : -1;
                if (k >= 0) m.rgb[(size_t)i * 3 + k] = (uint8_t)*p;
            }
            p += sz;
        }
    }
    if (face_index_type != "int" && face_index_type != "uint") throw std::runtime_error(path + ": face indices must be int");
    m.f.resize((size_t)nf * 3);
    for (int64_t i = 0; i < nf; ++i) {
        need(13);
        if ((uint8_t)*p != 3) throw std::runtime_error(path + ": non-triangle face");
        ++p;
        for (int k = 0; k < 3; ++k, p += 4) {
            int32_t x;
            std::memcpy(&x, p, 4);
            m.f[(size_t)i * 3 + k] = x;
        }
    }
    return m;
}

// Mean nearest-neighbour distance from every point of a to the points of b (uniform grid, exact search).
inline double mean_nn_distance(const std::vector<float>& a, const std::vector<float>& b) {
    const size_t na = a.size() / 3, nb = b.size() / 3;
    if (!na || !nb) return na == nb ? 0.0 : INFINITY;
    float lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
    for (size_t i = 0; i < nb; ++i)
        for (int k = 0; k < 3; ++k) lo[k] = std::min(lo[k], b[3 * i + k]), hi[k] = std::max(hi[k], b[3 * i + k]);
    const double cell = std::max({hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2], 1e-6f}) / 64.0;
    auto key = [&](int64_t x, int64_t y, int64_t z) { return (x * 73856093) ^ (y * 19349663) ^ (z * 83492791); };
    std::unordered_map<int64_t, std::vector<uint32_t>> grid;
    auto coord = [&](float v, int k) { return (int64_t)std::floor((v - lo[k]) / cell); };
    for (size_t i = 0; i < nb; ++i) grid[key(coord(b[3 * i], 0), coord(b[3 * i + 1], 1), coord(b[3 * i + 2], 2))].push_back((uint32_t)i);
    double total = 0.0;
    for (size_t i = 0; i < na; ++i) {
        const float* q = &a[3 * i];
        const int64_t c[3] = {coord(q[0], 0), coord(q[1], 1), coord(q[2], 2)};
        double best = INFINITY;
        for (int r = 0; r < 1 << 20; ++r) {  // grow the searched shell until it covers the best distance
            for (int64_t x = c[0] - r; x <= c[0] + r; ++x)
                for (int64_t y = c[1] - r; y <= c[1] + r; ++y)
                    for (int64_t z = c[2] - r; z <= c[2] + r; ++z) {
                        if (std::max({std::llabs(x - c[0]), std::llabs(y - c[1]), std::llabs(z - c[2])}) != r) continue;
                        auto it = grid.find(key(x, y, z));
                        if (it == grid.end()) continue;
                        for (uint32_t j : it->second) {
                            const double dx = q[0] - b[3 * j], dy = q[1] - b[3 * j + 1], dz = q[2] - b[3 * j + 2];
                            best = std::min(best, std::sqrt(dx * dx + dy * dy + dz * dz));
                        }
                    }
            if (best <= r * cell) break;
        }
        total += best;
    }
    return total / (double)na;
}

inline double chamfer(const std::vector<float>& a, const std::vector<float>& b) {
    return 0.5 * (mean_nn_distance(a, b) + mean_nn_distance(b, a));
}

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);    \
            ++test::failures();                                                              \
        }                                                                                    \
    } while (0)

inline int& failures() {
    static int n = 0;
    return n;
}

}  // namespace test
