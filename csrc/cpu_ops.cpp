// The CPU (OpenMP) implementations of sgattn's native ops for the CPU
// dispatch key (the schemas are defined once, from Python: sgattn/_schemas.py).
// Thin bindings: check the device and the argument contract
// (csrc/op_contract.h), unpack the tensors, call the framework-free kernels of
// kernels/cpu/, return contiguous outputs. Light headers only (no
// torch/extension.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <Python.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/aggregation.h"
#include "cpu/attention_driver.h"
#include "op_contract.h"
#include "sgattn_op_names.h"

namespace {

namespace cpu = sgattn::cpu;
using sgattn::ReallocPlan;

// Calls f(T{}) with T the C++ type of a floating dtype (the contract has
// checked it: float64 only where allow_double).
template <typename F>
void dispatch_floating(at::ScalarType st, bool allow_double, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kDouble:
      TORCH_CHECK(allow_double, op, ": float64 is not supported by the cpu backend");
      f(double{});
      break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
}

// Runs a kernel; sizes it does not support (cpu::TooLarge) become a ValueError "op: why".
template <typename F>
void run(const char* op, F&& kernel) {
  try {
    kernel();
  } catch (const cpu::TooLarge& e) {
    TORCH_CHECK_VALUE(false, op, ": ", e.what());
  }
}

// The device check of this binding (the rest of the contract is shared with cuda).
void check_cpu(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts) {
    TORCH_CHECK_VALUE(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name,
                      " must be a CPU tensor (this is the cpu kernel), got a tensor on ", t->device());
  }
}

template <typename T>
cpu::View4<T> view4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

cpu::AttnCall attn_call(const sgattn::contract::AttnShape& s, double scale, int64_t window, int64_t H, int64_t W) {
  return {s.B, s.h, s.N, s.M, s.d, s.dv, static_cast<float>(scale), window, H, W};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale,
                                                             int64_t window, int64_t H, int64_t W,
                                                             bool need_importance) {
  const char* op = "attention_fwd";
  check_cpu(op, {{"q", &q}, {"k", &k}, {"v", &v}});
  const auto s = sgattn::contract::check_attention(op, q, k, v, scale, window, H, W, need_importance);
  auto out = at::empty({s.B, s.h, s.N, s.dv}, q.options());
  auto lse = at::empty({s.B, s.h, s.N}, q.options().dtype(at::kFloat));
  auto imp = need_importance ? at::empty({s.B, window ? s.N : s.M}, q.options().dtype(at::kFloat))
                             : at::empty({0}, q.options().dtype(at::kFloat));
  if (s.B == 0 || s.h == 0) return {out, lse, imp};  // empty results (importance [0, *] when B == 0)
  dispatch_floating(q.scalar_type(), false, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      cpu::attention_forward<T>(attn_call(s, scale, window, H, W), view4<T>(q), view4<T>(k), view4<T>(v),
                                out.data_ptr<T>(), lse.data_ptr<float>(),
                                need_importance ? imp.data_ptr<float>() : nullptr);
    });
  });
  return {out, lse, imp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse_in,
                                                             double scale, int64_t window, int64_t H, int64_t W) {
  const char* op = "attention_bwd";
  // The forward's out and lse (any strides; lse is read contiguous). The CPU
  // kernels take D from each score tile and read only lse; out is checked so
  // that the op's contract is the same on every device.
  check_cpu(op, {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse_in}});
  const auto s = sgattn::contract::check_attention(op, q, k, v, scale, window, H, W, false);
  sgattn::contract::check_attention_grads(op, s, q, dout, out, lse_in);
  const at::Tensor lse = lse_in.contiguous();
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (s.B == 0 || s.h == 0) return {dq, dk, dv};  // empty gradients
  dispatch_floating(q.scalar_type(), false, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      cpu::attention_backward<T>(attn_call(s, scale, window, H, W), view4<T>(q), view4<T>(k), view4<T>(v),
                                 view4<T>(dout), lse.const_data_ptr<float>(), dq.data_ptr<T>(), dk.data_ptr<T>(),
                                 dv.data_ptr<T>());
    });
  });
  return {dq, dk, dv};
}

// The mass ops: global attention with causal masking, grouped-query heads and
// key padding (the same kernels as attention_fwd / attention_bwd).
struct MassArgs {
  sgattn::contract::AttnShape s;
  cpu::Visibility vis;
  std::vector<int64_t> pad_begin, pad_key;  // the padding keys of each batch entry (vis points here)
};

