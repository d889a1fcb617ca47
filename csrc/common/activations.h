// Adapter activations and their derivatives in float32, the formulas of
// ptpeft_kernels/ops/activations.py (the reference and the torch backend).
// Codes: 1 gelu (erf), 2 gelu_tanh, 3 relu, 4 silu; ops/cuda/adapter.py maps the names.
#pragma once

#include <cmath>

#include "hd.h"

namespace ptpeft {

enum Activation : int { kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4 };

PTPEFT_HD float tanh_stable(float x) {
  // exp(-2|x|) never overflows; same form as the Triton backend's tanh_f32.
  const float e = expf(-2.0f * fabsf(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

PTPEFT_HD float sigmoid_stable(float x) {
  // exp(-|x|) never overflows, and the small side keeps its relative precision.
  const float e = expf(-fabsf(x));
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

PTPEFT_HD float activate(float x, int act) {
  switch (act) {
    case kGelu:
      return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case kGeluTanh:
      return 0.5f * x * (1.0f + tanh_stable(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case kRelu:
      return x > 0.0f ? x : 0.0f;
    case kSilu:
      return x * sigmoid_stable(x);
    default:
      return x;
  }
}

PTPEFT_HD float activation_grad(float x, int act) {
  switch (act) {
    case kGelu:
      return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) + x * expf(-0.5f * x * x) * 0.3989422804014327f;
    case kGeluTanh: {
      const float t = tanh_stable(0.7978845608028654f * (x + 0.044715f * x * x * x));
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 0.134145f * x * x);
    }
    case kRelu:
      return x > 0.0f ? 1.0f : 0.0f;
    case kSilu: {
      const float s = sigmoid_stable(x);
      return s * (1.0f + x * (1.0f - s));
    }
    default:
      return 1.0f;
  }
}

}  // namespace ptpeft
