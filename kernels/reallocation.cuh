// Token reallocation on the GPU: gather importance-sorted tokens and merge each
// group of r_p consecutive ones into one weighted sum (plus the part's bias). One kernel covers
// all parts (the plan maps an output row to its part) and all orderings (the
// G dimension of the index). fp32 accumulation, 16-byte vector loads along C.
// Deterministic: no atomics, every reduction in a fixed order.
//
// Index validation happens on the device (no host synchronisation): an index
// value out of [0, N) (forward and backward) or an index row that is not a
// permutation (backward: some token is never reached) stops the kernel with a
// device-side assertion ("sgattn: ..."), never an out-of-bounds access.
#pragma once
#include "cuda_plan.h"
#include "sgattn_cuda_types.cuh"

namespace sgattn {

// Device-side error: prints the message and fails the launch (cudaErrorAssert,
// reported by the next synchronising CUDA call). Independent of NDEBUG.
// __assertfail is the device runtime's assertion entry point (what assert()
// calls), declared here so that it works whatever NDEBUG says.
extern "C" __device__ void __assertfail(const char* message, const char* file, unsigned int line,
                                        const char* function, size_t char_size);
__device__ __noinline__ void device_fail(const char* msg) { __assertfail(msg, __FILE__, __LINE__, "sgattn", 1); }

// Forward: one block per output row (g, b, m); threads stride over C in VEC packs.
template <typename T, int VEC>
__global__ void realloc_fwd_kernel(ReallocArgs a) {
  const ReallocPlan& pl = a.plan;
  const int64_t row = blockIdx.x, M = pl.M;
  const int64_t gb = row / M, m = row - gb * M, b = gb % a.B;
  const int p = pl.part_of_row(m);
  int64_t first, count;
  pl.members(m, p, first, count);
  const T* x = static_cast<const T*>(a.x) + b * a.N * a.C;
  const T* w = static_cast<const T*>(a.weights) + pl.woff[p];
  const float bias = to_f(static_cast<const T*>(a.biases)[p]);
  const int64_t* idx = a.index + gb * a.N + first;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    if (static_cast<uint64_t>(idx[j]) >= static_cast<uint64_t>(a.N))
      device_fail("sgattn aggregate: index value out of range [0, N)");
  }
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < a.C; c += int64_t(blockDim.x) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = bias;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t t = idx[j];
      if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(a.N)) break;  // reported above
      const float wj = to_f(w[j]);
      const Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(x + t * a.C + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += wj * to_f(v.v[e]);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = from_f<T>(acc[e]);
    *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(a.out) + row * a.C + c) = o;
  }
}

// Backward step 1: inv[g, b, index[g, b, pos]] = pos; inv is preset to -1, so a
// row that is not a permutation leaves some token at -1 (caught in step 2).
__global__ void realloc_inverse_kernel(const int64_t* index, int64_t* inv, int64_t rows, int64_t N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * N) return;
  const int64_t t = index[i], row = i / N;
  if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(N)) {
    device_fail("sgattn aggregate_bwd: index value out of range [0, N)");
    return;
  }
  inv[row * N + t] = i - row * N;
}

constexpr int kTokWarps = 8;  // tokens (warps) per block of the dx kernel

// Backward step 2: one warp per token (b, n): dx[b, n] = sum over orderings g
// of w_j * grad[g, b, m]; also the dot grad[g, b, m] . x[b, n] that dweights
// needs, stored per (g, b, sorted position).
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kTokWarps) realloc_bwd_dx_kernel(ReallocArgs a, const T* grad, const int64_t* inv,
                                                                         T* dx, float* dots) {
  const ReallocPlan& pl = a.plan;
  const int lane = threadIdx.x & 31;
  const int64_t bn = int64_t(blockIdx.x) * kTokWarps + (threadIdx.x >> 5);
  if (bn >= a.B * a.N) return;  // whole warps exit together
  const int64_t b = bn / a.N, n = bn - b * a.N, M = pl.M;
  const T* x = static_cast<const T*>(a.x) + bn * a.C;
  const T* w = static_cast<const T*>(a.weights);
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t pos = inv[(g * a.B + b) * a.N + n];
    if (pos < 0) {
      device_fail("sgattn aggregate_bwd: index row is not a permutation of 0..N-1");
      return;
    }
  }
  // Where token n landed in ordering g: output row and weight.
  auto locate = [&](int64_t g, int64_t& pos, const T*& grow, float& wj) {
    pos = inv[(g * a.B + b) * a.N + n];
    const int p = pl.part_of_pos(pos);
    int64_t m, j;
    pl.slot(pos, p, m, j);
    wj = to_f(w[pl.woff[p] + j]);
    grow = grad + ((g * a.B + b) * M + m) * a.C;
  };
  for (int64_t c = int64_t(lane) * VEC; c < a.C; c += 32 * VEC) {
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
    for (int64_t c = int64_t(lane) * VEC; c < a.C; c += 32 * VEC) {
      const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(grow + c);
      const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += to_f(gv.v[e]) * to_f(xv.v[e]);
    }
    dot = warp_sum(dot);
    if (lane == 0) dots[(g * a.B + b) * a.N + pos] = dot;
  }
}

