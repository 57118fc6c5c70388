// C++ consumer of an installed lrm_rt through the header-only wrapper (C++11).
#include <cstdio>

#include <lrm_rt.hpp>

int main(int argc, char** argv) {
    try {
        if (argc < 3) {
            lrm::Context missing("/nonexistent/export");  // must throw
            return 1;
        }
        lrm_params params = lrm::default_params();
        params.mc_resolution = 32;
        lrm::Context ctx(argv[1], params);
        lrm::Mesh mesh = ctx.reconstruct_file(argv[2]);
        std::printf("C++ consumer: %lld vertices, %lld faces\n", (long long)mesh.vertex_count(), (long long)mesh.face_count());
        return mesh.face_count() > 0 ? 0 : 1;
    } catch (const lrm::Error& e) {
        std::printf("lrm::Error: %s\n", e.what());
        return argc < 3 && e.status() == LRM_ERR_IO ? 0 : 1;
    }
}
