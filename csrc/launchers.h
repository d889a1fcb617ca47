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

// ---------------------------------------------------------------- LoRA (lora/skinny_gemm.h)

// C (I x J) = alpha * A (I x K) B (J x K)^T (+ bias[j]) (+ C); element strides; dropout on
// A, B or C as documented in skinny_gemm.h. ``c_dtype`` is the input dtype, or float32 for a
// split-K workspace of ``splits`` slices c_split elements apart.
struct LoraGemmArgs {
  DType dtype;
  DType c_dtype;
  const void* a;
  const void* b;
  void* c;
  const void* bias;
  int64_t I, J, K;
  int64_t a_strides[2], b_strides[2], c_strides[2];
  int64_t c_split;
  int splits;
  float alpha;
  bool accumulate;
  int drop_on;  // 0 none, 1 A, 2 B, 3 C
  bool drop_transposed;
  float drop_p;
  uint64_t seed;
};

int lora_gemm(const LoraGemmArgs& args, cudaStream_t stream);

// keep (rows x cols, uint8) = the dropout keep-mask of x viewed as (rows, cols).
int lora_dropout_mask(uint8_t* keep, int64_t rows, int64_t cols, float p, uint64_t seed, cudaStream_t stream);

// ---------------------------------------------------------------- adapter epilogues (adapter/)

// h (rows x cols, contiguous) += bias (if any), written back; act = activation(h).
int adapter_bias_act(DType dtype, void* h, const void* bias, void* act, int64_t rows, int64_t cols, int activation,
                     cudaStream_t stream);
// u = residual + scale * (u + bias): the up-projection's epilogue, in place on u (rows x cols).
int adapter_residual(DType dtype, void* u, const void* bias, const void* residual, int64_t rows, int64_t cols,
                     float scale, cudaStream_t stream);
// du = du * scale * activation'(h), in place (rows x cols): the gradient through the activation.
int adapter_act_grad(DType dtype, void* du, const void* h, int64_t rows, int64_t cols, float scale, int activation,
                     cudaStream_t stream);

}  // namespace ptpeft