MassArgs mass_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, double scale,
                   bool causal, const std::optional<at::Tensor>& mask_in, const at::Tensor& weight) {
  const at::Tensor mask = mask_in.has_value() ? *mask_in : at::Tensor();
  check_cpu(op, {{"q", &q}, {"k", &k}});
  if (v) check_cpu(op, {{"v", v}});
  if (mask.defined()) check_cpu(op, {{"key_padding_mask", &mask}});
  if (weight.defined()) check_cpu(op, {{"query_weight", &weight}});
  auto [s, G] = sgattn::contract::check_mass(op, q, k, v, scale, mask, weight);
  MassArgs m{s, {}, {}, {}};
  m.vis.G = G;
  m.vis.causal = causal;
  if (mask.defined()) {
    const at::Tensor mc = mask.contiguous();
    const bool* p = mc.const_data_ptr<bool>();
    m.pad_begin.push_back(0);
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t j = 0; j < s.M; ++j)
        if (p[b * s.M + j]) m.pad_key.push_back(j);
      m.pad_begin.push_back(static_cast<int64_t>(m.pad_key.size()));
    }
    m.pad_key.push_back(s.M);  // a sentinel: pad_key is never empty
    m.vis.pad_begin = m.pad_begin.data();
    m.vis.pad_key = m.pad_key.data();
  }
  return m;
}

at::Tensor weight_of(const std::optional<at::Tensor>& w) { return w.has_value() ? w->contiguous() : at::Tensor(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> mass_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, double scale, bool causal,
                                                                  const std::optional<at::Tensor>& mask,
                                                                  const std::optional<at::Tensor>& weight_in) {
  const char* op = "mass_attention_fwd";
  const at::Tensor weight = weight_of(weight_in);
  MassArgs m = mass_args(op, q, k, &v, scale, causal, mask, weight);
  const auto& s = m.s;
  auto out = at::empty({s.B, s.h, s.N, s.dv}, q.options());
  auto lse = at::empty({s.B, s.h, s.N}, q.options().dtype(at::kFloat));
  auto colsum = at::empty({s.B, s.h, s.M}, q.options().dtype(at::kFloat));
  if (s.B == 0) return {out, lse, colsum};
  dispatch_floating(q.scalar_type(), false, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      cpu::forward_global<T>(attn_call(s, scale, 0, 0, 0), view4<T>(q), view4<T>(k), view4<T>(v), out.data_ptr<T>(),
                             lse.data_ptr<float>(), colsum.data_ptr<float>(), m.vis,
                             {true, weight.defined() ? weight.const_data_ptr<float>() : nullptr, nullptr});
    });
  });
  return {out, lse, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mass_attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse_in,
                                                                  double scale, bool causal,
                                                                  const std::optional<at::Tensor>& mask) {
  const char* op = "mass_attention_bwd";
  check_cpu(op, {{"dout", &dout}, {"out", &out}, {"lse", &lse_in}});
  MassArgs m = mass_args(op, q, k, &v, scale, causal, mask, at::Tensor());
  sgattn::contract::check_attention_grads(op, m.s, q, dout, out, lse_in);
  const at::Tensor lse = lse_in.contiguous();
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (m.s.B == 0) return {dq, dk, dv};
  dispatch_floating(q.scalar_type(), false, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      cpu::backward_global<T>(attn_call(m.s, scale, 0, 0, 0), view4<T>(q), view4<T>(k), view4<T>(v), view4<T>(dout),
                              lse.const_data_ptr<float>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(),
                              m.vis);
    });
  });
  return {dq, dk, dv};
}

at::Tensor mass_from_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse_in, double scale,
                         bool causal, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& weight_in) {
  const char* op = "mass_from_lse";
  const at::Tensor weight = weight_of(weight_in);
  check_cpu(op, {{"lse", &lse_in}});
  MassArgs m = mass_args(op, q, k, nullptr, scale, causal, mask, weight);
  const auto& s = m.s;
  sgattn::contract::check_dims(op, "lse", lse_in, 3);
  TORCH_CHECK_VALUE(lse_in.sizes() == q.sizes().slice(0, 3) && lse_in.scalar_type() == at::kFloat, op,
                    ": lse must be float32 [B, Hq, N] = ", q.sizes().slice(0, 3), ", got ", lse_in.scalar_type(), " ",
                    lse_in.sizes());
  const at::Tensor lse = lse_in.contiguous();
  auto colsum = at::empty({s.B, s.h, s.M}, q.options().dtype(at::kFloat));
  if (s.B == 0) return colsum;
  dispatch_floating(q.scalar_type(), false, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      const cpu::View4<T> none{nullptr, 0, 0, 0, 0};
      cpu::forward_global<T>(attn_call(s, scale, 0, 0, 0), view4<T>(q), view4<T>(k), none, nullptr, nullptr,
                             colsum.data_ptr<float>(), m.vis,
                             {true, weight.defined() ? weight.const_data_ptr<float>() : nullptr,
                              lse.const_data_ptr<float>()});
    });
  });
  return colsum;
}

