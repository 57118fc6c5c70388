/* lrm_rt C API: image -> textured (vertex-coloured) mesh with a Large Reconstruction Model
 * (OpenLRM, TripoSR), from an export directory written by `lrm-rt export --aoti`.
 *
 * Conventions
 *   - Every function that can fail returns an lrm_status; LRM_OK (0) is success. On failure the
 *     out-parameters are left NULL / untouched and lrm_last_error() holds a one-line message.
 *   - No function aborts the process or lets a C++ exception escape; invalid arguments
 *     (NULL pointers, wrong sizes, missing files, mismatched artifacts) are reported as errors.
 *   - Objects returned through out-parameters are owned by the caller and released with the
 *     matching *_free function (each accepts NULL).
 *   - One context may be shared between threads: its calls are serialised. Use one context per
 *     thread for parallel reconstructions. lrm_free must not race with a call on the same context.
 *   - Output frame: the model's native frame (z up), vertices in [-r, r]^3 (TripoSR r = 0.87,
 *     OpenLRM r = 1), or with lrm_params.orientation = LRM_ORIENTATION_Y_UP glTF's y-up frame,
 *     (x, y, z) -> (x, z, -y); faces wound counter-clockwise seen from outside, colours in [0, 1].
 */
#ifndef LRM_RT_H
#define LRM_RT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(LRM_RT_SHARED)
#if defined(LRM_RT_BUILD)
#define LRM_API __declspec(dllexport)
#else
#define LRM_API __declspec(dllimport)
#endif
#elif defined(LRM_RT_SHARED) && defined(LRM_RT_BUILD)
#define LRM_API __attribute__((visibility("default")))
#else
#define LRM_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define LRM_RT_VERSION_MAJOR 0
#define LRM_RT_VERSION_MINOR 2
#define LRM_RT_VERSION_PATCH 0
#define LRM_RT_VERSION_STRING "0.2.0"

typedef enum lrm_status {
    LRM_OK = 0,
    LRM_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, bad size/stride, out-of-range parameter */
    LRM_ERR_IO = 2,               /* a file or directory is missing, unreadable or unwritable */
    LRM_ERR_IMAGE = 3,            /* the image cannot be decoded or used (format, size, empty alpha) */
    LRM_ERR_ARTIFACT = 4,         /* the export directory is incomplete, corrupt or inconsistent */
    LRM_ERR_BACKEND = 5,          /* the network backend is unavailable or failed */
    LRM_ERR_UNSUPPORTED = 6,      /* a feature this build or this export lacks (device, format) */
    LRM_ERR_NUMERIC = 7,          /* NaN/inf in the network output: nothing can be meshed */
    LRM_ERR_EMPTY_MESH = 8,       /* no surface at this threshold (writing an empty mesh) */
    LRM_ERR_OUT_OF_MEMORY = 9,
    LRM_ERR_INTERNAL = 10
} lrm_status;

typedef enum lrm_device { LRM_DEVICE_CPU = 0, LRM_DEVICE_CUDA = 1 } lrm_device;

/* Frame of the mesh: the model's native frame (z up, as the reference code writes it), or rotated by -90
 * degrees about x into glTF's y-up convention, (x, y, z) -> (x, z, -y), as lrm-rt's --orientation y_up. */
typedef enum lrm_orientation { LRM_ORIENTATION_NATIVE = 0, LRM_ORIENTATION_Y_UP = 1 } lrm_orientation;

typedef enum lrm_mesh_format {
    LRM_MESH_AUTO = 0, /* from the file extension: .ply, .obj, .glb */
    LRM_MESH_PLY = 1,  /* binary little-endian; float x y z, float nx ny nz (smooth), uchar red green blue */
    LRM_MESH_OBJ = 2,  /* "v x y z r g b" (colours as floats in [0, 1]), "vn" (smooth), "f a//a b//b c//c" */
    LRM_MESH_GLB = 3   /* glTF 2.0 binary; POSITION, NORMAL (smooth), COLOR_0 (float RGB), uint32 indices */
} lrm_mesh_format;

