// The LoRA dropout stream, bit for bit the one the Triton backend draws.
//
// Element (row, col) of the LoRA input x viewed as (tokens, in_features) is kept iff
// uniform(Philox4x32-10(counter = (col, row, 0, 0), key = (seed_lo, seed_hi)).x) >= p,
// with Triton's uint_to_uniform_float: the word read as int32, negatives bit-flipped,
// times 4.6566127342e-10 in float32 (ptpeft_kernels/ops/triton_impl/_common.py
// dropout_keep; triton/language/random.py). Sharing the stream means the cuda and triton
// backends drop the same elements for the same seed, so the registry's dropout_mask of
// either backend is a reference for the other, and the forward, the backward and the
// mask helper all regenerate it from the seed instead of storing it.
#pragma once

#include <cstdint>

#include "hd.h"

namespace ptpeft {

PTPEFT_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds; returns the first output word (the only one the mask uses).
PTPEFT_HD uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>((seed >> 32) & 0xffffffffu);
  const uint32_t round_a = 0xD2511F53u, round_b = 0xCD9E8D57u;
  const uint32_t key_a = 0x9E3779B9u, key_b = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = umulhi32(round_b, old2) ^ c1 ^ k0;
    c2 = umulhi32(round_a, old0) ^ c3 ^ k1;
    c1 = round_b * old2;
    c3 = round_a * old0;
    k0 += key_a;
    k1 += key_b;
  }
  return c0;
}

// Triton's uint_to_uniform_float for a 32-bit word: in [0, 1), float32 arithmetic.
PTPEFT_HD float uniform_from_word(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Whether dropout with probability p keeps element (row, col) of x (tokens, features).
// Row and column enter as 32-bit counters, as in the Triton kernels (int32 offsets).
PTPEFT_HD bool dropout_keep(uint64_t seed, int64_t row, int64_t col, float p) {
  const uint32_t word = philox_first_word(seed, static_cast<uint32_t>(col), static_cast<uint32_t>(row), 0u, 0u);
  return uniform_from_word(word) >= p;
}

}  // namespace ptpeft