// Backward step 3: one warp per output row (g, b, m): rowsums = sum over C of grad
// (per-row partials of the bias gradient).
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kTokWarps) realloc_bwd_rowsum_kernel(ReallocArgs a, const T* grad, float* rowsums) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kTokWarps + (threadIdx.x >> 5);
  if (row >= a.G * a.B * a.plan.M) return;
  const T* g = grad + row * a.C;
  float s = 0.0f;
  for (int64_t c = int64_t(lane) * VEC; c < a.C; c += 32 * VEC) {
    const Pack<T, VEC> gv = *reinterpret_cast<const Pack<T, VEC>*>(g + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) s += to_f(gv.v[e]);
  }
  s = warp_sum(s);
  if (lane == 0) rowsums[row] = s;
}

// Backward step 4: block e < R sums the dots of weight e over (g, b, groups);
// block R + p sums part p's row sums (dbias). Fixed order, double accumulation.
template <typename T>
__global__ void realloc_bwd_reduce_kernel(ReallocArgs a, const float* dots, const float* rowsums, T* dw, T* db, int R) {
  __shared__ double scratch[32];
  const ReallocPlan& pl = a.plan;
  const int e = blockIdx.x;
  const int64_t GB = a.G * a.B;
  double s = 0.0;
  if (e < R) {
    int p = 0;
    while (p + 1 < pl.P && e >= pl.woff[p + 1]) ++p;
    const int64_t jj = e - pl.woff[p], groups = pl.groups(p);
    const int64_t first = pl.start[p] + jj, end = pl.start[p] + pl.len[p];
    for (int64_t gb = 0; gb < GB; ++gb) {
      const float* d = dots + gb * a.N;
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        const int64_t pos = first + g * pl.r[p];
        if (pos < end) s += d[pos];
      }
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) dw[e] = from_f<T>(static_cast<float>(s));
  } else {
    const int p = e - R;
    const int64_t rows = pl.groups(p);
    for (int64_t gb = 0; gb < GB; ++gb) {
      const float* rs = rowsums + gb * pl.M + pl.out[p];
      for (int64_t m = threadIdx.x; m < rows; m += blockDim.x) s += rs[m];
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
  if (rows == 0 || a.C == 0) return cudaSuccess;
  realloc_fwd_kernel<T, VEC><<<dim3(static_cast<unsigned>(rows)), realloc_threads(a.C, VEC), 0, stream>>>(a);
  return cudaGetLastError();
}

// inv: [G, B, N] int64 scratch; dots: [G, B, N] fp32; rowsums [G, B, M] fp32; dw like weights; db [P].
template <typename T, int VEC>
cudaError_t realloc_backward_launch(const ReallocArgs& a, const T* grad, T* dx, int64_t* inv, float* dots,
                                    float* rowsums, T* dw, T* db, int64_t R, cudaStream_t stream) {
  const int64_t total = a.G * a.B * a.N;
  if (total > 0) {
    cudaError_t err = cudaMemsetAsync(inv, 0xff, size_t(total) * sizeof(int64_t), stream);  // -1
    if (err != cudaSuccess) return err;
    realloc_inverse_kernel<<<dim3(static_cast<unsigned>((total + 255) / 256)), 256, 0, stream>>>(a.index, inv, a.G * a.B, a.N);
    if (a.C > 0) {
      realloc_bwd_dx_kernel<T, VEC><<<dim3(static_cast<unsigned>((a.B * a.N + kTokWarps - 1) / kTokWarps)),
                                      32 * kTokWarps, 0, stream>>>(a, grad, inv, dx, dots);
    } else {
      err = cudaMemsetAsync(dots, 0, size_t(total) * sizeof(float), stream);
      if (err != cudaSuccess) return err;
    }
    const int64_t rows = a.G * a.B * a.plan.M;
    if (a.C > 0) {
      realloc_bwd_rowsum_kernel<T, VEC><<<dim3(static_cast<unsigned>((rows + kTokWarps - 1) / kTokWarps)),
                                          32 * kTokWarps, 0, stream>>>(a, grad, rowsums);
    } else {
      err = cudaMemsetAsync(rowsums, 0, size_t(rows) * sizeof(float), stream);
      if (err != cudaSuccess) return err;
    }
  }
  realloc_bwd_reduce_kernel<T><<<dim3(static_cast<unsigned>(R + a.plan.P)), 256, 0, stream>>>(a, dots, rowsums, dw, db,
                                                                                           static_cast<int>(R));
  return cudaGetLastError();
}

}  // namespace sgattn
