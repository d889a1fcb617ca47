// Host-side runs of the LoRA skinny GEMM (csrc/lora/skinny_gemm.h) block by block and
// thread by thread between its barriers, the dropout keep-mask, and the adapter epilogues
// (csrc/adapter/epilogue.h), all on float32 data. Loaded by tests/cuda through ctypes.
#include <cmath>
#include <cstdint>
#include <vector>

#include "adapter/epilogue.h"
#include "common/activations.h"
#include "common/philox.h"
#include "lora/skinny_gemm.h"

using namespace ptpeft;

extern "C" {

// strides: a(2) b(2) c(2) in elements. Splits > 1 write ``splits`` slices c_split apart.
void ptpeft_lora_gemm_emulate(const float* a, const float* b, float* c, const float* bias, int64_t I, int64_t J,
                              int64_t K, const int64_t* strides, int splits, int64_t c_split, float alpha,
                              int accumulate, int drop_on, int drop_transposed, float drop_p, uint64_t seed,
                              int reverse) {
  LoraGemmArgs args{};
  args.dtype = DType::kFloat32, args.c_dtype = DType::kFloat32;
  args.a = a, args.b = b, args.c = c, args.bias = bias, args.I = I, args.J = J, args.K = K;
  for (int i = 0; i < 2; ++i) {
    args.a_strides[i] = strides[i];
    args.b_strides[i] = strides[2 + i];
    args.c_strides[i] = strides[4 + i];
  }
  args.splits = splits, args.c_split = c_split, args.alpha = alpha, args.accumulate = accumulate != 0;
  args.drop_on = drop_on, args.drop_transposed = drop_transposed != 0, args.drop_p = drop_p, args.seed = seed;
  const lora::GemmParams p = lora::make_params(args);
  lora::Smem s;
  std::vector<lora::Regs> regs(lora::kThreads);
  const int64_t tiles_i = ceil_div(I, lora::kTileI), tiles_j = ceil_div(J, lora::kTileJ);
  auto each = [&](auto&& phase) {
    for (int t = 0; t < lora::kThreads; ++t) phase(reverse ? lora::kThreads - 1 - t : t);
  };
  for (int64_t ti = 0; ti < tiles_i; ++ti) {
    for (int64_t tj = 0; tj < tiles_j; ++tj) {
      for (int z = 0; z < (splits < 1 ? 1 : splits); ++z) {
        const lora::Block<float, float> block(p, ti, tj, z);
        each([&](int t) { block.init(regs[t]); });
        for (int64_t k0 = block.k_begin; k0 < block.k_end; k0 += lora::kTileK) {
          each([&](int t) { block.load(t, s, k0); });
          each([&](int t) { block.compute(t, s, regs[t]); });
        }
        each([&](int t) { block.store(t, regs[t]); });
      }
    }
  }
}

void ptpeft_dropout_keep_mask(uint8_t* keep, int64_t rows, int64_t cols, float p, uint64_t seed) {
  for (int64_t idx = 0; idx < rows * cols; ++idx) keep[idx] = lora::keep_byte(seed, idx, cols, p);
}

uint32_t ptpeft_philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  return philox_first_word(seed, c0, c1, c2, c3);
}

float ptpeft_activate(float x, int act) { return activate(x, act); }
float ptpeft_activation_grad(float x, int act) { return activation_grad(x, act); }

// kind 0: bias_act(h, bias, act); 1: residual(u=h, bias, residual=other); 2: act_grad(du=h, h=other).
void ptpeft_adapter_epilogue(int kind, float* h, const float* bias, float* other, int64_t rows, int64_t cols,
                             float scale, int activation) {
  for (int64_t idx = 0; idx < rows * cols; ++idx) {
    if (kind == 0) adapter::bias_act_at(h, bias, other, idx, cols, activation);
    if (kind == 1) adapter::residual_at(h, bias, static_cast<const float*>(other), idx, cols, scale);
    if (kind == 2) adapter::act_grad_at(h, static_cast<const float*>(other), idx, cols, scale, activation);
  }
}

}  // extern "C"
