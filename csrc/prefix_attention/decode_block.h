// One thread block of split-KV decode attention, written as phases between barriers.
//
// The kernel (decode.cu) runs the phases with __syncthreads() between them; the host-side
// tests run the same phases for every thread in turn between the same points (a faithful
// schedule of a barrier-separated program without warp-level primitives), on float data,
// and compare the result with the float64 reference. So the indexing, tiling, masking,
// split and merge logic that runs on the GPU is exercised here without one.
//
// Block (b, kv head, split, row chunk): rows r0 .. r0 + rows - 1 of the kv head's G * N
// query rows (row -> head, query: decode_math.h row_index), keys [key_start, key_end) of
// the concatenation [prefix (P), sequence (M)]. Per 64-key tile:
//   load      K and V rows into shared memory (prefix rows in place, batch stride 0 when
//             shared; 16-byte vectors when aligned), zeros past the range;
//   scores    s2[r][j] = q_r . k_j * scale * log2(e), -inf where invisible (bottom-right causal,
//             optional bool mask with any broadcast strides; prefix keys always visible);
//   stats1-3  per-row tile max -> new running max, probabilities, rescale factor, running sum;
//   pv        acc[r] = acc[r] * alpha[r] + sum_j p[r][j] v_j.
// finish: one split writes the normalised output and natural-log LSE directly; several
// write float32 partials and their log2-LSE for the merge kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/dtypes.h"
#include "../common/hd.h"
#include "decode_math.h"

namespace ptpeft {
namespace decode {

constexpr int kThreads = 128;
constexpr int kTileKeys = 64;
constexpr int kRowsPerBlock = 16;
constexpr int kStatsThreadsPerRow = kThreads / kRowsPerBlock;            // 8
constexpr int kStatsKeysPerThread = kTileKeys / kStatsThreadsPerRow;     // 8
static_assert(kStatsThreadsPerRow * kRowsPerBlock == kThreads, "stats phases use every thread");
static_assert(kThreads % kTileKeys == 0, "scores phase: whole key columns per thread");

// Raw pointers, sizes and element strides (the last dimension of q, k, v, prefixes and the
// output is contiguous; the launcher checks). Prefix strides of batch 0 mean "shared".
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* pk;  // nullptr when P == 0
  const void* pv;
  const uint8_t* mask;  // bool (True = attend), nullptr when absent
  void* out;            // (B, Hq, N, D) in the input dtype
  float* lse;           // (B, Hq, N) natural log
  float* o_part;        // (B, Hq, N, splits, D) float32, only when splits > 1
  float* lse_part;      // (B, Hq, N, splits) log2 domain
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t pk_sb, pk_sh, pk_sn;
  int64_t pv_sb, pv_sh, pv_sn;
  int64_t m_sb, m_sh, m_sn, m_sm;  // mask strides over (B, Hq, N, M); 0 on broadcast dims
  int64_t o_sb, o_sh, o_sn;
  int64_t lse_sb, lse_sh;          // lse is (B, Hq, N) with unit stride over N
  int B, Hq, Hkv, N, M, P, groups;
  bool causal;
  bool vec_ok;          // every K/V/prefix row starts 16-byte aligned
  float scale_log2;     // scale * log2(e)
  SplitPlan plan;
  int row_chunks;       // ceil(G * N / kRowsPerBlock)
};

template <typename T, int D>
struct Smem {
  // K rows padded by one 4-byte word: the scores phase reads word d/2 of 64 different rows
  // per warp, and an odd row stride in words (D/2 + 1) puts them in 32 distinct banks.
  T ks[kTileKeys][D + 2];
  T vs[kTileKeys][D];
  float qs[kRowsPerBlock][D];  // pre-multiplied by scale * log2(e)
  float ps[kRowsPerBlock][kTileKeys + 1];
  float red_max[kRowsPerBlock][kStatsThreadsPerRow];
  float red_sum[kRowsPerBlock][kStatsThreadsPerRow];
  float m[kRowsPerBlock];
  float l[kRowsPerBlock];
  float alpha[kRowsPerBlock];
};

// PV / finish thread map: thread -> column pair dp of D/2 and row group rg of kPvGroups;
// rows rg, rg + kPvGroups, ... Threads past kPvGroups * D/2 sit out (D = 80: 8 of 128, D = 96: 32).
template <int D>
struct PvMap {
  static constexpr int kPairs = D / 2;
  static constexpr int kGroups = kThreads / kPairs;
  static constexpr int kMaxRows = (kRowsPerBlock + kGroups - 1) / kGroups;
  static_assert(D % 8 == 0 && kGroups >= 1, "head dim must be a multiple of 8, at most 256");
};

template <int D>
struct Regs {
  float acc[PvMap<D>::kMaxRows][2];
};

template <typename T, int D>
struct Block {
  const Params& p;
  int64_t b, kv_head, split, r0;
  int rows;                  // rows of this block, <= kRowsPerBlock
  int64_t key_start, key_end;

