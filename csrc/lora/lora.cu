// LoRA kernels: the skinny GEMM of skinny_gemm.h (shrink, expand-accumulate and the
// backward products; the frozen base GEMM stays in cuBLAS via ATen) and the dropout
// keep-mask. Grid: x = tiles over J (the rank or the output features), y = tiles over I,
// z = split-K slices.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../launchers.h"
#include "skinny_gemm.h"

namespace ptpeft {
namespace lora {

template <typename T, typename TC>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const __grid_constant__ GemmParams p) {
  __shared__ Smem s;
  const Block<T, TC> block(p, blockIdx.y, blockIdx.x, blockIdx.z);
  Regs regs;
  block.init(regs);
  for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += kTileK) {
    block.load(threadIdx.x, s, k0);
    __syncthreads();
    block.compute(threadIdx.x, s, regs);
    __syncthreads();  // the next load overwrites the tiles
  }
  block.store(threadIdx.x, regs);
}

__global__ void keep_mask_kernel(uint8_t* keep, int64_t total, int64_t cols, float p, uint64_t seed) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keep[idx] = keep_byte(seed, idx, cols, p);
  }
}

template <typename T, typename TC>
int launch(const GemmParams& p, int splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.J, kTileJ)), static_cast<unsigned>(ceil_div(p.I, kTileI)),
                  static_cast<unsigned>(splits));
  gemm_kernel<T, TC><<<grid, kThreads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lora

int lora_gemm(const LoraGemmArgs& a, cudaStream_t stream) {
  const lora::GemmParams p = lora::make_params(a);
  const int splits = a.splits < 1 ? 1 : a.splits;
  if (a.I == 0 || a.J == 0) return 0;
  const bool workspace = a.c_dtype == DType::kFloat32;
  switch (a.dtype) {
    case DType::kFloat32:
      return lora::launch<float, float>(p, splits, stream);
    case DType::kFloat16:
      return workspace ? lora::launch<__half, float>(p, splits, stream) : lora::launch<__half, __half>(p, splits, stream);
    case DType::kBFloat16:
      return workspace ? lora::launch<__nv_bfloat16, float>(p, splits, stream)
                       : lora::launch<__nv_bfloat16, __nv_bfloat16>(p, splits, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int lora_dropout_mask(uint8_t* keep, int64_t rows, int64_t cols, float p, uint64_t seed, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return 0;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(min64(ceil_div(total, threads), 65535));
  lora::keep_mask_kernel<<<blocks, threads, 0, stream>>>(keep, total, cols, p, seed);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ptpeft
