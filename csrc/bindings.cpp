// The torch side of the cuda backend: op schemas, argument checks, launches.
//
// Ops are registered with TORCH_LIBRARY(ptpeft_cuda, ...) rather than bound with pybind11:
// the schemas declare which arguments an op writes (Tensor(a!)), so the dispatcher,
// functionalization and torch.compile see in-place ops as such, and fake implementations
// can be registered from Python (ptpeft_kernels/ops/cuda/); calls go through
// torch.ops.ptpeft_cuda.* with no Python-object conversion layer, and this file needs no
// pybind11. The module init below only lets "import ptpeft_kernels._C" load the library,
// whose static initialisers register the ops.
//
// Every op runs on the current stream of its first tensor's device under a device guard.
// Kernels (csrc/<op>/*.cu) see raw pointers, sizes and strides only (launchers.h).
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "launchers.h"

namespace {

using ptpeft::DType;

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

DType dtype_of(const at::Tensor& t, const char* name, bool allow_float32) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      if (allow_float32) return DType::kFloat32;
      break;
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be ", allow_float32 ? "float16, bfloat16 or float32" : "float16 or bfloat16",
              ", got ", t.scalar_type());
}

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the first input is on ", like.device());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed to launch: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int sm_count(int device) {
  static std::mutex lock;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> guard(lock);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int count = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    TORCH_CHECK(err == cudaSuccess, "reading the SM count of device ", device, ": ", cudaGetErrorString(err));
    cache[device] = count;
  }
  return cache[device];
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// ------------------------------------------------------------------------- prefix attention

void fill_strides(int64_t* dst, const at::Tensor& t, int first, int count) {
  for (int i = 0; i < count; ++i) dst[i] = t.stride(first + i);
}

void decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& prefix_k, const std::optional<at::Tensor>& prefix_v,
                      const std::optional<at::Tensor>& mask, bool causal, double scale, int64_t num_splits,
                      const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, Hq, N, D), got ", shape_of(q));
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k and v must both be (B, Hkv, M, D), got ", shape_of(k),
              " and ", shape_of(v));
  const int64_t b = q.size(0), hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), m = k.size(2);
  const DType dtype = dtype_of(q, "q", /*allow_float32=*/false);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&out, "out"}}) {
    check_cuda_tensor(*t, name, q);
    check_same_dtype(*t, name, q);
  }
  check_cuda_tensor(q, "q", q);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d, "k must be (B=", b, ", Hkv, M, D=", d, "), got ", shape_of(k));
  TORCH_CHECK(d == 64 || d == 80 || d == 96 || d == 128, "head dim must be 64, 80, 96 or 128, got ", d);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "q heads must be a multiple of k/v heads, got Hq=", hq, ", Hkv=", hkv);
  TORCH_CHECK(n >= 1, "q must hold at least one query, got ", shape_of(q));
  TORCH_CHECK(!causal || m >= n, "causal=True needs M >= N, got N=", n, ", M=", m);
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(3) == 1, "out must be ", shape_of(q),
              " with a unit last stride, got ", shape_of(out));
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
                  lse.size(0) == b && lse.size(1) == hq && lse.size(2) == n && lse.stride(2) == 1,
              "lse must be float32 (B, Hq, N) = (", b, ", ", hq, ", ", n, ") on ", q.device(),
              " with a unit last stride, got ", lse.scalar_type(), " ", shape_of(lse));
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->stride(3) == 1, name, " must have a unit stride over the head dim, got strides ", t->strides());
  }
  TORCH_CHECK(b * hkv < (int64_t{1} << 31) && (hq / hkv) * n <= 16 * 65535 && b * hq * n < (int64_t{1} << 31),
              "decode attention grid too large for B=", b, ", Hq=", hq, ", N=", n);

  ptpeft::DecodeArgs a{};
  a.dtype = dtype;
  a.head_dim = static_cast<int>(d);
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  a.out = out.data_ptr(), a.lse = lse.data_ptr<float>();
  fill_strides(a.q_strides, q, 0, 3);
  fill_strides(a.k_strides, k, 0, 3);
  fill_strides(a.v_strides, v, 0, 3);
  fill_strides(a.out_strides, out, 0, 3);
  fill_strides(a.lse_strides, lse, 0, 2);
  int64_t p = 0;
  TORCH_CHECK(prefix_k.has_value() == prefix_v.has_value(), "prefix_k and prefix_v must be given together");
  if (prefix_k.has_value()) {
    const at::Tensor& pk = *prefix_k;
    const at::Tensor& pv = *prefix_v;
    for (const auto& [t, name] : {std::pair{&pk, "prefix_k"}, std::pair{&pv, "prefix_v"}}) {
      check_cuda_tensor(*t, name, q);
      check_same_dtype(*t, name, q);
      const bool shared = t->dim() == 3;
      TORCH_CHECK((shared && t->size(0) == hkv && t->size(2) == d) ||
                      (t->dim() == 4 && t->size(0) == b && t->size(1) == hkv && t->size(3) == d),
                  name, " must be (Hkv, P, D) or (B, Hkv, P, D) with B=", b, ", Hkv=", hkv, ", D=", d, ", got ",
                  shape_of(*t));
      TORCH_CHECK(t->stride(-1) == 1, name, " must have a unit stride over the head dim, got ", t->strides());
    }
    TORCH_CHECK(pk.sizes() == pv.sizes(), "prefix_k and prefix_v must have the same shape, got ", shape_of(pk),
                " and ", shape_of(pv));
    p = pk.size(-2);
    a.prefix_k = pk.data_ptr(), a.prefix_v = pv.data_ptr();
    if (pk.dim() == 3) {  // shared by the batch: batch stride 0, read in place
      a.pk_strides[0] = 0, a.pk_strides[1] = pk.stride(0), a.pk_strides[2] = pk.stride(1);
      a.pv_strides[0] = 0, a.pv_strides[1] = pv.stride(0), a.pv_strides[2] = pv.stride(1);
    } else {
      fill_strides(a.pk_strides, pk, 0, 3);
      fill_strides(a.pv_strides, pv, 0, 3);
    }
  }
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    check_cuda_tensor(mk, "mask", q);
    TORCH_CHECK(mk.scalar_type() == at::kBool, "mask must be bool (True = attend), got ", mk.scalar_type());
    if (mk.dim() == 2) {
      TORCH_CHECK(mk.size(0) == b && mk.size(1) == m, "a 2-D mask is key padding (B, M) = (", b, ", ", m,
                  "), got ", shape_of(mk));
      a.mask_strides[0] = mk.stride(0), a.mask_strides[1] = 0, a.mask_strides[2] = 0;
      a.mask_strides[3] = mk.stride(1);
    } else {
      TORCH_CHECK(mk.dim() == 4 && mk.size(0) == b && (mk.size(1) == 1 || mk.size(1) == hq) &&
                      (mk.size(2) == 1 || mk.size(2) == n) && mk.size(3) == m,
                  "a 4-D mask must be (B, 1 or Hq, 1 or N, M) with B=", b, ", Hq=", hq, ", N=", n, ", M=", m,
                  ", got ", shape_of(mk));
      for (int i = 0; i < 4; ++i) a.mask_strides[i] = mk.size(i) == 1 ? 0 : mk.stride(i);
    }
    a.mask = reinterpret_cast<const uint8_t*>(mk.data_ptr<bool>());
  }
  a.batch = static_cast<int>(b), a.q_heads = static_cast<int>(hq), a.kv_heads = static_cast<int>(hkv);
  a.queries = static_cast<int>(n), a.keys = static_cast<int>(m), a.prefix = static_cast<int>(p);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  TORCH_CHECK(num_splits >= 0 && num_splits <= 1024, "num_splits must be in [0, 1024] (0 = automatic), got ",
              num_splits);
  a.num_splits = static_cast<int>(num_splits);
  if (b == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const int sms = sm_count(q.get_device());
  const int64_t bytes = ptpeft::decode_workspace_bytes(a, sms);
  at::Tensor workspace;
  if (bytes > 0) workspace = at::empty({bytes / 4}, q.options().dtype(at::kFloat));
  check_launch(ptpeft::decode_attention(a, sms, bytes > 0 ? workspace.data_ptr() : nullptr, current_stream(q)),
               "decode_attention");
}

int64_t decode_num_splits(const at::Tensor& q, const at::Tensor& k, int64_t prefix, int64_t num_splits) {
  ptpeft::DecodeArgs a{};
  a.dtype = DType::kFloat16;
  a.head_dim = static_cast<int>(q.size(3));
  a.batch = static_cast<int>(q.size(0)), a.q_heads = static_cast<int>(q.size(1));
  a.kv_heads = static_cast<int>(k.size(1)), a.queries = static_cast<int>(q.size(2));
  a.keys = static_cast<int>(k.size(2)), a.prefix = static_cast<int>(prefix);
  a.num_splits = static_cast<int>(num_splits);
  return ptpeft::decode_num_splits(a, sm_count(q.get_device()));
}