  PTPEFT_DEVICE Block(const Params& params, int64_t bh, int64_t split_index, int64_t row_chunk)
      : p(params), b(bh / params.Hkv), kv_head(bh % params.Hkv), split(split_index) {
    const int64_t total_rows = static_cast<int64_t>(p.groups) * p.N;
    r0 = row_chunk * kRowsPerBlock;
    rows = static_cast<int>(min64(kRowsPerBlock, total_rows - r0));
    const int64_t keys = static_cast<int64_t>(p.P) + p.M;
    split_range(p.plan, static_cast<int>(split), keys, &key_start, &key_end);
    // Keys past the last visible one of the block's last query are never loaded.
    int64_t last_query = 0;
    for (int r = 0; r < rows; ++r) last_query = max64(last_query, row_index(r0 + r, kv_head, p.groups, p.N).query);
    key_end = min64(key_end, p.P + visible_seq_end(last_query, p.N, p.M, p.causal));
    if (key_end < key_start) key_end = key_start;
  }

  PTPEFT_DEVICE const T* key_row(int64_t key, bool value) const {
    if (key < p.P) {
      const T* base = static_cast<const T*>(value ? p.pv : p.pk);
      return base + (value ? offset3(b, p.pv_sb, kv_head, p.pv_sh, key, p.pv_sn)
                           : offset3(b, p.pk_sb, kv_head, p.pk_sh, key, p.pk_sn));
    }
    const int64_t j = key - p.P;
    const T* base = static_cast<const T*>(value ? p.v : p.k);
    return base + (value ? offset3(b, p.v_sb, kv_head, p.v_sh, j, p.v_sn)
                         : offset3(b, p.k_sb, kv_head, p.k_sh, j, p.k_sn));
  }

  PTPEFT_DEVICE void init(int tid, Smem<T, D>& s, Regs<D>& regs) const {
    const T* q = static_cast<const T*>(p.q);
    for (int idx = tid; idx < kRowsPerBlock * D; idx += kThreads) {
      const int r = idx / D, d = idx % D;
      float value = 0.0f;
      if (r < rows) {
        const RowIndex ri = row_index(r0 + r, kv_head, p.groups, p.N);
        value = to_float(q[offset3(b, p.q_sb, ri.head, p.q_sh, ri.query, p.q_sn) + d]) * p.scale_log2;
      }
      s.qs[r][d] = value;
    }
    if (tid < kRowsPerBlock) {
      s.m[tid] = -INFINITY;
      s.l[tid] = 0.0f;
    }
    PTPEFT_UNROLL
    for (int i = 0; i < PvMap<D>::kMaxRows; ++i) regs.acc[i][0] = regs.acc[i][1] = 0.0f;
  }

  PTPEFT_DEVICE void load_tile(int tid, Smem<T, D>& s, int64_t tile_start) const {
    constexpr int kChunk = ChunkOf<T>::value;
    constexpr int kChunksPerRow = D / kChunk;
    for (int idx = tid; idx < kTileKeys * kChunksPerRow; idx += kThreads) {
      const int j = idx / kChunksPerRow, c = (idx % kChunksPerRow) * kChunk;
      const int64_t key = tile_start + j;
      if (key < key_end) {
        copy_chunk<T, kChunk>(&s.ks[j][c], key_row(key, false) + c, p.vec_ok);
        copy_chunk<T, kChunk>(&s.vs[j][c], key_row(key, true) + c, p.vec_ok);
      } else {
        // Zeros, not stale data: p = 0 there, and 0 * (stale NaN or Inf) would still be NaN.
        for (int e = 0; e < kChunk; ++e) {
          s.ks[j][c + e] = from_float<T>(0.0f);
          s.vs[j][c + e] = from_float<T>(0.0f);
        }
      }
    }
  }

