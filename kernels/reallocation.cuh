// Token reallocation (SPEC 2b steps 2-4) on the GPU: gather importance-sorted
// tokens and merge each group of r_p into one weighted sum. One kernel covers
// all parts (the plan maps an output row to its part) and all orderings (the
// G dimension of the index). fp32 accumulation, 16-byte vector loads along C.
#pragma once
#include "sgattn_cuda_structs.h"
#include "sgattn_cuda_types.cuh"

namespace sgattn {

// Forward: one block per output row (g, b, m); threads stride over C in VEC packs.
template <typename T, int VEC>
__global__ void realloc_fwd_kernel(ReallocArgs a) {
  const ReallocPlan& pl = a.plan;
  const int64_t row = blockIdx.x, M = pl.M;
  const int64_t gb = row / M, m = row % M, b = gb % a.B;
  const int p = pl.part_of_row(m);
  int64_t first, count;
  pl.members(m, p, first, count);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weights) + pl.woff[p];
  const float bias = to_f(static_cast<const T*>(a.biases)[p]);
  const int64_t* idx = a.index + gb * a.N + first;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < a.C; c += int64_t(blockDim.x) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = bias;
    for (int64_t j = 0; j < count; ++j) {
      const float wj = to_f(w[j]);
      const Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(x + (b * a.N + idx[j]) * a.C + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += wj * to_f(v.v[e]);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_f<T>(acc[e]);
    *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(a.out) + row * a.C + c) = o;
  }
}

// Backward step 1: inv[g, b, index[g, b, pos]] = pos. The index rows are
// permutations (argsort), checked by the caller, so dx can be gathered
// without atomics (deterministic).
__global__ void realloc_inverse_kernel(const int64_t* index, int64_t* inv, int64_t rows, int64_t N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows * N) inv[(i / N) * N + index[i]] = i % N;
}

// Backward step 2: one block per token (b, n): dx[b, n] = sum over orderings g
// of w_j * grad[g, b, m]; also the dot grad[g, b, m] . x[b, n] that dweights
// needs, stored per (g, b, sorted position).
template <typename T, int VEC>
__global__ void realloc_bwd_dx_kernel(ReallocArgs a, const T* grad, const int64_t* inv, T* dx, float* dots) {
  __shared__ float scratch[32];
  const ReallocPlan& pl = a.plan;
  const int64_t bn = blockIdx.x, b = bn / a.N, n = bn % a.N, M = pl.M;
  const T* x = static_cast<const T*>(a.x) + bn * a.C;
  const T* w = static_cast<const T*>(a.weights);
  // Where token n landed in ordering g: output row and weight.
  auto locate = [&](int64_t g, int64_t& pos, const T*& grow, float& wj) {
    pos = inv[(g * a.B + b) * a.N + n];
    const int p = pl.part_of_pos(pos);
    const int64_t off = pos - pl.start[p], m = pl.out[p] + off / pl.r[p];
    wj = to_f(w[pl.woff[p] + off % pl.r[p]]);
    grow = grad + ((g * a.B + b) * M + m) * a.C;
  };
  const int64_t c0 = int64_t(threadIdx.x) * VEC, cstep = int64_t(blockDim.x) * VEC;
  for (int64_t c = c0; c < a.C; c += cstep) {
    float acc[VEC] = {};
    for (int64_t g = 0; g < a.G; ++g) {
      int64_t pos; const T* grow; float wj;
      locate(g, pos, grow, wj);
      const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(grow + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += wj * to_f(gv.v[e]);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_f<T>(acc[e]);
    *reinterpret_cast<Pack<T, VEC>*>(dx + bn * a.C + c) = o;
  }
  for (int64_t g = 0; g < a.G; ++g) {
    int64_t pos; const T* grow; float wj;
    locate(g, pos, grow, wj);
    float dot = 0.0f;
    for (int64_t c = c0; c < a.C; c += cstep) {
      const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(grow + c);
      const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += to_f(gv.v[e]) * to_f(xv.v[e]);
    }
    dot = block_sum(dot, scratch);  // every thread takes part
    if (threadIdx.x == 0) dots[(g * a.B + b) * a.N + pos] = dot;
  }
}

// Backward step 3: block e < R sums the dots of weight e over (g, b, groups);
// block R + p sums grad over part p's rows and channels (dbias). Fixed order.
template <typename T>
__global__ void realloc_bwd_reduce_kernel(ReallocArgs a, const T* grad, const float* dots, T* dw, T* db, int64_t R) {
  __shared__ double scratch[32];  // sums of B*M*C terms: double, like the CPU path
  const ReallocPlan& pl = a.plan;
  const int64_t e = blockIdx.x;
  double s = 0.0;
  if (e < R) {
    int p = 0;
    while (p + 1 < pl.P && e >= pl.woff[p + 1]) ++p;
    const int64_t jj = e - pl.woff[p], groups = (pl.len[p] + pl.r[p] - 1) / pl.r[p];
    for (int64_t t = threadIdx.x; t < a.G * a.B * groups; t += blockDim.x) {
      const int64_t gb = t / groups, pos = pl.start[p] + (t % groups) * pl.r[p] + jj;
      if (pos < pl.start[p] + pl.len[p]) s += dots[gb * a.N + pos];
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) dw[e] = from_f<T>(static_cast<float>(s));
  } else {
    const int p = static_cast<int>(e - R);
    const int64_t rows = (pl.len[p] + pl.r[p] - 1) / pl.r[p];
    for (int64_t t = threadIdx.x; t < a.G * a.B * rows * a.C; t += blockDim.x) {
      const int64_t c = t % a.C, rg = t / a.C, gb = rg / rows, m = pl.out[p] + rg % rows;
      s += (double)to_f(grad[(gb * pl.M + m) * a.C + c]);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) db[p] = from_f<T>(static_cast<float>(s));
  }
}

inline int realloc_threads(int64_t C, int vec) {
  const int64_t packs = (C + vec - 1) / vec;
  return static_cast<int>(packs >= 256 ? 256 : ((packs + 31) / 32) * 32);
}

template <typename T, int VEC>
cudaError_t realloc_forward_launch(const ReallocArgs& a, cudaStream_t stream) {
  const int64_t rows = a.G * a.B * a.plan.M;
  if (rows == 0) return cudaSuccess;
  realloc_fwd_kernel<T, VEC><<<dim3(static_cast<unsigned>(rows)), realloc_threads(a.C, VEC), 0, stream>>>(a);
  return cudaGetLastError();
}

// inv: [G, B, N] int64 scratch; dots: [G, B, N] fp32 scratch; dw like weights; db [P].
template <typename T, int VEC>
cudaError_t realloc_backward_launch(const ReallocArgs& a, const T* grad, T* dx, int64_t* inv, float* dots,
                                    T* dw, T* db, int64_t R, cudaStream_t stream) {
  const int64_t total = a.G * a.B * a.N;
  realloc_inverse_kernel<<<dim3(static_cast<unsigned>((total + 255) / 256)), 256, 0, stream>>>(a.index, inv, a.G * a.B, a.N);
  realloc_bwd_dx_kernel<T, VEC><<<dim3(static_cast<unsigned>(a.B * a.N)), realloc_threads(a.C, VEC), 0, stream>>>(
      a, grad, inv, dx, dots);
  realloc_bwd_reduce_kernel<T><<<dim3(static_cast<unsigned>(R + a.plan.P)), 256, 0, stream>>>(a, grad, dots, dw, db, R);
  return cudaGetLastError();
}

}  // namespace sgattn
