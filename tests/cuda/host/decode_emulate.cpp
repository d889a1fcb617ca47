// Host-side runs of csrc/: the decode attention block and merge phases executed for every
// thread between the kernel's barriers, on float32 data, plus the math helpers one by one.
// Built by tests/cuda/host_lib.py with g++ into a shared library that the tests load with
// ctypes; nothing here is part of the package.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "prefix_attention/decode_block.h"
#include "prefix_attention/decode_math.h"
#include "prefix_attention/decode_plan.h"

using namespace ptpeft;
using namespace ptpeft::decode;

namespace {

// Runs ``phase(tid)`` for every thread of the block, in forward or reverse order: a phase
// that reads what another thread of the same phase writes gives different results in the
// two orders, which is how the tests catch a missing barrier.
template <typename F>
void each_thread(bool reverse, F&& phase) {
  for (int i = 0; i < kThreads; ++i) phase(reverse ? kThreads - 1 - i : i);
}

template <int D>
void run_blocks(const Params& p, bool reverse) {
  auto smem = std::make_unique<Smem<float, D>>();
  Smem<float, D>& s = *smem;
  std::vector<Regs<D>> regs(kThreads);
  const int64_t bh_count = static_cast<int64_t>(p.B) * p.Hkv;
  for (int64_t bh = 0; bh < bh_count; ++bh) {
    for (int split = 0; split < p.plan.num_splits; ++split) {
      for (int chunk = 0; chunk < p.row_chunks; ++chunk) {
        // Stale shared memory from the previous block, as on the GPU: poison it.
        std::fill_n(reinterpret_cast<float*>(&s), sizeof(s) / sizeof(float), NAN);
        const Block<float, D> block(p, bh, split, chunk);
        each_thread(reverse, [&](int t) { block.init(t, s, regs[t]); });
        for (int64_t tile = block.key_start; tile < block.key_end; tile += kTileKeys) {
          each_thread(reverse, [&](int t) { block.load_tile(t, s, tile); });
          each_thread(reverse, [&](int t) { block.scores(t, s, tile); });
          each_thread(reverse, [&](int t) { block.stats_max(t, s); });
          each_thread(reverse, [&](int t) { block.stats_probs(t, s); });
          each_thread(reverse, [&](int t) { block.stats_update(t, s); });
          each_thread(reverse, [&](int t) { block.pv(t, s, regs[t]); });
        }
        each_thread(reverse, [&](int t) { block.finish(t, s, regs[t]); });
      }
    }
  }
  if (p.plan.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.N;
    for (int64_t row = 0; row < rows; ++row) {
      for (int i = 0; i < 128; ++i) merge_row<float>(p, D, row, reverse ? 127 - i : i, 128);
    }
  }
}

}  // namespace

extern "C" {

// strides: q(3) k(3) v(3) pk(3) pv(3) mask(4) out(3) lse(2), in elements.
// Returns the number of splits used, or -1 for an unsupported head dim.
int ptpeft_decode_emulate(const float* q, const float* k, const float* v, const float* pk, const float* pv,
                          const uint8_t* mask, float* out, float* lse, const int64_t* strides, int batch,
                          int q_heads, int kv_heads, int queries, int keys, int prefix, int head_dim, int causal,
                          float scale, int num_splits, int sm_count, int reverse) {
  DecodeArgs a{};
  a.dtype = DType::kFloat32;
  a.head_dim = head_dim;
  a.q = q, a.k = k, a.v = v, a.prefix_k = pk, a.prefix_v = pv, a.mask = mask, a.out = out, a.lse = lse;
  const int64_t* s = strides;
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = s[i];
    a.k_strides[i] = s[3 + i];
    a.v_strides[i] = s[6 + i];
    a.pk_strides[i] = s[9 + i];
    a.pv_strides[i] = s[12 + i];
    a.out_strides[i] = s[19 + i];
  }
  for (int i = 0; i < 4; ++i) a.mask_strides[i] = s[15 + i];
  a.lse_strides[0] = s[22], a.lse_strides[1] = s[23];
  a.batch = batch, a.q_heads = q_heads, a.kv_heads = kv_heads, a.queries = queries, a.keys = keys;
  a.prefix = prefix, a.causal = causal != 0, a.scale = scale, a.num_splits = num_splits;
  Params p = make_params(a, sm_count);
  std::vector<float> workspace;
  if (p.plan.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(batch) * q_heads * queries;
    workspace.assign(rows * p.plan.num_splits * (head_dim + 1), NAN);
    p.o_part = workspace.data();
    p.lse_part = p.o_part + rows * p.plan.num_splits * head_dim;
  }
  switch (head_dim) {
    case 64: run_blocks<64>(p, reverse != 0); break;
    case 80: run_blocks<80>(p, reverse != 0); break;
    case 96: run_blocks<96>(p, reverse != 0); break;
    case 128: run_blocks<128>(p, reverse != 0); break;
    default: return -1;
  }
  return p.plan.num_splits;
}