/* Reconstruction settings. Always start from lrm_default_params() so that fields added later
 * get their defaults; struct_size lets the library check the caller's layout. */
typedef struct lrm_params {
    uint32_t struct_size;   /* sizeof(lrm_params), set by lrm_default_params() */
    int32_t threads;        /* CPU threads in [0, 1024]; 0 = all cores. At most one thread per
                               available processor is used (OpenMP would end the process if the
                               OS refused a thread). A nonzero value also sets LibTorch's
                               (process-wide) intra-op thread count */
    int32_t mc_resolution;  /* marching-cubes grid side in [2, 4096]; 0 = the model's default */
    float mc_threshold;     /* density iso-level; NaN = the model's default */
    int32_t vertex_colors;  /* nonzero: decode a colour per vertex */
    int32_t device;         /* lrm_device; LRM_DEVICE_CUDA needs a CUDA build and a cuda export */
    int32_t device_index;   /* GPU ordinal for LRM_DEVICE_CUDA */
    int32_t orientation;    /* lrm_orientation of the mesh's vertices (and so of every file written) */
} lrm_params;

/* Seconds per stage of one reconstruction (0 for stages that did not run). */
typedef struct lrm_timings {
    double image_decode;   /* lrm_reconstruct_file only */
    double preprocess;
    double network;        /* encoder + transformer (image -> triplane) */
    double density_grid;
    double marching_cubes;
    double vertex_colors;
    double total;
} lrm_timings;

/* What the export directory holds. Strings are owned by the context. */
typedef struct lrm_model_info {
    const char* name;
    const char* family;          /* "triposr" or "openlrm" */
    const char* version;         /* "triposr", "1.0" or "1.1" */
    const char* network_backend; /* e.g. "aoti-cpu" */
    int32_t input_size;          /* square side fed to the encoder */
    int32_t triplane_channels, triplane_height, triplane_width;
    int32_t default_mc_resolution;
    float default_mc_threshold;
    float radius;                /* world box [-radius, radius]^3 */
    double load_seconds;         /* time lrm_create took */
} lrm_model_info;

typedef struct lrm_context lrm_context;
typedef struct lrm_mesh lrm_mesh;
typedef struct lrm_image lrm_image;

/* ---- library ---------------------------------------------------------------------------------- */
LRM_API const char* lrm_version(void);
/* Static name of a status code ("LRM_ERR_IO", ...); "LRM_ERR_UNKNOWN" for other values. */
LRM_API const char* lrm_status_string(int32_t status);
/* Which optional parts this build has: a comma-separated list such as "cpu,aoti,png,pnm,jpeg". */
LRM_API const char* lrm_build_features(void);
/* ctx == NULL: the message of the last failed call on this thread (e.g. lrm_create).
 * ctx != NULL: the message of the last failed call on that context, from any thread.
 * Never NULL ("" when there was no error). Valid until the next lrm_* call on this thread. */
LRM_API const char* lrm_last_error(const lrm_context* ctx);
/* Problems this thread's last lrm_reconstruct_* or lrm_preprocess_rgba call met in the image without stopping
 * (e.g. "background is not uniform: the whole image is used as foreground"), one per line; "" when there were
 * none (also when that call failed before preprocessing). Never NULL. Valid until this thread's next such call. */
LRM_API const char* lrm_last_warnings(void);

/* ---- context ---------------------------------------------------------------------------------- */
LRM_API lrm_params lrm_default_params(void);
/* Loads an export directory (manifest.json, decoder.safetensors, network.pt2). params may be NULL
 * (defaults). On success *out receives the context. The manifest's record of the network's input
 * shapes (aoti.inputs, written by every `lrm-rt export --aoti`) is required and checked against the
 * model config: the AOTInductor runtime does not check input shapes itself (unless the environment
 * sets AOTI_RUNTIME_CHECK_INPUTS=1). */
