/* C consumer of an installed lrm_rt: version, and a reconstruction when given an export and an image. */
#include <stdio.h>
#include <string.h>

#include <lrm_rt.h>

int main(int argc, char** argv) {
    lrm_context* ctx = NULL;
    lrm_mesh* mesh = NULL;
    lrm_params params = lrm_default_params();
    if (strcmp(lrm_version(), LRM_RT_VERSION_STRING) != 0) {
        fprintf(stderr, "header version %s, library version %s\n", LRM_RT_VERSION_STRING, lrm_version());
        return 1;
    }
    printf("lrm_rt %s (%s)\n", lrm_version(), lrm_build_features());
    if (argc < 3) return 0;
    params.mc_resolution = 32;
    if (lrm_create(argv[1], &params, &ctx) != LRM_OK || lrm_reconstruct_file(ctx, argv[2], &mesh) != LRM_OK) {
        fprintf(stderr, "error: %s\n", lrm_last_error(ctx));
        lrm_free(ctx);
        return 1;
    }
    printf("C consumer: %lld vertices, %lld faces\n", (long long)lrm_mesh_vertex_count(mesh),
           (long long)lrm_mesh_face_count(mesh));
    lrm_mesh_free(mesh);
    lrm_free(ctx);
    return 0;
}