  PTPEFT_DEVICE bool visible(int r, int64_t key) const {
    if (key >= key_end) return false;
    if (key < p.P) return true;  // every query sees every prefix key
    const int64_t j = key - p.P;
    const RowIndex ri = row_index(r0 + r, kv_head, p.groups, p.N);
    if (j >= visible_seq_end(ri.query, p.N, p.M, p.causal)) return false;
    if (p.mask != nullptr) {
      const int64_t off = b * p.m_sb + ri.head * p.m_sh + ri.query * p.m_sn + j * p.m_sm;
      return p.mask[off] != 0;
    }
    return true;
  }

  // Rows hr, hr + 2, ... of key column j; R is a compile-time bound on their count so the
  // dot products stay in registers (the caller picks the smallest R that covers them).
  template <int R>
  PTPEFT_DEVICE void scores_rows(Smem<T, D>& s, int j, int hr, int64_t tile_start) const {
    constexpr int kStride = kThreads / kTileKeys;
    float dot[R];
    PTPEFT_UNROLL
    for (int i = 0; i < R; ++i) dot[i] = 0.0f;
    for (int d = 0; d < D; d += 2) {
      const Float2 kv = load2(&s.ks[j][d]);
      PTPEFT_UNROLL
      for (int i = 0; i < R; ++i) {
        const int r = hr + i * kStride;
        if (r < rows) dot[i] += s.qs[r][d] * kv.x + s.qs[r][d + 1] * kv.y;
      }
    }
    PTPEFT_UNROLL
    for (int i = 0; i < R; ++i) {
      const int r = hr + i * kStride;
      if (r < rows) s.ps[r][j] = visible(r, tile_start + j) ? dot[i] : -INFINITY;
    }
  }

  PTPEFT_DEVICE void scores(int tid, Smem<T, D>& s, int64_t tile_start) const {
    constexpr int kStride = kThreads / kTileKeys;
    const int j = tid % kTileKeys, hr = tid / kTileKeys;
    const int mine = (rows - hr + kStride - 1) / kStride;
    if (mine <= 1) {
      scores_rows<1>(s, j, hr, tile_start);
    } else if (mine <= 2) {
      scores_rows<2>(s, j, hr, tile_start);
    } else if (mine <= 4) {
      scores_rows<4>(s, j, hr, tile_start);
    } else {
      scores_rows<kRowsPerBlock / kStride>(s, j, hr, tile_start);
    }
  }

  // Each row's keys are covered by kStatsThreadsPerRow threads of kStatsKeysPerThread keys.
  PTPEFT_DEVICE void stats_max(int tid, Smem<T, D>& s) const {
    const int r = tid / kStatsThreadsPerRow, sub = tid % kStatsThreadsPerRow;
    if (r >= rows) return;
    float mx = -INFINITY;
    for (int e = 0; e < kStatsKeysPerThread; ++e) mx = fmaxf(mx, s.ps[r][sub * kStatsKeysPerThread + e]);
    s.red_max[r][sub] = mx;
  }

  PTPEFT_DEVICE float tile_max(const Smem<T, D>& s, int r) const {
    float mx = -INFINITY;
    for (int e = 0; e < kStatsThreadsPerRow; ++e) mx = fmaxf(mx, s.red_max[r][e]);
    return mx;
  }

  PTPEFT_DEVICE void stats_probs(int tid, Smem<T, D>& s) const {
    const int r = tid / kStatsThreadsPerRow, sub = tid % kStatsThreadsPerRow;
    if (r >= rows) return;
    const float m_new = fmaxf(s.m[r], tile_max(s, r));
    float sum = 0.0f;
    for (int e = 0; e < kStatsKeysPerThread; ++e) {
      const int j = sub * kStatsKeysPerThread + e;
      const float prob = online_prob(s.ps[r][j], m_new);
      s.ps[r][j] = prob;
      sum += prob;
    }
    s.red_sum[r][sub] = sum;
  }

  PTPEFT_DEVICE void stats_update(int tid, Smem<T, D>& s) const {
    if (tid >= rows) return;
    float sum = 0.0f;
    for (int e = 0; e < kStatsThreadsPerRow; ++e) sum += s.red_sum[tid][e];
    s.alpha[tid] = online_update(&s.m[tid], &s.l[tid], tile_max(s, tid), sum);
  }