// ---------------------------------------------------------------- the math helpers alone

int64_t ptpeft_visible_seq_end(int64_t n, int64_t N, int64_t M, int causal) {
  return visible_seq_end(n, N, M, causal != 0);
}

void ptpeft_row_index(int64_t row, int64_t kv_head, int64_t groups, int64_t N, int64_t* head, int64_t* query) {
  const RowIndex ri = row_index(row, kv_head, groups, N);
  *head = ri.head;
  *query = ri.query;
}

int64_t ptpeft_kv_head_of(int64_t q_head, int64_t groups) { return kv_head_of(q_head, groups); }

// Writes the plan's (start, end) per split into ranges (2 * kMaxSplits); returns the count.
int ptpeft_plan_splits(int64_t blocks, int64_t keys, int sm_count, int tile, int requested, int64_t* ranges,
                       int64_t* keys_per_split) {
  const SplitPlan plan = plan_splits(blocks, keys, sm_count, tile, requested);
  for (int s = 0; s < plan.num_splits; ++s) split_range(plan, s, keys, &ranges[2 * s], &ranges[2 * s + 1]);
  *keys_per_split = plan.keys_per_split;
  return plan.num_splits;
}

int ptpeft_max_splits() { return kMaxSplits; }

// Online softmax over ``n`` log2-domain scores fed in tiles of ``tile``: returns log2-sum-exp2
// and writes the normalised weights' dot with ``values`` (one value per score) to *weighted.
float ptpeft_online_softmax(const float* scores, const float* values, int n, int tile, float* weighted) {
  float m = -INFINITY, l = 0.0f, acc = 0.0f;
  for (int t0 = 0; t0 < n; t0 += tile) {
    const int t1 = std::min(n, t0 + tile);
    float tile_max = -INFINITY;
    for (int j = t0; j < t1; ++j) tile_max = fmaxf(tile_max, scores[j]);
    const float m_new = fmaxf(m, tile_max);
    float sum = 0.0f, part = 0.0f;
    for (int j = t0; j < t1; ++j) {
      const float prob = online_prob(scores[j], m_new);
      sum += prob;
      part += prob * values[j];
    }
    const float alpha = online_update(&m, &l, tile_max, sum);
    acc = acc * alpha + part;
  }
  *weighted = l > 0.0f ? acc / l : 0.0f;
  return finish_lse2(m, l);
}

// Merge of ``splits`` partials (log2-LSE, one value each): returns natural LSE, writes the value.
float ptpeft_merge(const float* lse2, const float* values, int splits, float* merged) {
  const MergeWeights w = merge_weights(lse2, 1, splits);
  float value = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float weight = merge_weight(lse2[s], w);
    if (weight != 0.0f) value += weight * values[s];
  }
  *merged = value;
  return merged_lse(w);
}

int64_t ptpeft_offset3(int64_t i0, int64_t s0, int64_t i1, int64_t s1, int64_t i2, int64_t s2) {
  return offset3(i0, s0, i1, s1, i2, s2);
}

}  // extern "C"
