// The LoRA kernels' one GEMM: C[i][j] = alpha * sum_k A[i][k] B[j][k] (+ bias[j]) (+ C[i][j]),
// with any element strides, float32 accumulation on CUDA cores, and the dropout keep-mask
// (common/philox.h) regenerated in place on A, B or C. Every LoRA product is one instance,
// oriented so that j runs over the rank r (<= 128) or the output features:
//   shrink   h  = drop(x) A^T / (1-p)        i = token,   j = rank,  k = in feature
//   expand   y  = s h B^T + bias              i = token,   j = out,   k = rank
//   dh       dh = s dy B                      i = token,   j = rank,  k = out feature
//   dx       dx = drop(dh A) / (1-p)          i = token,   j = in,    k = rank
//   dA^T     dA^T = x^T drop-weighted dh      i = in,      j = rank,  k = token (split-K)
//   dB       dB = s dy^T h                    i = out,     j = rank,  k = token (split-K)
// With split-K, block z sums keys [z * k_per_split, ...) into its own float32 slice of a
// workspace (C + z * c_split); the launcher's caller reduces the slices.
//
// Phases between barriers (the host tests run them thread by thread, like decode_block.h):
// load a BI x BK tile of A and a BJ x BK tile of B into shared memory (transposed so each
// thread's 4 x 4 micro-tile reads contiguous values), then accumulate the micro-tile.
#pragma once

#include <cstdint>

#include "../common/dtypes.h"
#include "../common/hd.h"
#include "../common/philox.h"
#include "../launchers.h"

namespace ptpeft {
namespace lora {

constexpr int kThreads = 128;
constexpr int kTileI = 64;
constexpr int kTileJ = 32;
constexpr int kTileK = 16;
constexpr int kMicro = 4;
constexpr int kThreadsJ = kTileJ / kMicro;  // 8
static_assert((kTileI / kMicro) * kThreadsJ == kThreads, "one 4 x 4 micro-tile per thread");

enum DropOn : int { kDropNone = 0, kDropA = 1, kDropB = 2, kDropC = 3 };

struct GemmParams {
  const void* a;
  const void* b;
  void* c;
  const void* bias;  // (J,) in the input dtype, or nullptr
  int64_t I, J, K;
  int64_t a_si, a_sk, b_sj, b_sk, c_si, c_sj;
  int64_t k_per_split;  // K when not split
  int64_t c_split;      // element stride between split-K slices of C
  float alpha;
  bool accumulate;      // C += ... instead of C = ...
  int drop_on;
  // The dropped tensor is x (tokens, features): its element (row, col) is (i, k) of A, (j, k)
  // of B or (i, j) of C, or the transpose of that pair when drop_transposed.
  bool drop_transposed;
  float drop_p;
  uint64_t seed;
};

struct Smem {
  float as[kTileK][kTileI + 4];  // A tile, k-major: a thread's 4 rows are adjacent
  float bs[kTileK][kTileJ + 4];
};

struct Regs {
  float acc[kMicro][kMicro];
};

PTPEFT_HD bool keep_at(const GemmParams& p, int64_t first, int64_t second) {
  return p.drop_transposed ? dropout_keep(p.seed, second, first, p.drop_p)
                           : dropout_keep(p.seed, first, second, p.drop_p);
}

template <typename T, typename TC>
struct Block {
  const GemmParams& p;
  int64_t i0, j0, k_begin, k_end, split;

  PTPEFT_DEVICE Block(const GemmParams& params, int64_t tile_i, int64_t tile_j, int64_t split_index)
      : p(params), i0(tile_i * kTileI), j0(tile_j * kTileJ), split(split_index) {
    k_begin = min64(split_index * p.k_per_split, p.K);
    k_end = min64(k_begin + p.k_per_split, p.K);
  }

  PTPEFT_DEVICE void init(Regs& regs) const {
    PTPEFT_UNROLL
    for (int u = 0; u < kMicro; ++u) {
      PTPEFT_UNROLL
      for (int w = 0; w < kMicro; ++w) regs.acc[u][w] = 0.0f;
    }
  }