// ------------------------------------------------------------------------- LoRA

void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t rows, int64_t cols) {
  check_cuda_tensor(t, name, like);
  check_same_dtype(t, name, like);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must be (", rows, ", ", cols,
              "), got ", shape_of(t));
}

void lora_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double alpha,
               const std::optional<at::Tensor>& bias, bool accumulate, double drop_p, int64_t seed, int64_t drop_on,
               bool drop_transposed, int64_t splits) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "a and b must be 2-D (I, K) and (J, K), got ", shape_of(a), " and ",
              shape_of(b));
  const int64_t i = a.size(0), k = a.size(1), j = b.size(0);
  check_cuda_tensor(a, "a", a);
  const DType dtype = dtype_of(a, "a", /*allow_float32=*/true);
  check_matrix(b, "b", a, j, k);
  check_matrix(c, "c", a, i, j);
  TORCH_CHECK(drop_on >= 0 && drop_on <= 3, "drop_on must be 0 (none), 1 (a), 2 (b) or 3 (c), got ", drop_on);
  TORCH_CHECK(drop_p >= 0.0 && drop_p < 1.0, "drop_p must be in [0, 1), got ", drop_p);
  TORCH_CHECK(seed >= 0, "seed must be non-negative, got ", seed);
  TORCH_CHECK(splits >= 1 && splits <= 1024, "splits must be in [1, 1024], got ", splits);
  TORCH_CHECK(splits == 1 || (!accumulate && !bias.has_value() && drop_on != 3),
              "split-K (splits=", splits, ") sums slices afterwards: no bias, accumulate or dropout on c");
  at::Tensor bias_c;
  if (bias.has_value()) {
    check_cuda_tensor(*bias, "bias", a);
    check_same_dtype(*bias, "bias", a);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == j, "bias must be (J,) = (", j, ",), got ", shape_of(*bias));
    bias_c = bias->contiguous();
  }
  if (i == 0 || j == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  ptpeft::LoraGemmArgs args{};
  args.dtype = dtype;
  args.c_dtype = dtype;
  args.a = a.data_ptr(), args.b = b.data_ptr(), args.c = c.data_ptr();
  args.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
  args.I = i, args.J = j, args.K = k;
  fill_strides(args.a_strides, a, 0, 2);
  fill_strides(args.b_strides, b, 0, 2);
  fill_strides(args.c_strides, c, 0, 2);
  args.splits = static_cast<int>(splits);
  args.alpha = static_cast<float>(alpha), args.accumulate = accumulate;
  args.drop_on = static_cast<int>(drop_on), args.drop_transposed = drop_transposed;
  args.drop_p = static_cast<float>(drop_p), args.seed = static_cast<uint64_t>(seed);
  at::Tensor workspace;
  if (splits > 1) {
    // float32 slices, summed (and cast) into c by ATen on the same stream.
    workspace = at::empty({splits, i, j}, a.options().dtype(at::kFloat));
    args.c = workspace.data_ptr(), args.c_dtype = DType::kFloat32;
    args.c_strides[0] = j, args.c_strides[1] = 1, args.c_split = i * j;
  }
  check_launch(ptpeft::lora_gemm(args, current_stream(a)), "lora_gemm");
  if (workspace.defined()) c.copy_(workspace.sum(0));
}

void lora_dropout_mask(const at::Tensor& keep, double p, int64_t seed) {
  TORCH_CHECK(keep.is_cuda() && keep.scalar_type() == at::kByte && keep.dim() == 2 && keep.is_contiguous(),
              "keep must be a contiguous uint8 CUDA matrix, got ", keep.scalar_type(), " ", shape_of(keep), " on ",
              keep.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0 && seed >= 0, "p must be in [0, 1) and seed >= 0, got ", p, " and ", seed);
  const c10::cuda::CUDAGuard guard(keep.device());
  check_launch(ptpeft::lora_dropout_mask(keep.data_ptr<uint8_t>(), keep.size(0), keep.size(1),
                                         static_cast<float>(p), static_cast<uint64_t>(seed), current_stream(keep)),
               "lora_dropout_mask");
}

// ------------------------------------------------------------------------- adapter

