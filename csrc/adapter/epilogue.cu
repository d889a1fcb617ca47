// Adapter epilogues around the cuBLAS GEMMs (the GEMMs stay in ATen):
//   after the down-projection   h += bias (kept: the backward recomputes act from it), a = act(h)
//   after the up-projection     y = residual + scale * (u + bias), in place on u
//   backward                    dh = du * scale * act'(h), the activation recomputed from h
// Elementwise over contiguous (rows, cols) buffers, float32 arithmetic, one rounding per store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../launchers.h"
#include "epilogue.h"

namespace ptpeft {
namespace adapter {

template <typename T>
__global__ void bias_act_kernel(T* h, const T* bias, T* act, int64_t total, int64_t cols, int activation) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bias_act_at(h, bias, act, idx, cols, activation);
  }
}

template <typename T>
__global__ void residual_kernel(T* u, const T* bias, const T* residual, int64_t total, int64_t cols, float scale) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    residual_at(u, bias, residual, idx, cols, scale);
  }
}

template <typename T>
__global__ void act_grad_kernel(T* du, const T* h, int64_t total, int64_t cols, float scale, int activation) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    act_grad_at(du, h, idx, cols, scale, activation);
  }
}

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t total) { return static_cast<unsigned>(min64(ceil_div(total, kThreads), 65535 * 8)); }

template <template <typename> class Launch, typename... Args>
int by_dtype(DType dtype, int64_t total, Args... args) {
  if (total == 0) return 0;
  switch (dtype) {
    case DType::kFloat32:
      Launch<float>::run(total, args...);
      break;
    case DType::kFloat16:
      Launch<__half>::run(total, args...);
      break;
    case DType::kBFloat16:
      Launch<__nv_bfloat16>::run(total, args...);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
struct BiasAct {
  static void run(int64_t total, void* h, const void* bias, void* act, int64_t cols, int activation, cudaStream_t s) {
    bias_act_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(static_cast<T*>(h), static_cast<const T*>(bias),
                                                              static_cast<T*>(act), total, cols, activation);
  }
};

template <typename T>
struct Residual {
  static void run(int64_t total, void* u, const void* bias, const void* residual, int64_t cols, float scale,
                  cudaStream_t s) {
    residual_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(
        static_cast<T*>(u), static_cast<const T*>(bias), static_cast<const T*>(residual), total, cols, scale);
  }
};

template <typename T>
struct ActGrad {
  static void run(int64_t total, void* du, const void* h, int64_t cols, float scale, int activation, cudaStream_t s) {
    act_grad_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(static_cast<T*>(du), static_cast<const T*>(h), total,
                                                              cols, scale, activation);
  }
};

}  // namespace adapter

int adapter_bias_act(DType dtype, void* h, const void* bias, void* act, int64_t rows, int64_t cols, int activation,
                     cudaStream_t stream) {
  return adapter::by_dtype<adapter::BiasAct>(dtype, rows * cols, h, bias, act, cols, activation, stream);
}

int adapter_residual(DType dtype, void* u, const void* bias, const void* residual, int64_t rows, int64_t cols,
                     float scale, cudaStream_t stream) {
  return adapter::by_dtype<adapter::Residual>(dtype, rows * cols, u, bias, residual, cols, scale, stream);
}

int adapter_act_grad(DType dtype, void* du, const void* h, int64_t rows, int64_t cols, float scale, int activation,
                     cudaStream_t stream) {
  return adapter::by_dtype<adapter::ActGrad>(dtype, rows * cols, du, h, cols, scale, activation, stream);
}

}  // namespace ptpeft
