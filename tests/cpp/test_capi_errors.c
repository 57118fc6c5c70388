/* Bad input through the C API: every case must return the expected status with a message, leave the
 * out-parameters NULL and keep the process alive. Written in C to prove that lrm_rt.h is plain C.
 *
 *   test_capi_errors EXPORT_DIR IMAGE_PNG BROKEN_DIR WORK_DIR
 *
 * EXPORT_DIR: a good export; IMAGE_PNG: a good image; BROKEN_DIR: damaged exports + cases.txt
 * (tests/cpp/make_reference.py); WORK_DIR: scratch space for generated bad images. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lrm_rt.h"

static int failures = 0, checks = 0;

static void expect(const char* what, lrm_status got, lrm_status want, const lrm_context* ctx) {
    const char* msg = lrm_last_error(ctx);
    ++checks;
    if (got != want) {
        fprintf(stderr, "FAIL %s: got %s, want %s (%s)\n", what, lrm_status_string(got), lrm_status_string(want), msg);
        ++failures;
    } else if (want != LRM_OK && (msg == NULL || msg[0] == '\0')) {
        fprintf(stderr, "FAIL %s: %s without a message\n", what, lrm_status_string(got));
        ++failures;
    } else {
        printf("ok   %-46s %-26s %s\n", what, lrm_status_string(got), want != LRM_OK ? msg : "");
    }
}

/* expect() and the message names the cause. */
static void expect_msg(const char* what, lrm_status got, lrm_status want, const lrm_context* ctx, const char* part) {
    const char* msg = lrm_last_error(ctx);
    if (got == want && want != LRM_OK && strstr(msg, part) == NULL) {
        ++checks;
        fprintf(stderr, "FAIL %s: message '%s' does not say '%s'\n", what, msg, part);
        ++failures;
        return;
    }
    expect(what, got, want, ctx);
}

static void expect_null(const char* what, const void* p) {
    ++checks;
    if (p != NULL) {
        fprintf(stderr, "FAIL %s: out-parameter not NULL after an error\n", what);
        ++failures;
    }
}