void check_elementwise(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cuda_tensor(t, name, like);
  check_same_dtype(t, name, like);
  TORCH_CHECK(t.sizes() == like.sizes() && t.is_contiguous(), name, " must be contiguous ", shape_of(like), ", got ",
              shape_of(t), t.is_contiguous() ? "" : " (non-contiguous)");
}

at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& like) {
  if (!bias.has_value()) return at::Tensor();
  check_cuda_tensor(*bias, "bias", like);
  check_same_dtype(*bias, "bias", like);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == like.size(1), "bias must be (", like.size(1), ",), got ",
              shape_of(*bias));
  return bias->contiguous();
}

void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 1 && activation <= 4,
              "activation must be 1 (gelu), 2 (gelu_tanh), 3 (relu) or 4 (silu), got ", activation);
}

void adapter_bias_act(const at::Tensor& h, const std::optional<at::Tensor>& bias, const at::Tensor& act,
                      int64_t activation) {
  TORCH_CHECK(h.dim() == 2, "h must be (rows, cols), got ", shape_of(h));
  check_elementwise(h, "h", h);
  check_elementwise(act, "act", h);
  check_activation(activation);
  const at::Tensor b = checked_bias(bias, h);
  const c10::cuda::CUDAGuard guard(h.device());
  check_launch(ptpeft::adapter_bias_act(dtype_of(h, "h", true), h.data_ptr(), b.defined() ? b.data_ptr() : nullptr,
                                        act.data_ptr(), h.size(0), h.size(1), static_cast<int>(activation),
                                        current_stream(h)),
               "adapter_bias_act");
}

void adapter_residual(const at::Tensor& u, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                      double scale) {
  TORCH_CHECK(u.dim() == 2, "u must be (rows, cols), got ", shape_of(u));
  check_elementwise(u, "u", u);
  check_elementwise(residual, "residual", u);
  const at::Tensor b = checked_bias(bias, u);
  const c10::cuda::CUDAGuard guard(u.device());
  check_launch(ptpeft::adapter_residual(dtype_of(u, "u", true), u.data_ptr(), b.defined() ? b.data_ptr() : nullptr,
                                        residual.data_ptr(), u.size(0), u.size(1), static_cast<float>(scale),
                                        current_stream(u)),
               "adapter_residual");
}

void adapter_act_grad(const at::Tensor& du, const at::Tensor& h, double scale, int64_t activation) {
  TORCH_CHECK(du.dim() == 2, "du must be (rows, cols), got ", shape_of(du));
  check_elementwise(du, "du", du);
  check_elementwise(h, "h", du);
  check_activation(activation);
  const c10::cuda::CUDAGuard guard(du.device());
  check_launch(ptpeft::adapter_act_grad(dtype_of(du, "du", true), du.data_ptr(), h.data_ptr(), du.size(0),
                                        du.size(1), static_cast<float>(scale), static_cast<int>(activation),
                                        current_stream(du)),
               "adapter_act_grad");
}

}  // namespace

TORCH_LIBRARY(ptpeft_cuda, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? mask, "
      "bool causal, float scale, int num_splits, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def("decode_num_splits(Tensor q, Tensor k, int prefix, int num_splits) -> int");
  m.def(
      "lora_gemm(Tensor a, Tensor b, Tensor(a!) c, float alpha, Tensor? bias, bool accumulate, float drop_p, "
      "int seed, int drop_on, bool drop_transposed, int splits) -> ()");
  m.def("lora_dropout_mask(Tensor(a!) keep, float p, int seed) -> ()");
  m.def("adapter_bias_act(Tensor(a!) h, Tensor? bias, Tensor(b!) act, int activation) -> ()");
  m.def("adapter_residual(Tensor(a!) u, Tensor? bias, Tensor residual, float scale) -> ()");
  m.def("adapter_act_grad(Tensor(a!) du, Tensor h, float scale, int activation) -> ()");
}

TORCH_LIBRARY_IMPL(ptpeft_cuda, CUDA, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_num_splits", &decode_num_splits);
  m.impl("lora_gemm", &lora_gemm);
  m.impl("lora_dropout_mask", &lora_dropout_mask);
  m.impl("adapter_bias_act", &adapter_bias_act);
  m.impl("adapter_residual", &adapter_residual);
  m.impl("adapter_act_grad", &adapter_act_grad);
}

// "import ptpeft_kernels._C" loads the library (and so registers the ops above).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "ptpeft_kernels CUDA ops: torch.ops.ptpeft_cuda.*", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
