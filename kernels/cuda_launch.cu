// Instantiations and dtype/head-dim dispatch of the CUDA kernels behind the
// host API of sgattn_cuda_api.h. Framework-free: built into the torch
// extension by setup.py and compiled standalone (nvcc -Xptxas -v) by
// tools/ci_native_checks.sh to check registers and spills.
#include <cstdint>

#include "attention.cuh"
#include "attention_bwd.cuh"
#include "reallocation.cuh"
#include "sgattn_cuda_api.h"

namespace sgattn {
namespace {

// Calls f(T{}) for the element type of dtype.
template <typename F>
auto with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
    default: return f(float{});
  }
}

// Head dims are padded to the next of 32, 64, 96, 128 (zero-filled in shared
// memory; same rule as padded_head_dim).
template <typename T, typename F>
auto with_head_dim(int64_t d, F&& f) {
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 96) return f(std::integral_constant<int, 96>{});
  return f(std::integral_constant<int, 128>{});
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

cudaError_t attention_forward(DType dtype, const AttnParams& p, const AttnPlan& plan, float* partial,
                              float* importance, cudaStream_t stream) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return with_head_dim<T>(p.d, [&](auto dp) {
      return attention_forward_launch<T, decltype(dp)::value>(p, plan, partial, importance, stream);
    });
  });
}

cudaError_t attention_backward(DType dtype, const AttnParams& p, const AttnPlan& plan, const AttnBwdArgs& g,
                               cudaStream_t stream) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return with_head_dim<T>(p.d, [&](auto dp) { return attention_backward_launch<T, decltype(dp)::value>(p, plan, g, stream); });
  });
}

cudaError_t realloc_forward(DType dtype, const ReallocArgs& a, cudaStream_t stream) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int V = 16 / sizeof(T);
    if (a.C % V == 0 && aligned16(a.x) && aligned16(a.out)) return realloc_forward_launch<T, V>(a, stream);
    return realloc_forward_launch<T, 1>(a, stream);
  });
}

cudaError_t realloc_backward(DType dtype, const ReallocArgs& a, const void* grad, void* dx, int64_t* inv,
                             float* dots, float* rowsums, void* dweights, void* dbiases, int64_t num_weights,
                             cudaStream_t stream) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int V = 16 / sizeof(T);
    const T* g = static_cast<const T*>(grad);
    T* dxp = static_cast<T*>(dx);
    T* dw = static_cast<T*>(dweights);
    T* db = static_cast<T*>(dbiases);
    if (a.C % V == 0 && aligned16(a.x) && aligned16(grad) && aligned16(dx))
      return realloc_backward_launch<T, V>(a, g, dxp, inv, dots, rowsums, dw, db, num_weights, stream);
    return realloc_backward_launch<T, 1>(a, g, dxp, inv, dots, rowsums, dw, db, num_weights, stream);
  });
}

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, attention_fwd_kernel<__half, 64>);
}

}  // namespace sgattn
