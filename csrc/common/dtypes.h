// Element loads and stores for the kernels' storage types, as float32.
//
// float works on the host and the device (the host-side tests run the kernels' block code
// on float tensors); __half and __nv_bfloat16 exist only for nvcc.
#pragma once

#include <cstring>

#include "hd.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace ptpeft {

struct Float2 {
  float x, y;
};

PTPEFT_HD float to_float(float v) { return v; }
PTPEFT_HD Float2 load2(const float* p) { return {p[0], p[1]}; }
template <typename T>
PTPEFT_HD T from_float(float v);
template <>
PTPEFT_HD float from_float<float>(float v) {
  return v;
}

#if defined(__CUDACC__)
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
// Two adjacent elements at an even index (4-byte aligned in every buffer that uses it).
__device__ __forceinline__ Float2 load2(const __half* p) {
  const float2 v = __half22float2(*reinterpret_cast<const __half2*>(p));
  return {v.x, v.y};
}
__device__ __forceinline__ Float2 load2(const __nv_bfloat16* p) {
  const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  return {v.x, v.y};
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// Copies N consecutive elements (16 bytes on the device) from global memory. ``aligned``
// says the source address is 16-byte aligned; the launchers check base pointers and
// strides once per call and fall back to element loads otherwise.
template <typename T, int N>
PTPEFT_DEVICE void copy_chunk(T* dst, const T* src, bool aligned) {
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(T) * N == 16, "a chunk is one 16-byte vector");
  if (aligned) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    T elems[N];
    memcpy(elems, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = elems[i];
    return;
  }
#else
  (void)aligned;
#endif
  for (int i = 0; i < N; ++i) dst[i] = src[i];
}

template <typename T>
struct ChunkOf {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

}  // namespace ptpeft
