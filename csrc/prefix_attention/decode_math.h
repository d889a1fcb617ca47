// The arithmetic of split-KV decode attention that can be wrong without a GPU:
// which keys a query sees, how query rows map to heads, how the key range is split over
// thread blocks, the online-softmax update and the log-sum-exp merge of the partials.
// Host-side tests (tests/cuda/test_host_math.py) check each against a float64 reference.
//
// Scores live in the log2 domain (s2 = q.k * scale * log2(e)) so the kernels use exp2.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/hd.h"

namespace ptpeft {
namespace decode {

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------- masking and head maps

// Sequence keys [0, end) are visible to query n of N under bottom-right causal masking
// (query n sees key j iff j <= n + M - N); every key without it. Never negative.
PTPEFT_HD int64_t visible_seq_end(int64_t n, int64_t N, int64_t M, bool causal) {
  if (!causal) return M;
  const int64_t end = n + M - N + 1;
  return end < 0 ? 0 : (end > M ? M : end);
}

// A block owns one KV head and a chunk of its G * N query rows: row r is query n = r % N
// of the group's g = r / N th query head, which is head hkv * G + g of Hq (the inverse of
// the reference's kv head = hq // G). K/V are read once for all rows of the group.
struct RowIndex {
  int64_t head;  // query head in [0, Hq)
  int64_t query; // query position in [0, N)
};

PTPEFT_HD RowIndex row_index(int64_t row, int64_t kv_head, int64_t groups, int64_t N) {
  return {kv_head * groups + row / N, row % N};
}

PTPEFT_HD int64_t kv_head_of(int64_t q_head, int64_t groups) { return q_head / groups; }

// ---------------------------------------------------------------- split-KV plan

// Keys [0, keys) of one (batch, kv head, row chunk) are split into ``num_splits`` ranges of
// ``keys_per_split`` keys (a multiple of the key tile); the last may be shorter, none is empty.
struct SplitPlan {
  int num_splits;
  int64_t keys_per_split;
};

constexpr int kMaxSplits = 128;
// Splits are wanted only while blocks < this many per SM: the kernel keeps no
// asynchronous pipeline, so several resident blocks per SM hide the loads' latency.
constexpr int kTargetBlocksPerSm = 4;
// Each split sweeps at least this many key tiles, so the merge pass stays small next to it.
constexpr int kMinTilesPerSplit = 2;

// ``requested`` > 0 forces that many splits (tests and benchmarks), clamped to what the
// key range allows; 0 chooses from the SM count.
PTPEFT_HD SplitPlan plan_splits(int64_t blocks, int64_t keys, int sm_count, int tile, int requested) {
  const int64_t tiles = ceil_div(max64(keys, 1), tile);
  int64_t splits;
  if (requested > 0) {
    splits = requested;
  } else {
    const int64_t want = ceil_div(static_cast<int64_t>(kTargetBlocksPerSm) * max64(sm_count, 1), max64(blocks, 1));
    splits = min64(want, ceil_div(tiles, kMinTilesPerSplit));
  }
  splits = max64(1, min64(min64(splits, tiles), kMaxSplits));
  const int64_t tiles_per_split = ceil_div(tiles, splits);
  // Recount so that no split starts past the end (e.g. 5 tiles over 4 splits -> 2,2,1: 3 splits).
  splits = ceil_div(tiles, tiles_per_split);
  return {static_cast<int>(splits), tiles_per_split * tile};
}

PTPEFT_HD void split_range(const SplitPlan& plan, int split, int64_t keys, int64_t* start, int64_t* end) {
  *start = min64(static_cast<int64_t>(split) * plan.keys_per_split, keys);
  *end = min64(*start + plan.keys_per_split, keys);
}

// ---------------------------------------------------------------- online softmax

// A row's running state over the keys seen so far: m = max score (log2 domain, -inf while
// nothing was visible), l = sum of exp2(s - m), and the output accumulator scaled by 1/exp2(m).
// A tile with max t and the row's new max m' = max(m, t): every probability is
// exp2(s - safe(m')), the old sum and accumulator are multiplied by exp2(m - safe(m')).
// safe() maps -inf to 0, so a row that has seen nothing yet gets exp2(-inf) = 0 everywhere
// instead of exp2(-inf - -inf) = NaN.
PTPEFT_HD float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

PTPEFT_HD float online_rescale(float m_old, float m_new) { return exp2f(m_old - safe_max(m_new)); }

PTPEFT_HD float online_prob(float score, float m_new) { return exp2f(score - safe_max(m_new)); }

// The running state after one tile: returns the rescale factor of the old sum/accumulator.
PTPEFT_HD float online_update(float* m, float* l, float tile_max, float tile_sum_at_new_max) {
  const float m_new = fmaxf(*m, tile_max);
  const float alpha = online_rescale(*m, m_new);
  *l = *l * alpha + tile_sum_at_new_max;
  *m = m_new;
  return alpha;
}

// log2-sum-exp2 of a finished row; -inf when it saw nothing (l == 0).
PTPEFT_HD float finish_lse2(float m, float l) { return l > 0.0f ? m + log2f(l) : -INFINITY; }

// ---------------------------------------------------------------- merge of split partials

// Split s produced a normalised output o_s and its log2-sum-exp2 lse_s (-inf if it saw no
// key). The whole row's lse = log2(sum_s exp2(lse_s)) and o = sum_s exp2(lse_s - lse) o_s.
struct MergeWeights {
  float max_lse;  // -inf when no split saw anything: the output is 0 and lse -inf
  float sum;      // sum_s exp2(lse_s - max_lse)
};

PTPEFT_HD MergeWeights merge_weights(const float* lse2, int64_t stride, int splits) {
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse2[s * stride]);
  float sum = 0.0f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) sum += exp2f(lse2[s * stride] - mx);
  }
  return {mx, sum};
}

PTPEFT_HD float merge_weight(float lse2_split, const MergeWeights& w) {
  return w.max_lse == -INFINITY ? 0.0f : exp2f(lse2_split - w.max_lse) / w.sum;
}

// The natural-log LSE the op returns (the layout of the torch and Triton backends).
PTPEFT_HD float merged_lse(const MergeWeights& w) {
  return w.max_lse == -INFINITY ? -INFINITY : (w.max_lse + log2f(w.sum)) * kLn2;
}

}  // namespace decode
}  // namespace ptpeft