  // Consecutive threads walk the operand's unit-stride dimension, so the loads coalesce.
  PTPEFT_DEVICE void load(int tid, Smem& s, int64_t k0) const {
    const T* a = static_cast<const T*>(p.a);
    const T* b = static_cast<const T*>(p.b);
    const bool a_k_fast = p.a_sk == 1;
    for (int idx = tid; idx < kTileI * kTileK; idx += kThreads) {
      const int ii = a_k_fast ? idx / kTileK : idx % kTileI;
      const int kk = a_k_fast ? idx % kTileK : idx / kTileI;
      const int64_t i = i0 + ii, k = k0 + kk;
      float value = 0.0f;
      if (i < p.I && k < k_end) {
        value = to_float(a[i * p.a_si + k * p.a_sk]);
        if (p.drop_on == kDropA && !keep_at(p, i, k)) value = 0.0f;
      }
      s.as[kk][ii] = value;
    }
    const bool b_k_fast = p.b_sk == 1;
    for (int idx = tid; idx < kTileJ * kTileK; idx += kThreads) {
      const int jj = b_k_fast ? idx / kTileK : idx % kTileJ;
      const int kk = b_k_fast ? idx % kTileK : idx / kTileJ;
      const int64_t j = j0 + jj, k = k0 + kk;
      float value = 0.0f;
      if (j < p.J && k < k_end) {
        value = to_float(b[j * p.b_sj + k * p.b_sk]);
        if (p.drop_on == kDropB && !keep_at(p, j, k)) value = 0.0f;
      }
      s.bs[kk][jj] = value;
    }
  }

  PTPEFT_DEVICE void compute(int tid, const Smem& s, Regs& regs) const {
    const int ti = (tid / kThreadsJ) * kMicro, tj = (tid % kThreadsJ) * kMicro;
    PTPEFT_UNROLL
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[kMicro], bv[kMicro];
      PTPEFT_UNROLL
      for (int u = 0; u < kMicro; ++u) av[u] = s.as[kk][ti + u];
      PTPEFT_UNROLL
      for (int w = 0; w < kMicro; ++w) bv[w] = s.bs[kk][tj + w];
      PTPEFT_UNROLL
      for (int u = 0; u < kMicro; ++u) {
        PTPEFT_UNROLL
        for (int w = 0; w < kMicro; ++w) regs.acc[u][w] += av[u] * bv[w];
      }
    }
  }

  PTPEFT_DEVICE void store(int tid, const Regs& regs) const {
    const int ti = (tid / kThreadsJ) * kMicro, tj = (tid % kThreadsJ) * kMicro;
    TC* c = static_cast<TC*>(p.c) + split * p.c_split;
    const T* bias = static_cast<const T*>(p.bias);
    PTPEFT_UNROLL
    for (int u = 0; u < kMicro; ++u) {
      const int64_t i = i0 + ti + u;
      PTPEFT_UNROLL
      for (int w = 0; w < kMicro; ++w) {
        const int64_t j = j0 + tj + w;
        if (i >= p.I || j >= p.J) continue;
        float value = p.alpha * regs.acc[u][w];
        if (p.drop_on == kDropC && !keep_at(p, i, j)) value = 0.0f;
        if (bias != nullptr) value += to_float(bias[j]);
        TC& dst = c[i * p.c_si + j * p.c_sj];
        if (p.accumulate) value += to_float(dst);
        dst = from_float<TC>(value);
      }
    }
  }
};

// The dropout keep-mask of x viewed as (rows, cols), one byte per element (the registry's
// dropout_mask of the cuda backend; the tests compare it with the Triton backend's).
PTPEFT_HD uint8_t keep_byte(uint64_t seed, int64_t index, int64_t cols, float p) {
  return dropout_keep(seed, index / cols, index % cols, p) ? 1 : 0;
}

// The kernel's parameters from the launcher's arguments (plain C++: the host tests use it too).
inline GemmParams make_params(const LoraGemmArgs& a) {
  GemmParams p{};
  p.a = a.a, p.b = a.b, p.c = a.c, p.bias = a.bias;
  p.I = a.I, p.J = a.J, p.K = a.K;
  p.a_si = a.a_strides[0], p.a_sk = a.a_strides[1];
  p.b_sj = a.b_strides[0], p.b_sk = a.b_strides[1];
  p.c_si = a.c_strides[0], p.c_sj = a.c_strides[1];
  const int splits = a.splits < 1 ? 1 : a.splits;
  // Whole key tiles per split, so every split but the last starts and ends on a tile.
  p.k_per_split = ceil_div(ceil_div(max64(a.K, 1), splits), kTileK) * kTileK;
  p.c_split = a.c_split;
  p.alpha = a.alpha, p.accumulate = a.accumulate;
  p.drop_on = a.drop_on, p.drop_transposed = a.drop_transposed, p.drop_p = a.drop_p, p.seed = a.seed;
  return p;
}

}  // namespace lora
}  // namespace ptpeft
