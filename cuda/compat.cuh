// One source, two targets: these .cu files are compiled by nvcc / NVRTC (CuPy) for the GPU and,
// through this header, as plain C++ with OpenMP for the CPU build (setup.py -> lrm_rt/_native).
//
// Kernels are written as "one logical thread per item" loops:
//
//   LRM_KERNEL void lrm_foo(int64_t n, const float* x, float* y) {
//       LRM_FOR_EACH(i, n) { y[i] = 2.f * x[i]; }
//   }
//
// On the GPU LRM_FOR_EACH is a grid-stride loop; on the CPU it is an OpenMP parallel loop over
// all items, so a kernel body must not depend on threadIdx / shared memory outside
// `#if LRM_ON_DEVICE` blocks. Host-side C entry points (the CPU C ABI used through ctypes and
// by the C library) are wrapped in `#if LRM_HOST_API` so NVRTC, which compiles device code only,
// never sees them.
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC has no standard headers; fixed-width types come from its built-ins.
typedef long long int64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#include <cmath>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define LRM_CUDA 1
#define LRM_HD __host__ __device__
#define LRM_DEVICE_FN __device__ __forceinline__
#define LRM_KERNEL extern "C" __global__
#define LRM_FOR_EACH(i, n)                                                         \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); \
         i += (int64_t)blockDim.x * gridDim.x)
#if defined(__CUDA_ARCH__)
#define LRM_ON_DEVICE 1
#else
#define LRM_ON_DEVICE 0
#endif
#else  // plain C++ (CPU build)
#define LRM_CUDA 0
#define LRM_ON_DEVICE 0
#define LRM_HD
#define LRM_DEVICE_FN static inline
#define LRM_KERNEL extern "C"
#define LRM_STRINGIFY_(x) #x
#define LRM_PRAGMA(x) _Pragma(LRM_STRINGIFY_(x))
#define LRM_FOR_EACH(i, n) \
    LRM_PRAGMA(omp parallel for schedule(dynamic, 64)) for (int64_t i = 0; i < (int64_t)(n); ++i)
#define __restrict__ __restrict
#endif

// -DLRM_HOST_API=0 gives NVRTC's view (device code only) under a full nvcc build too.
#if !defined(LRM_HOST_API)
#if !defined(__CUDACC_RTC__)
#define LRM_HOST_API 1
#else
#define LRM_HOST_API 0
#endif
#endif

// a*b + c as two rounded steps, as torch and numpy evaluate it, where nvcc (and GCC with -march) would
// contract to a fused multiply-add: results stay bit-equal to the Python references.
LRM_DEVICE_FN float lrm_mul_rn(float a, float b) {
#if LRM_ON_DEVICE
    return __fmul_rn(a, b);
#else
    volatile float p = a * b;  // the store rounds: no contraction with the following add
    return p;
#endif
}

LRM_DEVICE_FN float lrm_add_rn(float a, float b) {
#if LRM_ON_DEVICE
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// Math helpers with identical spelling on both targets (full-precision expf: parity needs it).
LRM_DEVICE_FN float lrm_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
LRM_DEVICE_FN float lrm_softplus(float x) {
    // torch.nn.functional.softplus: beta 1, threshold 20 (linear above it).
    return x > 20.f ? x : log1pf(expf(x));
}
LRM_DEVICE_FN float lrm_silu(float x) { return x / (1.f + expf(-x)); }
