// The argument contract of the registered sgattn ops, shared by the cpu
// (csrc/cpu_ops.cpp) and cuda (csrc/cuda_ops.cpp) bindings: shapes, dtype
// agreement, window and grid sizes, scale, group sizes and size overflow.
// Device checks and a kernel's own limits stay in its binding. Every failure
// is a ValueError in Python, worded "op: problem" like the public ops and the
// Triton custom ops (tests/test_contract.py runs one table against them all).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "sgformer_geometry.h"

namespace sgattn::contract {

inline void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
                    t.layout());
  TORCH_CHECK_VALUE(t.dim() == n, op, ": ", name, " must have ", n, " dimensions, got shape ", t.sizes());
}

inline bool is_kernel_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

// first's dtype is a floating type the kernels take (float64 too when allow_double);
// every other tensor has first's dtype.
inline void check_dtypes(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts,
                         bool allow_double = false) {
  const auto& [first_name, first] = *ts.begin();
  const at::ScalarType st = first->scalar_type();
  TORCH_CHECK_VALUE(is_kernel_float(st) || (allow_double && st == at::kDouble), op, ": ", first_name,
                    " has unsupported dtype ", st, "; the kernels take float32, float16, bfloat16",
                    allow_double ? " or float64" : "");
  for (const auto& [name, t] : ts) {
    TORCH_CHECK_VALUE(t->scalar_type() == st, op, ": dtype mismatch: ", first_name, " is ", st, " but ", name,
                      " is ", t->scalar_type());
  }
}

struct AttnShape {
  int64_t B, h, N, M, d, dv;
};

// q [B, h, N, d], k [B, h, M, d], v [B, h, M, dv]; window 0 is global
// attention (H, W unused), window > 0 needs M == N == H*W.
inline AttnShape check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double scale, int64_t window, int64_t H, int64_t W, bool need_importance) {
  check_dims(op, "q", q, 4);
  check_dims(op, "k", k, 4);
  check_dims(op, "v", v, 4);
  check_dtypes(op, {{"q", &q}, {"k", &k}, {"v", &v}});
  const AttnShape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK_VALUE(k.size(0) == s.B && k.size(1) == s.h && k.size(3) == s.d, op, ": k must be [B, h, M, d] = [",
                    s.B, ", ", s.h, ", M, ", s.d, "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == s.B && v.size(1) == s.h && v.size(2) == s.M, op,
                    ": v must be [B, h, M, dv] matching k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK_VALUE(!(need_importance && s.h == 0 && s.B > 0), op,
                    ": the importance is a mean over heads and h = 0 (with B > 0) has none; "
                    "pass need_importance=False or at least one head");
  // A softmax over no keys, or of no queries, is undefined.
  TORCH_CHECK_VALUE(s.N >= 1 && s.M >= 1, op, ": need at least one query and one key, got N=", s.N, ", M=", s.M);
  TORCH_CHECK_VALUE(s.d >= 1, op, ": head dim d = ", s.d, " must be >= 1");
  TORCH_CHECK_VALUE(s.dv >= 1, op, ": value head dim dv = ", s.dv, " must be >= 1");
  // The kernels scale in float32.
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::fabs(scale) <= std::numeric_limits<float>::max(), op,
                    ": scale must be finite (in float32), got ", scale);
  TORCH_CHECK_VALUE(window >= 0, op, ": window must be >= 0 (0: global attention), got ", window);
  if (window == 0) {
    TORCH_CHECK_VALUE(H >= 0 && W >= 0, op, ": H and W must be >= 0 (unused in global mode), got H=", H, ", W=", W);
  } else {
    TORCH_CHECK_VALUE(s.M == s.N, op, ": window mode needs as many keys as queries, got N=", s.N, ", M=", s.M);
    TORCH_CHECK_VALUE(H >= 1 && W >= 1, op, ": window mode needs a grid H, W >= 1, got H=", H, ", W=", W);
    int64_t HW = 0;
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(H, W, &HW), op, ": H*W = ", H, "*", W, " overflows int64");
    TORCH_CHECK_VALUE(HW == s.N, op, ": H*W = ", H, "*", W, " = ", HW, " does not match N = ", s.N);
  }
  return s;
}

// The backward's dout and the forward's out [B, h, N, dv] (q's dtype) and lse
// (float32 [B, h, N]); after check_attention.
inline void check_attention_grads(const char* op, const AttnShape& s, const at::Tensor& q, const at::Tensor& dout,
                                  const at::Tensor& out, const at::Tensor& lse) {
  for (const auto& [name, t] : {std::pair{"dout", &dout}, std::pair{"out", &out}}) {
    check_dims(op, name, *t, 4);
    TORCH_CHECK_VALUE(t->size(0) == s.B && t->size(1) == s.h && t->size(2) == s.N && t->size(3) == s.dv, op, ": ",
                      name, " must be [B, h, N, dv] = [", s.B, ", ", s.h, ", ", s.N, ", ", s.dv, "], got ",
                      t->sizes());
  }
  check_dtypes(op, {{"q", &q}, {"dout", &dout}, {"out", &out}});
  check_dims(op, "lse", lse, 3);
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == at::kFloat, op,
                    ": lse must be float32 [B, h, N] = ", q.sizes().slice(0, 3), " (the forward's), got ",
                    lse.scalar_type(), " ", lse.sizes());
}