  template <int R>
  PTPEFT_DEVICE void pv_rows(const Smem<T, D>& s, Regs<D>& regs, int dp, int rg) const {
    using Map = PvMap<D>;
    PTPEFT_UNROLL
    for (int i = 0; i < R; ++i) {
      const int r = rg + i * Map::kGroups;
      if (r < rows) {
        regs.acc[i][0] *= s.alpha[r];
        regs.acc[i][1] *= s.alpha[r];
      }
    }
    for (int j = 0; j < kTileKeys; ++j) {
      const Float2 v = load2(&s.vs[j][2 * dp]);
      PTPEFT_UNROLL
      for (int i = 0; i < R; ++i) {
        const int r = rg + i * Map::kGroups;
        if (r < rows) {
          const float prob = s.ps[r][j];
          regs.acc[i][0] += prob * v.x;
          regs.acc[i][1] += prob * v.y;
        }
      }
    }
  }

  PTPEFT_DEVICE void pv(int tid, const Smem<T, D>& s, Regs<D>& regs) const {
    using Map = PvMap<D>;
    const int dp = tid % Map::kPairs, rg = tid / Map::kPairs;
    if (rg >= Map::kGroups) return;
    const int mine = (rows - rg + Map::kGroups - 1) / Map::kGroups;
    static_assert(Map::kMaxRows >= 4, "the tiers below assume at least 4 rows per thread");
    if (mine <= 1) {
      pv_rows<1>(s, regs, dp, rg);
    } else if (mine <= 2) {
      pv_rows<2>(s, regs, dp, rg);
    } else if (mine <= 4) {
      pv_rows<4>(s, regs, dp, rg);
    } else {
      pv_rows<Map::kMaxRows>(s, regs, dp, rg);
    }
  }

  PTPEFT_DEVICE void finish(int tid, const Smem<T, D>& s, const Regs<D>& regs) const {
    using Map = PvMap<D>;
    const int dp = tid % Map::kPairs, rg = tid / Map::kPairs;
    if (rg >= Map::kGroups) return;
    const int splits = p.plan.num_splits;
    PTPEFT_UNROLL
    for (int i = 0; i < Map::kMaxRows; ++i) {
      const int r = rg + i * Map::kGroups;
      if (r >= rows) continue;
      const float l = s.l[r];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const RowIndex ri = row_index(r0 + r, kv_head, p.groups, p.N);
      const float lse2 = finish_lse2(s.m[r], l);
      if (splits == 1) {
        T* out = static_cast<T*>(p.out) + offset3(b, p.o_sb, ri.head, p.o_sh, ri.query, p.o_sn);
        out[2 * dp] = from_float<T>(regs.acc[i][0] * inv);
        out[2 * dp + 1] = from_float<T>(regs.acc[i][1] * inv);
        if (dp == 0) p.lse[b * p.lse_sb + ri.head * p.lse_sh + ri.query] = lse2 == -INFINITY ? -INFINITY : lse2 * kLn2;
      } else {
        const int64_t row = (b * p.Hq + ri.head) * p.N + ri.query;
        float* part = p.o_part + (row * splits + split) * D;
        part[2 * dp] = regs.acc[i][0] * inv;
        part[2 * dp + 1] = regs.acc[i][1] * inv;
        if (dp == 0) p.lse_part[row * splits + split] = lse2;
      }
    }
  }
};

// The merge of one output row (b, head, query) over its splits; thread d < D owns column d.
template <typename T>
PTPEFT_DEVICE void merge_row(const Params& p, int D, int64_t row, int tid, int threads) {
  const int splits = p.plan.num_splits;
  const float* lse2 = p.lse_part + row * splits;
  const MergeWeights w = merge_weights(lse2, 1, splits);
  const int64_t query = row % p.N, head = (row / p.N) % p.Hq, b = row / (static_cast<int64_t>(p.N) * p.Hq);
  T* out = static_cast<T*>(p.out) + offset3(b, p.o_sb, head, p.o_sh, query, p.o_sn);
  for (int d = tid; d < D; d += threads) {
    float value = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float weight = merge_weight(lse2[s], w);
      if (weight != 0.0f) value += weight * p.o_part[(row * splits + s) * D + d];
    }
    out[d] = from_float<T>(value);
  }
  if (tid == 0) p.lse[b * p.lse_sb + head * p.lse_sh + query] = merged_lse(w);
}

}  // namespace decode
}  // namespace ptpeft
