// Portability macros for code shared by the device kernels and the host-side tests.
//
// Headers that hold the arithmetic (index maps, softmax updates, split boundaries,
// activations, the dropout stream) are written once as __host__ __device__ functions:
// nvcc compiles them into the kernels, and g++ compiles the very same text into the
// host test library (tests/cuda/host/) that checks them against a float64 reference.
// No torch header is included anywhere under csrc/ except bindings.cpp.
#pragma once

#include <cstdint>

// Loops over register arrays must be unrolled on the device, or the arrays go to local memory.
#if defined(__CUDA_ARCH__)
#define PTPEFT_UNROLL _Pragma("unroll")
#else
#define PTPEFT_UNROLL
#endif

#if defined(__CUDACC__)
#define PTPEFT_HD __host__ __device__ __forceinline__
#define PTPEFT_DEVICE __device__ __forceinline__
#else
#define PTPEFT_HD inline
#define PTPEFT_DEVICE inline
#endif

namespace ptpeft {

// Element offsets are computed in 64 bits: a decode KV cache of B=16, Hkv=8, M=32768,
// D=128 already holds 2^29 elements per tensor, and strides times indices of int32
// operands overflow long before the tensors stop fitting in memory.
PTPEFT_HD int64_t offset3(int64_t i0, int64_t s0, int64_t i1, int64_t s1, int64_t i2, int64_t s2) {
  return i0 * s0 + i1 * s1 + i2 * s2;
}

PTPEFT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

PTPEFT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
PTPEFT_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace ptpeft
