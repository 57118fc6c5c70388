// The C++ wrapper end to end on one exported model, against the Python references of make_reference.py:
//   test_cpp_api EXPORT_DIR IMAGE REF_DIR WORK_DIR
// image decoding == Python's loader (exact); preprocessing == Python's encoder input (max abs <= 1e-5);
// RGBA (padded stride) and file paths give the same mesh; results are deterministic, also from two threads on
// one context; PLY / OBJ / GLB files read back to the mesh; errors surface as lrm::Error with their status.
#include <mutex>
#include <thread>

#include "lrm_rt.hpp"
#include "test_util.hpp"

namespace {

bool same_mesh(const lrm::Mesh& a, const lrm::Mesh& b) {
    if (a.vertex_count() != b.vertex_count() || a.face_count() != b.face_count()) return false;
    const size_t nv = (size_t)a.vertex_count() * 3, nf = (size_t)a.face_count() * 3;
    if (std::memcmp(a.vertices(), b.vertices(), nv * 4) != 0 || std::memcmp(a.faces(), b.faces(), nf * 4) != 0) return false;
    if (a.has_colors() != b.has_colors()) return false;
    return !a.has_colors() || std::memcmp(a.colors(), b.colors(), nv * 4) == 0;
}

template <class F>
lrm_status status_of(F&& f) {
    try {
        f();
    } catch (const lrm::Error& e) {
        std::printf("  expected error: %s\n", e.what());
        return e.status();
    }
    return LRM_OK;
}

uint32_t u32(const std::string& s, size_t at) {
    uint32_t v;
    std::memcpy(&v, s.data() + at, 4);
    return v;
}

void check_files(const lrm::Mesh& mesh, const std::string& work, float radius) {
    const size_t nv = (size_t)mesh.vertex_count(), nf = (size_t)mesh.face_count();
    // PLY: positions exact, colours quantised as the Python writer does.
    mesh.write(work + "/api.ply");
    const test::PlyMesh ply = test::read_ply(work + "/api.ply");
    CHECK(ply.v.size() == nv * 3 && std::memcmp(ply.v.data(), mesh.vertices(), nv * 12) == 0);
    CHECK(ply.f.size() == nf * 3);
    bool faces_ok = ply.f.size() == nf * 3;
    for (size_t i = 0; faces_ok && i < nf * 3; ++i) faces_ok = ply.f[i] == mesh.faces()[i];
    CHECK(faces_ok);
    CHECK(ply.rgb.size() == nv * 3);
    if (ply.rgb.size() == nv * 3) {
        int worst = 0;
        for (size_t i = 0; i < nv * 3; ++i)
            worst = std::max(worst, std::abs((int)ply.rgb[i] - (int)std::nearbyint(mesh.colors()[i] * 255.f)));
        CHECK(worst == 0);
    }
    CHECK(ply.n.size() == nv * 3);  // smooth normals: unit length
    double worst_len = 0.0;
    for (size_t i = 0; i < ply.n.size() / 3; ++i)
        worst_len = std::max(worst_len, std::abs(std::hypot(ply.n[3 * i], ply.n[3 * i + 1], ply.n[3 * i + 2]) - 1.0));
    CHECK(worst_len < 1e-5);
    // OBJ: one "v" line per vertex (with colour), one "vn" per vertex, one "f" line per face (a//a: vertex a, normal a).
    mesh.write(work + "/api.obj");
    {
        std::istringstream obj(test::read_file(work + "/api.obj"));
        std::string line;
        size_t v = 0, vn = 0, f = 0, with_rgb = 0, with_normals = 0;
        while (std::getline(obj, line)) {
            if (line.compare(0, 2, "v ") == 0) {
                ++v;
                std::istringstream ls(line.substr(2));
                float x[6];
                int n = 0;
                while (n < 6 && ls >> x[n]) ++n;
                with_rgb += n == 6;
            } else if (line.compare(0, 3, "vn ") == 0) {
                ++vn;
            } else if (line.compare(0, 2, "f ") == 0) {
                ++f;
                std::istringstream ls(line.substr(2));
                std::string a, b, c;
                ls >> a >> b >> c;
                auto paired = [](const std::string& t) {  // "i//i"
                    const size_t k = t.find("//");
                    return k != std::string::npos && t.substr(0, k) == t.substr(k + 2);
                };
                with_normals += paired(a) && paired(b) && paired(c);
            }
        }
        CHECK(v == nv && vn == nv && f == nf && with_rgb == nv && with_normals == nf);
    }
    // GLB: header, JSON chunk with COLOR_0 and NORMAL, binary chunk holding the positions.
    mesh.write(work + "/api.glb");
    {
        const std::string g = test::read_file(work + "/api.glb");
        CHECK(g.size() >= 28 && u32(g, 0) == 0x46546C67u && u32(g, 4) == 2u && u32(g, 8) == g.size());
        const uint32_t jlen = u32(g, 12);
        CHECK(u32(g, 16) == 0x4E4F534Au && jlen % 4 == 0);
        const std::string json = g.substr(20, jlen);
        CHECK(json.find("\"COLOR_0\"") != std::string::npos && json.find("\"NORMAL\"") != std::string::npos);
        CHECK(json.find("\"count\":" + std::to_string(nv)) != std::string::npos);
        CHECK(json.find("\"count\":" + std::to_string(nf * 3)) != std::string::npos);
        CHECK(u32(g, 20 + jlen + 4) == 0x004E4942u);
        CHECK(std::memcmp(g.data() + 20 + jlen + 8, mesh.vertices(), nv * 12) == 0);
    }
    // Vertices inside the model's world box.
    float worst = 0.f;
    for (size_t i = 0; i < nv * 3; ++i) worst = std::max(worst, std::fabs(mesh.vertices()[i]));
    CHECK(worst <= radius * 1.0001f);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 5) {
        std::fprintf(stderr, "usage: test_cpp_api EXPORT_DIR IMAGE REF_DIR WORK_DIR\n");
        return 2;
    }
    const std::string export_dir = argv[1], image_path = argv[2], ref = argv[3], work = argv[4];
    try {
        lrm_params params = lrm::default_params();
        params.mc_resolution = 64;  // the fixtures' reference resolution (TripoSR's default 256 is slow here)
        lrm::Context ctx(export_dir, params);
        const lrm_model_info info = ctx.info();
        std::printf("%s: %s %s, input %d, triplane %dx%dx%d, backend %s\n", info.name, info.family, info.version,
                    info.input_size, info.triplane_channels, info.triplane_height, info.triplane_width,
                    info.network_backend);
        CHECK(test::read_file(ref + "/reference.json").find(std::string("\"family\": \"") + info.family + "\"") !=
              std::string::npos);

        // Image decoding and preprocessing against Python.
        lrm::Image img(image_path);
        const std::string rgba = test::read_file(ref + "/image.rgba");
        CHECK(rgba.size() == (size_t)img.width() * img.height() * 4);
        CHECK(rgba.size() == (size_t)img.width() * img.height() * 4 && std::memcmp(rgba.data(), img.pixels(), rgba.size()) == 0);
        const std::vector<float> pixels = ctx.preprocess(img);
        const std::string want = test::read_file(ref + "/pixels.f32");
        CHECK(want.size() == pixels.size() * 4);
        if (want.size() == pixels.size() * 4) {
            double worst = 0.0;
            size_t differ = 0;
            for (size_t i = 0; i < pixels.size(); ++i) {
                float w;
                std::memcpy(&w, want.data() + 4 * i, 4);
                worst = std::max(worst, (double)std::fabs(w - pixels[i]));
                differ += w != pixels[i];
            }
            std::printf("preprocessing vs Python: max abs difference %.3g, %zu of %zu values differ\n", worst, differ,
                        pixels.size());
            CHECK(worst <= 1e-5);
        }

        // File path vs RGBA pixels with a padded stride (garbage in the padding must be ignored).
        lrm::Mesh from_file = ctx.reconstruct_file(image_path);
        const int64_t stride = 4LL * img.width() + 12;
        std::vector<uint8_t> padded((size_t)(stride * img.height()), 0xAB);
        for (int32_t y = 0; y < img.height(); ++y)
            std::memcpy(&padded[(size_t)(y * stride)], img.pixels() + (size_t)y * 4 * img.width(), (size_t)4 * img.width());
        lrm::Mesh from_rgba = ctx.reconstruct_rgba(padded.data(), img.width(), img.height(), stride);
        std::printf("mesh: %lld vertices, %lld faces\n", (long long)from_file.vertex_count(), (long long)from_file.face_count());
        CHECK(from_file.face_count() > 0 && from_file.has_colors());
        CHECK(same_mesh(from_file, from_rgba));

        const lrm_timings t = from_file.timings();
        std::printf("timings (ms): decode %.1f preprocess %.1f network %.1f grid %.1f mc %.1f colours %.1f total %.1f\n",
                    t.image_decode * 1e3, t.preprocess * 1e3, t.network * 1e3, t.density_grid * 1e3,
                    t.marching_cubes * 1e3, t.vertex_colors * 1e3, t.total * 1e3);
        CHECK(t.image_decode > 0 && t.preprocess > 0 && t.network > 0 && t.density_grid > 0 && t.marching_cubes > 0 &&
              t.vertex_colors > 0);
        CHECK(t.total >= t.network + t.density_grid + t.marching_cubes);
        CHECK(from_rgba.timings().image_decode == 0.0);

        // Two threads on one context: calls are serialised, results identical.
        lrm::Mesh* results[2] = {nullptr, nullptr};
        std::string thread_errors;
        std::mutex error_mutex;
        std::vector<std::thread> threads;
        for (int k = 0; k < 2; ++k)
            threads.emplace_back([&, k] {
                try {
                    results[k] = new lrm::Mesh(ctx.reconstruct(img));
                } catch (const std::exception& e) {
                    std::lock_guard<std::mutex> lock(error_mutex);
                    thread_errors += e.what();
                }
            });
        for (auto& th : threads) th.join();
        CHECK(thread_errors.empty());
        CHECK(results[0] && results[1] && same_mesh(*results[0], from_file) && same_mesh(*results[1], from_file));
        delete results[0];
        delete results[1];

        check_files(from_file, work, info.radius);

        // Options: no vertex colours, another resolution and threshold, one thread.
        lrm_params p = lrm::default_params();
        p.vertex_colors = 0;
        p.mc_resolution = 32;
        p.threads = 1;
        lrm::Context small(export_dir, p);
        lrm::Mesh m32 = small.reconstruct(img);
        CHECK(!m32.has_colors() && m32.face_count() > 0 && m32.face_count() < from_file.face_count());

        // Errors as exceptions with their status.
        CHECK(status_of([&] { lrm::Context bad("/nonexistent/export"); }) == LRM_ERR_IO);
        CHECK(status_of([&] { from_file.write(work + "/mesh.unknown"); }) == LRM_ERR_INVALID_ARGUMENT);
        CHECK(status_of([&] { ctx.reconstruct_file(work + "/missing.png"); }) == LRM_ERR_IO);
        CHECK(status_of([&] { lrm::Image bad(work + "/missing.png"); }) == LRM_ERR_IO);
        CHECK(status_of([&] { ctx.reconstruct_rgba(img.pixels(), img.width(), img.height(), 3); }) ==
              LRM_ERR_INVALID_ARGUMENT);
        CHECK(std::string(lrm_last_error(ctx.get())).find("stride") != std::string::npos);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected error: %s\n", e.what());
        return 1;
    }
    std::printf("%s\n", test::failures() ? "FAILED" : "all checks passed");
    return test::failures() ? 1 : 0;
}
