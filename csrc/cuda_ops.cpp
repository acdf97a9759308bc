// CUDA dispatch-key implementations of the sgattn ops (schemas: csrc/cpu_ops.cpp,
// names: the header generated from sgattn/_ops_names.py). Compiled by the host
// compiler; the kernels sit behind the framework-free API of
// kernels/sgattn_cuda_api.h, so no torch header goes through nvcc.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <Python.h>

#include "sgattn_cuda_api.h"
#include "sgattn_op_schemas.h"

namespace {

using sgattn::DType;

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", t.scalar_type(), "; use float32, float16 or bfloat16");
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

size_t max_smem_optin() {
  int dev = 0, bytes = 0;
  check_cuda(cudaGetDevice(&dev), "attention_fwd");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "attention_fwd");
  return static_cast<size_t>(bytes);
}

void strides_of(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, double scale,
                                                                  int64_t window, int64_t H, int64_t W,
                                                                  bool need_importance) {
  const char* op = "attention_fwd";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
                  v.sizes() == k.sizes(),
              op, " (cuda): k and v must be [B, h, M, d] matching q (value dim == head dim)");
  TORCH_CHECK(q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0, op, ": empty input");
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: global)");
  if (window > 0) {
    TORCH_CHECK(k.size(2) == q.size(2) && H > 0 && W > 0 && H * W == q.size(2), op,
                ": window mode needs M == N == H*W");
  }
  const DType dt = dtype_of(q, op);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), M = k.size(2), d = q.size(3);
  auto out = at::empty({B, h, N, d}, q.options());
  auto lse = at::empty({B, h, N}, q.options().dtype(at::kFloat));

  sgattn::AttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  strides_of(q, p.q_stride);
  strides_of(k, p.k_stride);
  strides_of(v, p.v_stride);
  p.B = B; p.h = h; p.N = N; p.M = M; p.d = d;
  p.scale = static_cast<float>(scale);
  p.window = window; p.H = H; p.W = W;
  const sgattn::AttnPlan plan = sgattn::plan_attention(dt, p, max_smem_optin());
  TORCH_CHECK(plan.error == nullptr, op, " (cuda): ", plan.error);

  at::Tensor partial, imp = at::empty({0}, q.options().dtype(at::kFloat));
  if (need_importance) {
    partial = at::empty({plan.partial_elems}, q.options().dtype(at::kFloat));
    imp = at::empty({B, plan.ncols}, q.options().dtype(at::kFloat));
  }
  check_cuda(sgattn::attention_forward(dt, p, plan, need_importance ? partial.data_ptr<float>() : nullptr,
                                       need_importance ? imp.data_ptr<float>() : nullptr,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return {out, lse, imp};
}

sgattn::ReallocArgs realloc_args(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights,
                                 c10::IntArrayRef group_sizes, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, C]");
  TORCH_CHECK(index.dim() == 3 && index.scalar_type() == at::kLong && index.size(1) == x.size(0) &&
                  index.size(2) == x.size(1),
              op, ": index must be [G, B, N] int64 matching x [B, N, C]");
  const int P = static_cast<int>(group_sizes.size());
  TORCH_CHECK(P == 2 || P == 3, op, ": 2 or 3 parts, got ", P);
  int64_t total = 0;
  for (auto r : group_sizes) {
    TORCH_CHECK(r >= 1, op, ": group sizes must be >= 1");
    total += r;
  }
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == total && weights.scalar_type() == x.scalar_type(), op,
              ": weights must hold sum(group_sizes) values in x's dtype");
  sgattn::ReallocArgs a{};
  a.plan = sgattn::ReallocPlan(x.size(1), P, group_sizes.data());
  a.G = index.size(0); a.B = x.size(0); a.N = x.size(1); a.C = x.size(2);
  return a;
}

at::Tensor aggregate_fwd_cuda(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& weights,
                              const at::Tensor& biases, c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_fwd";
  const DType dt = dtype_of(x_in, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  sgattn::ReallocArgs a = realloc_args(x_in, index_in, weights, group_sizes, op);
  TORCH_CHECK(biases.numel() == a.plan.P && biases.scalar_type() == x_in.scalar_type(), op,
              ": biases must hold one value per part in x's dtype");
  auto x = x_in.contiguous(), index = index_in.contiguous(), w = weights.contiguous(), b = biases.contiguous();
  auto out = at::empty({a.G, a.B, a.plan.M, a.C}, x.options());
  a.x = x.const_data_ptr(); a.index = index.const_data_ptr<int64_t>();
  a.weights = w.const_data_ptr(); a.biases = b.const_data_ptr(); a.out = out.data_ptr();
  check_cuda(sgattn::realloc_forward(dt, a, c10::cuda::getCurrentCUDAStream().stream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& index_in, const at::Tensor& weights,
                                                                  c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_bwd";
  const DType dt = dtype_of(x_in, op);
  c10::cuda::CUDAGuard guard(x_in.device());
  sgattn::ReallocArgs a = realloc_args(x_in, index_in, weights, group_sizes, op);
  auto x = x_in.contiguous(), index = index_in.contiguous(), w = weights.contiguous(), grad = grad_in.contiguous();
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == a.G && grad.size(1) == a.B && grad.size(2) == a.plan.M &&
                  grad.size(3) == a.C && grad.scalar_type() == x.scalar_type(),
              op, ": grad must be [G, B, M, C] in x's dtype");
  auto dx = at::empty_like(x), dw = at::empty_like(w), db = at::empty({a.plan.P}, x.options());
  auto inv = at::empty({a.G, a.B, a.N}, index.options());
  auto dots = at::empty({a.G, a.B, a.N}, x.options().dtype(at::kFloat));
  a.x = x.const_data_ptr(); a.index = index.const_data_ptr<int64_t>(); a.weights = w.const_data_ptr();
  check_cuda(sgattn::realloc_backward(dt, a, grad.const_data_ptr(), dx.data_ptr(), inv.data_ptr<int64_t>(),
                                      dots.data_ptr<float>(), dw.data_ptr(), db.data_ptr(), w.numel(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
             op);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgattn, CUDA, m) {
  m.impl(SGATTN_OP_ATTENTION_FWD, &attention_fwd_cuda);
  m.impl(SGATTN_OP_AGGREGATE_FWD, &aggregate_fwd_cuda);
  m.impl(SGATTN_OP_AGGREGATE_BWD, &aggregate_bwd_cuda);
}

static PyModuleDef sgattn_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                         "sgattn CUDA kernels for the torch.ops.sgattn.* ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&sgattn_cuda_module); }