// The mass ops: q [B, Hq, N, d], k [B, Hkv, M, d], v [B, Hkv, M, dv] (null for
// mass_from_lse), Hq a multiple of Hkv, key_padding_mask bool [B, M],
// query_weight float32 [N] (either undefined: none). Returns the shape (h = Hq)
// and G = Hq / Hkv.
inline std::pair<AttnShape, int64_t> check_mass(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor* v, double scale, const at::Tensor& mask,
                                                const at::Tensor& weight) {
  check_dims(op, "q", q, 4);
  check_dims(op, "k", k, 4);
  if (v) {
    check_dims(op, "v", *v, 4);
    check_dtypes(op, {{"q", &q}, {"k", &k}, {"v", v}});
  } else {
    check_dtypes(op, {{"q", &q}, {"k", &k}});
  }
  const AttnShape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v ? v->size(3) : 1};
  const int64_t Hkv = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == s.B && k.size(3) == s.d, op, ": k must be [B, Hkv, M, d] = [", s.B, ", Hkv, M, ",
                    s.d, "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && s.h % Hkv == 0, op,
                    ": the query heads must be a multiple of the key/value heads, got Hq=", s.h, " and Hkv=", Hkv);
  TORCH_CHECK_VALUE(!v || (v->size(0) == s.B && v->size(1) == Hkv && v->size(2) == s.M), op,
                    ": v must be [B, Hkv, M, dv] matching k ", k.sizes(), ", got ", v ? v->sizes() : k.sizes());
  TORCH_CHECK_VALUE(s.N >= 1 && s.M >= 1 && s.d >= 1 && s.dv >= 1, op,
                    ": need at least one query, one key and head dims >= 1, got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::fabs(scale) <= std::numeric_limits<float>::max(), op,
                    ": scale must be finite (in float32), got ", scale);
  if (mask.defined()) {
    check_dims(op, "key_padding_mask", mask, 2);
    TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.size(0) == s.B && mask.size(1) == s.M, op,
                      ": key_padding_mask must be bool [B, M] = [", s.B, ", ", s.M, "], got ", mask.scalar_type(),
                      " ", mask.sizes());
  }
  if (weight.defined()) {
    check_dims(op, "query_weight", weight, 1);
    TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat && weight.size(0) == s.N, op,
                      ": query_weight must be float32 [N] = [", s.N, "], got ", weight.scalar_type(), " ",
                      weight.sizes());
  }
  return {s, s.h / Hkv};
}

// x [B, N, C], index [G, B, N] int64, weights: the parts' r_p weights
// concatenated, biases [P] (null for the backward); returns the plan.
inline ReallocPlan check_aggregate(const char* op, const at::Tensor& x, const at::Tensor& index,
                                   const at::Tensor& weights, const at::Tensor* biases,
                                   c10::IntArrayRef group_sizes, bool allow_double) {
  check_dims(op, "x", x, 3);
  check_dims(op, "index", index, 3);
  check_dims(op, "weights", weights, 1);
  if (biases) {
    check_dims(op, "biases", *biases, 1);
    check_dtypes(op, {{"x", &x}, {"weights", &weights}, {"biases", biases}}, allow_double);
  } else {
    check_dtypes(op, {{"x", &x}, {"weights", &weights}}, allow_double);
  }
  const int64_t P = static_cast<int64_t>(group_sizes.size()), N = x.size(1);
  int64_t total = 0;
  bool positive = P == 2 || P == 3;
  for (const int64_t r : group_sizes) positive = positive && r >= 1;
  TORCH_CHECK_VALUE(positive, op, ": group_sizes must be 2 or 3 positive ints, got ", group_sizes);
  for (const int64_t r : group_sizes) {
    int64_t unused = 0;
    TORCH_CHECK_VALUE(!__builtin_add_overflow(r, N, &unused) && !__builtin_add_overflow(total, r, &total), op,
                      ": group_sizes ", group_sizes, " overflow int64");
  }
  TORCH_CHECK_VALUE(weights.numel() == total, op, ": weights must hold sum(group_sizes) = ", total,
                    " weights, got ", weights.numel());
  TORCH_CHECK_VALUE(!biases || biases->numel() == P, op, ": biases must hold one bias per part (", P, "), got ",
                    biases ? biases->numel() : 0);
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) == index.size(1) && x.size(1) == index.size(2), op, ": x must be [B, N, C] = [",
                    index.size(1), ", ", index.size(2), ", C] to match index ", index.sizes(), ", got ", x.sizes());
  return ReallocPlan(N, static_cast<int>(P), group_sizes.data());
}

// The backward's grad [G, B, M, C] in x's dtype; after check_aggregate.
inline void check_aggregate_grad(const char* op, const ReallocPlan& plan, const at::Tensor& x,
                                 const at::Tensor& index, const at::Tensor& grad) {
  check_dims(op, "grad", grad, 4);
  const int64_t G = index.size(0), B = x.size(0), C = x.size(2);
  TORCH_CHECK_VALUE(grad.size(0) == G && grad.size(1) == B && grad.size(2) == plan.M && grad.size(3) == C, op,
                    ": grad must be [G, B, M, C] = [", G, ", ", B, ", ", plan.M, ", ", C, "], got ", grad.sizes());
  check_dtypes(op, {{"x", &x}, {"grad", &grad}}, true);
}

}  // namespace sgattn::contract