// Index contents (the cuda kernels check them on the device): every row
// idx[g, b, :] (contiguous) a permutation of 0..N-1; else a ValueError naming
// the first bad entry.
void check_permutations(const at::Tensor& idx, const char* op) {
  const int64_t B = idx.size(1), N = idx.size(2);
  const int64_t r = cpu::first_non_permutation(idx.const_data_ptr<int64_t>(), idx.size(0) * B, N);
  if (r < 0) return;
  const int64_t* row = idx.const_data_ptr<int64_t>() + r * N;
  const int64_t g = r / B, b = r % B;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < N, op, ": index values must lie in [0, N) = [0, ", N, "), got index[",
                      g, ", ", b, ", ", i, "] = ", row[i]);
  }
  std::vector<uint8_t> seen(N, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(!seen[row[i]], op, ": index[", g, ", ", b, "] is not a permutation of 0..N-1 (value ", row[i],
                      " repeats at position ", i, "); each row must be the argsort of an importance vector");
    seen[row[i]] = 1;
  }
}

at::Tensor aggregate_fwd(const at::Tensor& x_in, const at::Tensor& index, const at::Tensor& weights,
                         const at::Tensor& biases, c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_fwd";
  check_cpu(op, {{"x", &x_in}, {"index", &index}, {"weights", &weights}, {"biases", &biases}});
  const ReallocPlan plan = sgattn::contract::check_aggregate(op, x_in, index, weights, &biases, group_sizes, true);
  const int64_t G = index.size(0), B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  auto out = at::empty({G, B, plan.M, C}, x_in.options());
  auto idx = index.contiguous();
  check_permutations(idx, op);
  if (out.numel() == 0) return out;
  auto x = x_in.contiguous(), w = weights.contiguous(), b = biases.contiguous();
  dispatch_floating(x.scalar_type(), true, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      cpu::aggregate_forward<T>(x.const_data_ptr<T>(), idx.const_data_ptr<int64_t>(), w.const_data_ptr<T>(),
                                b.const_data_ptr<T>(), G, B, N, C, plan, out.data_ptr<T>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_bwd(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                             const at::Tensor& index, const at::Tensor& weights,
                                                             c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_bwd";
  check_cpu(op, {{"grad", &grad_in}, {"x", &x_in}, {"index", &index}, {"weights", &weights}});
  const ReallocPlan plan = sgattn::contract::check_aggregate(op, x_in, index, weights, nullptr, group_sizes, true);
  sgattn::contract::check_aggregate_grad(op, plan, x_in, index, grad_in);
  auto idx = index.contiguous();
  check_permutations(idx, op);
  auto dx = at::empty(x_in.sizes(), x_in.options());
  auto dw = at::empty(weights.sizes(), weights.options());
  auto db = at::empty({plan.P}, x_in.options());
  auto x = x_in.contiguous(), w = weights.contiguous(), grad = grad_in.contiguous();
  dispatch_floating(x.scalar_type(), true, op, [&](auto tag) {
    using T = decltype(tag);
    run(op, [&] {
      cpu::aggregate_backward<T>(grad.const_data_ptr<T>(), x.const_data_ptr<T>(), idx.const_data_ptr<int64_t>(),
                                 w.const_data_ptr<T>(), index.size(0), x.size(0), x.size(1), x.size(2), plan,
                                 dx.data_ptr<T>(), dw.data_ptr<T>(), db.data_ptr<T>());
    });
  });
  return {dx, dw, db};
}

}  // namespace

SGATTN_IMPL_OPS(CPU, )  // the functions above, by op name
SGATTN_IMPL_MASS_OPS(CPU, )

// An importable (empty) Python module: importing sgattn._C loads the library
// above, which registers the CPU kernels with the dispatcher.
static PyModuleDef sgattn_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "sgattn CPU kernels for the torch.ops.sgattn.* ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sgattn_c_module); }
