// One element of each adapter epilogue (epilogue.cu runs them over the buffer; the host
// tests run them on float data against the float64 reference).
#pragma once

#include <cstdint>

#include "../common/activations.h"
#include "../common/dtypes.h"
#include "../common/hd.h"

namespace ptpeft {
namespace adapter {

template <typename T>
PTPEFT_DEVICE void bias_act_at(T* h, const T* bias, T* act, int64_t idx, int64_t cols, int activation) {
  float value = to_float(h[idx]);
  if (bias != nullptr) {
    value += to_float(bias[idx % cols]);
    h[idx] = from_float<T>(value);
    value = to_float(h[idx]);  // act of the stored (rounded) h: what the backward recomputes from
  }
  act[idx] = from_float<T>(activate(value, activation));
}

template <typename T>
PTPEFT_DEVICE void residual_at(T* u, const T* bias, const T* residual, int64_t idx, int64_t cols, float scale) {
  float value = to_float(u[idx]);
  if (bias != nullptr) value += to_float(bias[idx % cols]);
  u[idx] = from_float<T>(to_float(residual[idx]) + scale * value);
}

template <typename T>
PTPEFT_DEVICE void act_grad_at(T* du, const T* h, int64_t idx, int64_t, float scale, int activation) {
  du[idx] = from_float<T>(to_float(du[idx]) * scale * activation_grad(to_float(h[idx]), activation));
}

}  // namespace adapter
}  // namespace ptpeft
