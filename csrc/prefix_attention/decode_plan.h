// From the launcher's arguments to the kernels' parameters and split plan; plain C++, so
// the host-side tests build the very Params the GPU would get.
#pragma once

#include <cstdint>

#include "../launchers.h"
#include "decode_block.h"

namespace ptpeft {
namespace decode {

inline Params make_params(const DecodeArgs& a, int sm_count) {
  Params p{};
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.pk = a.prefix > 0 ? a.prefix_k : nullptr;
  p.pv = a.prefix > 0 ? a.prefix_v : nullptr;
  p.mask = a.mask;
  p.out = a.out;
  p.lse = a.lse;
  p.q_sb = a.q_strides[0], p.q_sh = a.q_strides[1], p.q_sn = a.q_strides[2];
  p.k_sb = a.k_strides[0], p.k_sh = a.k_strides[1], p.k_sn = a.k_strides[2];
  p.v_sb = a.v_strides[0], p.v_sh = a.v_strides[1], p.v_sn = a.v_strides[2];
  p.pk_sb = a.pk_strides[0], p.pk_sh = a.pk_strides[1], p.pk_sn = a.pk_strides[2];
  p.pv_sb = a.pv_strides[0], p.pv_sh = a.pv_strides[1], p.pv_sn = a.pv_strides[2];
  p.m_sb = a.mask_strides[0], p.m_sh = a.mask_strides[1], p.m_sn = a.mask_strides[2], p.m_sm = a.mask_strides[3];
  p.o_sb = a.out_strides[0], p.o_sh = a.out_strides[1], p.o_sn = a.out_strides[2];
  p.lse_sb = a.lse_strides[0], p.lse_sh = a.lse_strides[1];
  p.B = a.batch, p.Hq = a.q_heads, p.Hkv = a.kv_heads, p.N = a.queries, p.M = a.keys, p.P = a.prefix;
  p.groups = a.q_heads / a.kv_heads;
  p.causal = a.causal;
  p.scale_log2 = a.scale * kLog2e;
  p.row_chunks = static_cast<int>(ceil_div(static_cast<int64_t>(p.groups) * p.N, kRowsPerBlock));
  const int64_t blocks = static_cast<int64_t>(p.B) * p.Hkv * p.row_chunks;
  p.plan = plan_splits(blocks, static_cast<int64_t>(p.P) + p.M, sm_count, kTileKeys, a.num_splits);
  // 16-byte vector loads need every row start aligned: base pointers and row strides.
  const int elem = a.dtype == DType::kFloat32 ? 4 : 2;
  auto aligned = [elem](const void* ptr, const int64_t* strides) {
    if (ptr == nullptr) return true;
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
    for (int i = 0; i < 3; ++i)
      if ((strides[i] * elem) % 16 != 0) return false;
    return true;
  };
  p.vec_ok = aligned(p.k, a.k_strides) && aligned(p.v, a.v_strides) && aligned(p.pk, a.pk_strides) &&
             aligned(p.pv, a.pv_strides);
  return p;
}

inline int num_splits(const DecodeArgs& args, int sm_count) { return make_params(args, sm_count).plan.num_splits; }

// Float32 workspace: (rows, splits, D) partial outputs then (rows, splits) log2-LSEs.
inline int64_t workspace_bytes(const DecodeArgs& args, int sm_count) {
  const int splits = num_splits(args, sm_count);
  if (splits == 1) return 0;
  const int64_t rows = static_cast<int64_t>(args.batch) * args.q_heads * args.queries;
  return rows * splits * (static_cast<int64_t>(args.head_dim) + 1) * static_cast<int64_t>(sizeof(float));
}

}  // namespace decode
}  // namespace ptpeft
