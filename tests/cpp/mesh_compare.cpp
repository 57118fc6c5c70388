// mesh_compare A.ply B.ply [--chamfer-tol T] [--vertex-tol T] [--color-tol N]
// Checks that two meshes are the same reconstruction: equal vertex and face counts, Chamfer distance <= T
// (default 1e-5, world units), and, when the vertex orders agree (both runtimes run the same marching-cubes
// kernels), identical faces, per-vertex positions within --vertex-tol and uchar colours within --color-tol.
#include <cstdlib>

#include "test_util.hpp"

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: mesh_compare A.ply B.ply [--chamfer-tol T] [--vertex-tol T] [--color-tol N]\n");
        return 2;
    }
    double chamfer_tol = 1e-5, vertex_tol = 1e-4;
    int color_tol = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        if (a == "--chamfer-tol") chamfer_tol = std::atof(argv[i + 1]);
        else if (a == "--vertex-tol") vertex_tol = std::atof(argv[i + 1]);
        else if (a == "--color-tol") color_tol = std::atoi(argv[i + 1]);
        else return 2;
    }
    try {
        const test::PlyMesh a = test::read_ply(argv[1]), b = test::read_ply(argv[2]);
        const size_t nva = a.v.size() / 3, nvb = b.v.size() / 3, nfa = a.f.size() / 3, nfb = b.f.size() / 3;
        std::printf("A: %zu vertices, %zu faces (%s)\nB: %zu vertices, %zu faces (%s)\n", nva, nfa, argv[1], nvb, nfb,
                    argv[2]);
        CHECK(nva == nvb);
        CHECK(nfa == nfb);
        CHECK(nfa > 0);
        const double ch = test::chamfer(a.v, b.v);
        std::printf("chamfer distance: %.3g (tolerance %.3g)\n", ch, chamfer_tol);
        CHECK(ch <= chamfer_tol);
        if (nva == nvb && nfa == nfb) {
            const bool same_faces = a.f == b.f;
            double dv = 0.0;
            for (size_t i = 0; i < a.v.size(); ++i) dv = std::max(dv, (double)std::fabs(a.v[i] - b.v[i]));
            std::printf("same face list: %s; max vertex difference in order: %.3g (tolerance %.3g)\n",
                        same_faces ? "yes" : "no", dv, vertex_tol);
            CHECK(same_faces);
            CHECK(dv <= vertex_tol);
            if (!a.rgb.empty() && !b.rgb.empty()) {
                int dc = 0;
                for (size_t i = 0; i < a.rgb.size(); ++i) dc = std::max(dc, std::abs((int)a.rgb[i] - (int)b.rgb[i]));
                std::printf("max colour difference: %d / 255 (tolerance %d)\n", dc, color_tol);
                CHECK(dc <= color_tol);
            }
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    std::printf("%s\n", test::failures() ? "MESHES DIFFER" : "meshes match");
    return test::failures() ? 1 : 0;
}
