// Host launchers of every kernel under csrc/, callable without any torch header: raw
// pointers, sizes, element strides and the CUDA stream. bindings.cpp validates tensors,
// turns them into these arguments and registers the ops with the dispatcher.
// Each returns the launch's cudaError_t as an int (0 = cudaSuccess); none synchronises.
// Neither torch nor the CUDA headers are needed to include this file: the host-side tests
// compile the argument structs and plans with a plain C++ compiler.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;  // the CUDA runtime's own declaration

namespace ptpeft {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------- prefix attention (decode)

struct DecodeArgs {
  DType dtype;
  int head_dim;  // 64, 80, 96 or 128
  const void* q;
  const void* k;
  const void* v;
  const void* prefix_k;  // nullptr when there is no prefix (or P == 0)
  const void* prefix_v;
  const uint8_t* mask;   // bool, nullptr when absent
  void* out;
  float* lse;
  int64_t q_strides[3];   // (B, Hq, N) in elements; D contiguous
  int64_t k_strides[3];   // (B, Hkv, M)
  int64_t v_strides[3];
  int64_t pk_strides[3];  // (B, Hkv, P); batch stride 0 for a prefix shared by the batch
  int64_t pv_strides[3];
  int64_t mask_strides[4];  // (B, Hq, N, M); 0 on broadcast dims
  int64_t out_strides[3];
  int64_t lse_strides[2];   // (B, Hq); unit stride over N
  int batch, q_heads, kv_heads, queries, keys, prefix;
  bool causal;
  float scale;
  int num_splits;  // 0: chosen from the SM count
};

// Bytes of float32 workspace the call needs (0 when it runs as one split).
int64_t decode_workspace_bytes(const DecodeArgs& args, int sm_count);
// Runs the split kernel and, with several splits, the merge kernel. ``workspace`` holds
// decode_workspace_bytes(args, sm_count) bytes.
int decode_attention(const DecodeArgs& args, int sm_count, void* workspace, cudaStream_t stream);
// The number of splits a call would use (for tests and benchmarks).
int decode_num_splits(const DecodeArgs& args, int sm_count);

}  // namespace ptpeft
