// Split-KV ("flash-decoding") attention over [prefix, KV cache] for N <= 16 queries.
//
// Grid: x = batch * kv head, y = key split, z = chunk of the kv head's G * N query rows.
// Each block reads its keys' K/V once for every query head of its group (GQA by index,
// no repeat) and keeps float32 softmax state; decode_block.h holds the block's phases.
// With more than one split a second kernel merges the partial outputs by their LSE.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../launchers.h"
#include "decode_block.h"
#include "decode_plan.h"

namespace ptpeft {
namespace decode {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) split_kernel(const __grid_constant__ Params p) {
  __shared__ Smem<T, D> s;
  const Block<T, D> block(p, blockIdx.x, blockIdx.y, blockIdx.z);
  Regs<D> regs;
  const int tid = threadIdx.x;
  block.init(tid, s, regs);
  __syncthreads();
  for (int64_t tile = block.key_start; tile < block.key_end; tile += kTileKeys) {
    block.load_tile(tid, s, tile);
    __syncthreads();
    block.scores(tid, s, tile);
    __syncthreads();
    block.stats_max(tid, s);
    __syncthreads();
    block.stats_probs(tid, s);
    __syncthreads();
    block.stats_update(tid, s);
    __syncthreads();
    block.pv(tid, s, regs);
    __syncthreads();  // the next tile overwrites ks, vs, ps and alpha
  }
  block.finish(tid, s, regs);
}

constexpr int kMergeThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const __grid_constant__ Params p, int D) {
  merge_row<T>(p, D, blockIdx.x, threadIdx.x, kMergeThreads);
}

template <typename T, int D>
cudaError_t launch_typed(Params p, void* workspace, cudaStream_t stream) {
  const int splits = p.plan.num_splits;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.N;
  if (splits > 1) {
    p.o_part = static_cast<float*>(workspace);
    p.lse_part = p.o_part + rows * splits * D;
  }
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.B) * p.Hkv), static_cast<unsigned>(splits),
                  static_cast<unsigned>(p.row_chunks));
  split_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  merge_kernel<T><<<static_cast<unsigned>(rows), kMergeThreads, 0, stream>>>(p, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const Params& p, int head_dim, void* workspace, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return launch_typed<T, 64>(p, workspace, stream);
    case 80:
      return launch_typed<T, 80>(p, workspace, stream);
    case 96:
      return launch_typed<T, 96>(p, workspace, stream);
    case 128:
      return launch_typed<T, 128>(p, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace decode

int decode_num_splits(const DecodeArgs& args, int sm_count) { return decode::num_splits(args, sm_count); }

int64_t decode_workspace_bytes(const DecodeArgs& args, int sm_count) {
  return decode::workspace_bytes(args, sm_count);
}

int decode_attention(const DecodeArgs& args, int sm_count, void* workspace, cudaStream_t stream) {
  const decode::Params p = decode::make_params(args, sm_count);
  switch (args.dtype) {
    case DType::kFloat16:
      return decode::launch_dim<__half>(p, args.head_dim, workspace, stream);
    case DType::kBFloat16:
      return decode::launch_dim<__nv_bfloat16>(p, args.head_dim, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ptpeft