LRM_API lrm_status lrm_create(const char* export_dir, const lrm_params* params, lrm_context** out);
/* Each live context runs its own copy of network.pt2's compiled library. The process cannot unload
 * one (STB_GNU_UNIQUE symbols make glibc ignore dlclose), so lrm_free keeps it for the next context
 * created on the same package (same sha256, device): create/free cycles map no new copy, and the
 * memory held is that of the most contexts ever alive at once per package. Freed at process exit. */
LRM_API void lrm_free(lrm_context* ctx);
LRM_API lrm_status lrm_get_model_info(const lrm_context* ctx, lrm_model_info* out);

/* ---- reconstruction --------------------------------------------------------------------------- */
/* pixels: height rows of width RGBA8 pixels, row i at pixels + i * stride_bytes
 * (stride_bytes >= 4 * width). Images with an alpha channel below 255 somewhere use it as the
 * foreground mask; for fully opaque images a uniform background is removed (as the Python runtime
 * does without rembg), and an image without one is used whole. */
LRM_API lrm_status lrm_reconstruct_rgba(lrm_context* ctx, const uint8_t* pixels, int32_t width, int32_t height,
                                        int64_t stride_bytes, lrm_mesh** out);
/* Same from an image file: PNG (8/16-bit, any colour type, interlaced or not), JPEG (baseline or progressive;
 * grey, colour or CMYK; when the build found libjpeg: "jpeg" in lrm_build_features()), or binary PNM: PPM (P6),
 * PGM (P5), PAM (P7: GRAYSCALE, GRAYSCALE_ALPHA, RGB, RGB_ALPHA). Pixels and orientation (EXIF, else XMP) follow
 * what the Python package reads through Pillow (tested equal; see README "C / C++"). */
LRM_API lrm_status lrm_reconstruct_file(lrm_context* ctx, const char* image_path, lrm_mesh** out);
/* The encoder input the network sees: (1, 3, S, S) float32 NCHW, normalised; out_count must be
 * 3 * S * S (S = lrm_model_info.input_size). */
LRM_API lrm_status lrm_preprocess_rgba(lrm_context* ctx, const uint8_t* pixels, int32_t width, int32_t height,
                                       int64_t stride_bytes, float* out, int64_t out_count);

/* ---- images ----------------------------------------------------------------------------------- */
LRM_API lrm_status lrm_image_load(const char* path, lrm_image** out);
LRM_API int32_t lrm_image_width(const lrm_image* image);
LRM_API int32_t lrm_image_height(const lrm_image* image);
/* width * height RGBA8 pixels, rows contiguous (stride 4 * width). */
LRM_API const uint8_t* lrm_image_pixels(const lrm_image* image);
LRM_API void lrm_image_free(lrm_image* image);

/* ---- meshes ----------------------------------------------------------------------------------- */
LRM_API int64_t lrm_mesh_vertex_count(const lrm_mesh* mesh);
LRM_API int64_t lrm_mesh_face_count(const lrm_mesh* mesh);
LRM_API const float* lrm_mesh_vertices(const lrm_mesh* mesh); /* vertex_count * 3: x, y, z */
LRM_API const int32_t* lrm_mesh_faces(const lrm_mesh* mesh);  /* face_count * 3 vertex indices */
LRM_API const float* lrm_mesh_colors(const lrm_mesh* mesh);   /* vertex_count * 3, or NULL */
LRM_API lrm_status lrm_mesh_timings(const lrm_mesh* mesh, lrm_timings* out);
/* Writes atomically (temporary file + rename): a failure never leaves a partial file. An existing
 * path that is not a regular file (a device such as /dev/null, a FIFO, a socket, or a symbolic link
 * to one) is refused with LRM_ERR_IO. A symbolic link to a regular file is replaced by the new file;
 * the file it pointed to is left unchanged. */
/* format: an lrm_mesh_format (int32_t, so that any value a caller passes is well defined). */
LRM_API lrm_status lrm_mesh_write(const lrm_mesh* mesh, const char* path, int32_t format);
LRM_API void lrm_mesh_free(lrm_mesh* mesh);

#ifdef __cplusplus
}
#endif

#endif /* LRM_RT_H */