static char* read_all(const char* path, long* size) {
    FILE* f = fopen(path, "rb");
    char* buf;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (char*)malloc((size_t)*size + 1);
    if (buf && fread(buf, 1, (size_t)*size, f) != (size_t)*size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

static void write_all(const char* path, const void* data, size_t n) {
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

static void bad_image(lrm_context* ctx, const char* work, const char* name, const void* data, size_t n, lrm_status want) {
    char path[4096], what[256];
    lrm_mesh* mesh = (lrm_mesh*)0x1; /* must be reset to NULL */
    lrm_image* img = (lrm_image*)0x1;
    snprintf(path, sizeof path, "%s/%s", work, name);
    write_all(path, data, n);
    snprintf(what, sizeof what, "reconstruct_file(%s)", name);
    expect(what, lrm_reconstruct_file(ctx, path, &mesh), want, ctx);
    expect_null(what, mesh);
    snprintf(what, sizeof what, "image_load(%s)", name);
    expect(what, lrm_image_load(path, &img), want, NULL);
    expect_null(what, img);
}

/* Headers whose width * height overflows int64 (or the int32 image size): refused before any allocation. The
 * decoder is tried first, and the reconstruction only when it refused the file, so that a build with the
 * overflow never gets to allocate what the wrapped sizes ask for. */
static void oversized_image(lrm_context* ctx, const char* work, const char* name, const void* data, size_t n) {
    char path[4096], what[256];
    lrm_image* img = (lrm_image*)0x1;
    lrm_mesh* mesh = (lrm_mesh*)0x1;
    lrm_status st;
    snprintf(path, sizeof path, "%s/%s", work, name);
    write_all(path, data, n);
    snprintf(what, sizeof what, "image_load(%s)", name);
    st = lrm_image_load(path, &img);
    expect_msg(what, st, LRM_ERR_IMAGE, NULL, "too large");
    if (st != LRM_ERR_IMAGE) {
        lrm_image_free(st == LRM_OK ? img : NULL);
        return;
    }
    expect_null(what, img);
    snprintf(what, sizeof what, "reconstruct_file(%s)", name);
    expect_msg(what, lrm_reconstruct_file(ctx, path, &mesh), LRM_ERR_IMAGE, ctx, "too large");
    expect_null(what, mesh);
}

static uint32_t crc32_of(const unsigned char* p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int k;
    for (i = 0; i < n; ++i) {
        c ^= p[i];
        for (k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

static size_t put_be32(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24), p[1] = (unsigned char)(v >> 16), p[2] = (unsigned char)(v >> 8), p[3] = (unsigned char)v;
    return 4;
}

static size_t put_chunk(unsigned char* p, const char* type, const unsigned char* data, uint32_t len) {
    size_t n = put_be32(p, len);
    memcpy(p + n, type, 4);
    memcpy(p + n + 4, data, len);
    n += 4 + len;
    return n + put_be32(p + n, crc32_of(p + 4, 4 + (size_t)len));
}

/* A well-formed RGBA8 PNG header (IHDR + a small IDAT + IEND, valid CRCs) claiming w x h pixels. */
static size_t png_claiming(unsigned char* out, uint32_t w, uint32_t h) {
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    static const unsigned char idat[] = {0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01}; /* zlib("\0") */
    unsigned char ihdr[13] = {0, 0, 0, 0, 0, 0, 0, 0, 8, 6, 0, 0, 0};
    size_t n = 8;
    memcpy(out, sig, 8);
    put_be32(ihdr, w);
    put_be32(ihdr + 4, h);
    n += put_chunk(out + n, "IHDR", ihdr, 13);
    n += put_chunk(out + n, "IDAT", idat, sizeof idat);
    return n + put_chunk(out + n, "IEND", NULL, 0);
}

static void overflow_checks(lrm_context* ctx, const char* work) {
    unsigned char png[128];
    /* PAM: 3 * 6148914691236517206 = 2^64 + 2 (once decoded as 2 pixels with a truncated height) */
    static const char pam[] = "P7\nWIDTH 3\nHEIGHT 6148914691236517206\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\n"
                              "ENDHDR\n\xc8\x64\x32\xff\x0a\x14\x1e\xff";
    /* PGM: 154317347858 * 119537721 = 2^64 + 2 as well, both sides within the PNM reader's digits */
    static const char pgm[] = "P5\n154317347858 119537721\n255\n\x80\x80";
    oversized_image(ctx, work, "huge_4g_x_4g.png", png, png_claiming(png, 0xFFFFFFFFu, 0xFFFFFFFFu));
    oversized_image(ctx, work, "huge_wide.png", png, png_claiming(png, 0x80000000u, 1));
    oversized_image(ctx, work, "huge_wrap.pam", pam, sizeof pam - 1);
    oversized_image(ctx, work, "huge_wrap.pgm", pgm, sizeof pgm - 1);
}

/* A file over the 1 GiB image limit is refused from its size, before it is read: a sparse file, so the test
 * takes no disk space. */
static void oversized_file_check(const char* work) {
    char path[4096];
    lrm_image* img = (lrm_image*)0x1;
    snprintf(path, sizeof path, "%s/sparse_1gib.png", work);
    write_all(path, "x", 1);
    if (truncate(path, (1L << 30) + 1) != 0) {
        fprintf(stderr, "FAIL cannot make a sparse file in %s\n", work);
        ++failures;
        return;
    }
    expect_msg("image_load(a 1 GiB + 1 byte file)", lrm_image_load(path, &img), LRM_ERR_IO, NULL, "too large");
    expect_null("image_load(a 1 GiB + 1 byte file)", img);
    unlink(path);
}

static void null_and_size_checks(lrm_context* ctx, const char* export_dir, const char* image_path) {
    lrm_context* out_ctx = (lrm_context*)0x1;
    lrm_mesh* mesh = (lrm_mesh*)0x1;
    lrm_params p = lrm_default_params();
    lrm_model_info info;
    lrm_timings t;
    uint8_t px[4 * 8 * 8];
    float buf[16];
    memset(px, 200, sizeof px);

    /* lrm_create */
    expect("create(NULL dir)", lrm_create(NULL, NULL, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect_null("create(NULL dir)", out_ctx);
    expect("create(empty dir string)", lrm_create("", NULL, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("create(NULL out)", lrm_create(export_dir, NULL, NULL), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("create(missing dir)", lrm_create("/nonexistent/lrm_rt/export", NULL, &out_ctx), LRM_ERR_IO, NULL);
    expect("create(a file, not a dir)", lrm_create(image_path, NULL, &out_ctx), LRM_ERR_IO, NULL);
    p.struct_size = 4;
    expect("create(params not initialised)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    p = lrm_default_params();
    p.mc_resolution = 1;
    expect("create(mc_resolution 1)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    p.mc_resolution = 4097;
    expect_msg("create(mc_resolution 4097)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL,
               "[2, 4096]");
    p.mc_resolution = 4096; /* the largest, as the Python CLI's and a manifest's (the grid is sized later) */
    expect("create(mc_resolution 4096)", lrm_create(export_dir, &p, &out_ctx), LRM_OK, NULL);
    lrm_free(out_ctx);
    out_ctx = NULL;
    p = lrm_default_params();
    p.threads = -1;
    expect("create(threads -1)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    p.threads = 1025;
    expect("create(threads 1025)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    p = lrm_default_params();
    p.mc_threshold = (float)INFINITY;
    expect("create(mc_threshold inf)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    p = lrm_default_params();
    p.device = 7;
    expect("create(unknown device)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL);
    p = lrm_default_params();
    p.orientation = 2;
    expect_msg("create(unknown orientation)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_INVALID_ARGUMENT, NULL,
               "orientation must be");
    if (strstr(lrm_build_features(), "cuda") == NULL) {
        p = lrm_default_params();
        p.device = LRM_DEVICE_CUDA;
        expect("create(cuda in a CPU build)", lrm_create(export_dir, &p, &out_ctx), LRM_ERR_UNSUPPORTED, NULL);
    }
    expect_null("create(...) failures", out_ctx);

    /* reconstruction arguments */
    expect("reconstruct_rgba(NULL ctx)", lrm_reconstruct_rgba(NULL, px, 8, 8, 32, &mesh), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect_null("reconstruct_rgba(NULL ctx)", mesh);
    expect("reconstruct_rgba(NULL pixels)", lrm_reconstruct_rgba(ctx, NULL, 8, 8, 32, &mesh), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("reconstruct_rgba(NULL out)", lrm_reconstruct_rgba(ctx, px, 8, 8, 32, NULL), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("reconstruct_rgba(width 0)", lrm_reconstruct_rgba(ctx, px, 0, 8, 32, &mesh), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("reconstruct_rgba(height -3)", lrm_reconstruct_rgba(ctx, px, 8, -3, 32, &mesh), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("reconstruct_rgba(stride < 4*width)", lrm_reconstruct_rgba(ctx, px, 8, 8, 31, &mesh), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("reconstruct_rgba(huge size)", lrm_reconstruct_rgba(ctx, px, 100000, 100000, 400000, &mesh), LRM_ERR_IMAGE, ctx);
    memset(px, 0, sizeof px); /* all transparent */
    expect("reconstruct_rgba(empty alpha)", lrm_reconstruct_rgba(ctx, px, 8, 8, 32, &mesh), LRM_ERR_IMAGE, ctx);
    expect_null("reconstruct_rgba(...) failures", mesh);
    expect("reconstruct_file(NULL path)", lrm_reconstruct_file(ctx, NULL, &mesh), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("reconstruct_file(missing file)", lrm_reconstruct_file(ctx, "/nonexistent/image.png", &mesh), LRM_ERR_IO, ctx);
    expect("reconstruct_file(a directory)", lrm_reconstruct_file(ctx, export_dir, &mesh), LRM_ERR_IO, ctx);
    expect_null("reconstruct_file(...) failures", mesh);
    memset(px, 200, sizeof px);
    expect("preprocess(wrong out_count)", lrm_preprocess_rgba(ctx, px, 8, 8, 32, buf, 16), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("preprocess(NULL out)", lrm_preprocess_rgba(ctx, px, 8, 8, 32, NULL, 16), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("preprocess(NULL ctx)", lrm_preprocess_rgba(NULL, px, 8, 8, 32, buf, 16), LRM_ERR_INVALID_ARGUMENT, NULL);

    /* accessors and writers */
    expect("get_model_info(NULL ctx)", lrm_get_model_info(NULL, &info), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("get_model_info(NULL out)", lrm_get_model_info(ctx, NULL), LRM_ERR_INVALID_ARGUMENT, ctx);
    expect("mesh_timings(NULL mesh)", lrm_mesh_timings(NULL, &t), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("mesh_write(NULL mesh)", lrm_mesh_write(NULL, "x.ply", LRM_MESH_AUTO), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("image_load(NULL path)", lrm_image_load(NULL, NULL), LRM_ERR_INVALID_ARGUMENT, NULL);
    ++checks;
    if (lrm_mesh_vertex_count(NULL) != 0 || lrm_mesh_face_count(NULL) != 0 || lrm_mesh_vertices(NULL) != NULL ||
        lrm_mesh_faces(NULL) != NULL || lrm_mesh_colors(NULL) != NULL || lrm_image_pixels(NULL) != NULL ||
        lrm_image_width(NULL) != 0) {
        fprintf(stderr, "FAIL NULL accessors\n");
        ++failures;
    }
    lrm_free(NULL);
    lrm_mesh_free(NULL);
    lrm_image_free(NULL);
    ++checks;
    if (strcmp(lrm_status_string(999), "LRM_ERR_UNKNOWN") != 0) {
        fprintf(stderr, "FAIL status string of an unknown code\n");
        ++failures;
    }
}

static int is_fifo(const char* path) {
    struct stat st;
    return lstat(path, &st) == 0 && S_ISFIFO(st.st_mode);
}

/* FIFOs (and links to them) the test makes in its own work directory, never system paths: a mesh written over
 * one must be refused, not replace the node; read as an image, the path is named as not a regular file. */
static void special_file_checks(lrm_context* ctx, const lrm_mesh* mesh, const char* work) {
    char fifo[4096], link[4096], file[4096], link2[4096];
    lrm_image* img = (lrm_image*)0x1;
    lrm_mesh* out = (lrm_mesh*)0x1;
    struct stat st;
    snprintf(fifo, sizeof fifo, "%s/fifo.ply", work);
    snprintf(link, sizeof link, "%s/link_to_fifo.ply", work);
    snprintf(file, sizeof file, "%s/link_target.ply", work);
    snprintf(link2, sizeof link2, "%s/link_to_file.ply", work);
    unlink(fifo), unlink(link), unlink(file), unlink(link2);
    if (mkfifo(fifo, 0600) != 0 || symlink(fifo, link) != 0 || symlink(file, link2) != 0) {
        fprintf(stderr, "FAIL cannot make a FIFO and links in %s\n", work);
        ++failures;
        return;
    }
    write_all(file, "old", 3);
    expect_msg("mesh_write(a FIFO)", lrm_mesh_write(mesh, fifo, LRM_MESH_PLY), LRM_ERR_IO, NULL, "not a regular file");
    expect_msg("mesh_write(a link to a FIFO)", lrm_mesh_write(mesh, link, LRM_MESH_PLY), LRM_ERR_IO, NULL,
               "not a regular file");
    ++checks;
    if (!is_fifo(fifo) || lstat(link, &st) != 0 || !S_ISLNK(st.st_mode)) {
        fprintf(stderr, "FAIL mesh_write replaced a FIFO or a link to one\n");
        ++failures;
    }
    /* Documented: a link to a regular file is replaced by the new file, its target left unchanged. */
    expect("mesh_write(a link to a file)", lrm_mesh_write(mesh, link2, LRM_MESH_PLY), LRM_OK, NULL);
    ++checks;
    if (lstat(link2, &st) != 0 || !S_ISREG(st.st_mode) || stat(file, &st) != 0 || st.st_size != 3) {
        fprintf(stderr, "FAIL mesh_write through a link: the link is not a file or its old target changed\n");
        ++failures;
    }
    expect_msg("image_load(a FIFO)", lrm_image_load(fifo, &img), LRM_ERR_IO, NULL, "not a regular file");
    expect_null("image_load(a FIFO)", img);
    expect_msg("reconstruct_file(a FIFO)", lrm_reconstruct_file(ctx, fifo, &out), LRM_ERR_IO, ctx, "not a regular file");
    expect_null("reconstruct_file(a FIFO)", out);
    unlink(fifo), unlink(link), unlink(file), unlink(link2);
}

static void writer_checks(lrm_context* ctx, const char* image_path, const char* work) {
    lrm_mesh* mesh = NULL;
    char path[4096];
    expect("reconstruct_file(good image)", lrm_reconstruct_file(ctx, image_path, &mesh), LRM_OK, ctx);
    if (!mesh) return;
    special_file_checks(ctx, mesh, work);
    oversized_file_check(work);
    snprintf(path, sizeof path, "%s/mesh.xyz", work);
    expect("mesh_write(unknown extension)", lrm_mesh_write(mesh, path, LRM_MESH_AUTO), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("mesh_write(unknown format code)", lrm_mesh_write(mesh, path, 42), LRM_ERR_INVALID_ARGUMENT, NULL);
    expect("mesh_write(missing directory)", lrm_mesh_write(mesh, "/nonexistent/dir/mesh.ply", LRM_MESH_AUTO), LRM_ERR_IO, NULL);
    expect("mesh_write(path is a directory)", lrm_mesh_write(mesh, work, LRM_MESH_PLY), LRM_ERR_IO, NULL);
    expect("mesh_write(empty path)", lrm_mesh_write(mesh, "", LRM_MESH_PLY), LRM_ERR_INVALID_ARGUMENT, NULL);
    snprintf(path, sizeof path, "%s/mesh.ply", work);
    {   /* the file gets 0666 & ~umask, and the process umask is left as it was (the writer never sets it) */
        const mode_t old_mask = umask(027);
        struct stat st;
        memset(&st, 0, sizeof st);
        expect("mesh_write(good)", lrm_mesh_write(mesh, path, LRM_MESH_AUTO), LRM_OK, NULL);
        const mode_t after = umask(old_mask);
        ++checks;
        if (stat(path, &st) != 0 || (st.st_mode & 0777) != 0640 || after != 027) {
            fprintf(stderr, "FAIL mesh_write: mode %o (want 640), umask afterwards %o (want 27)\n",
                    (unsigned)(st.st_mode & 0777), (unsigned)after);
            ++failures;
        }
    }
    lrm_mesh_free(mesh);
}

static void empty_mesh_check(const char* export_dir, const char* image_path, const char* work) {
    lrm_params p = lrm_default_params();
    lrm_context* ctx = NULL;
    lrm_mesh* mesh = NULL;
    char path[4096];
    p.mc_threshold = 1e30f;
    p.mc_resolution = 16;
    expect("create(threshold above the field)", lrm_create(export_dir, &p, &ctx), LRM_OK, NULL);
    if (!ctx) return;
    expect("reconstruct(threshold above the field)", lrm_reconstruct_file(ctx, image_path, &mesh), LRM_OK, ctx);
    ++checks;
    if (!mesh || lrm_mesh_face_count(mesh) != 0 || lrm_mesh_faces(mesh) != NULL) {
        fprintf(stderr, "FAIL empty mesh expected\n");
        ++failures;
    }
    snprintf(path, sizeof path, "%s/empty.glb", work);
    expect_msg("mesh_write(empty mesh)", lrm_mesh_write(mesh, path, LRM_MESH_AUTO), LRM_ERR_EMPTY_MESH, NULL,
               "stays below the level 1e+30 everywhere");
    lrm_mesh_free(mesh);
    lrm_free(ctx);
    /* a level under the whole field (densities are >= 0): the advice is the other way */
    mesh = NULL;
    ctx = NULL;
    p.mc_threshold = -1.0f;
    expect("create(threshold below the field)", lrm_create(export_dir, &p, &ctx), LRM_OK, NULL);
    if (!ctx) return;
    expect("reconstruct(threshold below the field)", lrm_reconstruct_file(ctx, image_path, &mesh), LRM_OK, ctx);
    expect_msg("mesh_write(empty mesh, low level)", lrm_mesh_write(mesh, path, LRM_MESH_AUTO), LRM_ERR_EMPTY_MESH,
               NULL, "raise mc_threshold");
    lrm_mesh_free(mesh);
    lrm_free(ctx);
}

static void image_checks(lrm_context* ctx, const char* image_path, const char* work) {
    long n = 0;
    char* png = read_all(image_path, &n);
    static const unsigned char jpeg[] = {0xFF, 0xD8, 0xFF, 0xE0, 0, 16, 'J', 'F', 'I', 'F', 0};
    /* 0x0 PNG: signature + IHDR (valid CRC) with zero width and height */
    static const unsigned char zero_png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R',
                                             0, 0, 0, 0, 0, 0, 0, 0, 8, 6, 0, 0, 0, 0x3b, 0x8b, 0x7c, 0x12};
    static const char transparent_pam[] = "P7\nWIDTH 2\nHEIGHT 1\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n"
                                          "\x10\x20\x30\x00\x10\x20\x30\x00";
    if (!png) {
        fprintf(stderr, "cannot read %s\n", image_path);
        exit(2);
    }
    bad_image(ctx, work, "empty.png", "", 0, LRM_ERR_IMAGE);
    bad_image(ctx, work, "text.png", "hello, not an image", 19, LRM_ERR_IMAGE);
    bad_image(ctx, work, "photo.jpg", jpeg, sizeof jpeg, LRM_ERR_IMAGE);
    bad_image(ctx, work, "truncated.png", png, (size_t)n / 2, LRM_ERR_IMAGE);
    png[40] ^= 0x55; /* inside the first chunks: CRC mismatch */
    bad_image(ctx, work, "corrupt.png", png, (size_t)n, LRM_ERR_IMAGE);
    bad_image(ctx, work, "zero.png", zero_png, sizeof zero_png, LRM_ERR_IMAGE);
    bad_image(ctx, work, "transparent.pam", transparent_pam, sizeof transparent_pam - 1, LRM_ERR_IMAGE);
    bad_image(ctx, work, "short.ppm", "P6\n4 4\n255\n\x01\x02", 13, LRM_ERR_IMAGE);
    free(png);
}

static void broken_export_checks(const char* broken_dir, const char* image_path) {
    char path[4096], line[512], name[256], stage[64], status[64], what[512];
    FILE* f;
    snprintf(path, sizeof path, "%s/cases.txt", broken_dir);
    f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "FAIL cannot read %s\n", path);
        ++failures;
        return;
    }
    while (fgets(line, sizeof line, f)) {
        lrm_context* ctx = (lrm_context*)0x1;
        lrm_mesh* mesh = (lrm_mesh*)0x1;
        lrm_status want = LRM_OK, got;
        int s;
        if (sscanf(line, "%255s %63s %63s", name, stage, status) != 3) continue;
        for (s = 0; s <= LRM_ERR_INTERNAL; ++s)
            if (strcmp(lrm_status_string(s), status) == 0) want = (lrm_status)s;
        snprintf(path, sizeof path, "%s/%s", broken_dir, name);
        got = lrm_create(path, NULL, &ctx);
        snprintf(what, sizeof what, "broken export %s: create", name);
        if (strcmp(stage, "create") == 0) {
            expect(what, got, want, NULL);
            expect_null(what, ctx);
            continue;
        }
        expect(what, got, LRM_OK, NULL);
        if (got != LRM_OK) continue;
        snprintf(what, sizeof what, "broken export %s: reconstruct", name);
        expect(what, lrm_reconstruct_file(ctx, image_path, &mesh), want, ctx);
        expect_null(what, mesh);
        lrm_free(ctx);
    }
    fclose(f);
}

int main(int argc, char** argv) {
    lrm_context* ctx = NULL;
    lrm_status st;
    if (argc != 5) {
        fprintf(stderr, "usage: %s EXPORT_DIR IMAGE_PNG BROKEN_DIR WORK_DIR\n", argv[0]);
        return 2;
    }
    printf("lrm_rt %s (%s)\n", lrm_version(), lrm_build_features());
    st = lrm_create(argv[1], NULL, &ctx);
    if (st != LRM_OK) {
        fprintf(stderr, "cannot load the good export %s: %s\n", argv[1], lrm_last_error(NULL));
        return 1;
    }
    null_and_size_checks(ctx, argv[1], argv[2]);
    image_checks(ctx, argv[2], argv[4]);
    overflow_checks(ctx, argv[4]);
    writer_checks(ctx, argv[2], argv[4]);
    empty_mesh_check(argv[1], argv[2], argv[4]);
    broken_export_checks(argv[3], argv[2]);
    /* The context still works after all of that. */
    {
        lrm_mesh* mesh = NULL;
        expect("reconstruct after the errors", lrm_reconstruct_file(ctx, argv[2], &mesh), LRM_OK, ctx);
        lrm_mesh_free(mesh);
    }
    lrm_free(ctx);
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
