// Argument structs of the CUDA kernels, host-compilable (no device code) so
// that the g++-compiled bindings can fill them in.
#pragma once
#include <cstddef>
#include <cstdint>

#include "sgattn_common.h"

namespace sgattn {

constexpr int kMaxKeys = 256;

struct AttnParams {
  const void* q;  // [B, h, N, d] with strides q_stride (elements)
  const void* k;  // [B, h, M, d]
  const void* v;  // [B, h, M, d]
  void* out;      // [B, h, N, d] contiguous
  float* lse;     // [B, h, N] contiguous: natural-log log-sum-exp of the scaled scores
  int64_t q_stride[4], k_stride[4], v_stride[4];
  int64_t B, h, N, M, d;
  float scale;
  int64_t window, H, W;  // window 0: global mode
};

// Launch geometry; computed on the host by plan_attention (also sizes the partials).
struct AttnPlan {
  int warps = 0, QT = 0, Mp = 0;
  int64_t tiles = 0;      // blocks per (b, h)
  int64_t subtiles = 0;   // global: tiles; window: query sub-tiles per window
  int64_t ncols = 0;      // importance columns: M (global) or N (window)
  int64_t partial_elems = 0;  // [B, h * subtiles, ncols]
  size_t smem = 0;
  const char* error = nullptr;  // why the kernel cannot run these inputs
};

struct ReallocArgs {
  const void* x;         // [B, N, C] contiguous
  const int64_t* index;  // [G, B, N] contiguous: row of x at each sorted position
  const void* weights;   // all parts' weights concatenated (plan.woff)
  const void* biases;    // [P]
  void* out;             // [G, B, M, C] contiguous
  ReallocPlan plan;
  int64_t G, B, N, C;
};

}  // namespace sgattn
