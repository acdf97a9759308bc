// Fused attention with importance for short key rows (SG-Former regime: all
// keys of a tile, up to 256, sit in shared memory). One block = one tile of
// 16 * warps queries of one (batch, head) against every key it may see:
//   global mode: query rows [tile * QT, ...) against all M keys;
//   window mode: the queries of one w x w window (QT-row sub-tile) against
//                that window's keys; padded positions are masked.
// The exact softmax row (not an online one) gives the output, the row
// log-sum-exp, and the per-tile column sums of the probabilities (the
// importance partials) in the same launch; a small second kernel reduces the
// partials in a fixed order (deterministic, no atomics).
// fp16/bf16 use tensor cores (WMMA 16x16x16, fp32 accumulation); fp32 runs a
// SIMT path with the same staging. Head dims up to 128 (padded to DP).
#pragma once
#include <mma.h>

#include <type_traits>

#include "sgattn_cuda_structs.h"
#include "sgattn_cuda_types.cuh"

namespace sgattn {

namespace detail {

// Query/key positions of a tile -> token index (-1: masked).
struct TileMap {
  bool windowed;
  WindowGeom geo;
  int64_t win, q0, nkeys, N;
  __device__ TileMap(const AttnParams& p, const AttnPlan& plan, int64_t tile)
      : windowed(p.window > 0), geo(p.H > 0 ? p.H : 1, p.W > 0 ? p.W : 1, p.window > 0 ? p.window : 1) {
    N = p.N;
    if (windowed) {
      win = tile / plan.subtiles;
      q0 = (tile % plan.subtiles) * plan.QT;
      nkeys = geo.size();
    } else {
      win = 0;
      q0 = tile * plan.QT;
      nkeys = p.M;
    }
  }
  __device__ int64_t query(int r) const {
    const int64_t l = q0 + r;
    if (windowed) return l < geo.size() ? geo.token(win, l) : -1;
    return l < N ? l : -1;
  }
  __device__ int64_t key(int j) const {
    if (j >= nkeys) return -1;
    return windowed ? geo.token(win, j) : j;
  }
  // Importance column of key j (valid keys only).
  __device__ int64_t column(int j) const { return windowed ? geo.token(win, j) : j; }
};

// rows x DP tile of (b, hh, token(r), c) into smem (row stride ld), zeros where masked or c >= d.
template <typename T, int DP, typename TokenFn>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, const int64_t* st, int64_t b, int64_t hh,
                                          int rows, int64_t d, TokenFn token) {
  const T* base = src + b * st[0] + hh * st[1];
  for (int i = threadIdx.x; i < rows * DP; i += blockDim.x) {
    const int r = i / DP, c = i % DP;
    const int64_t t = token(r);
    dst[r * ld + c] = (t >= 0 && c < d) ? base[t * st[2] + c * st[3]] : from_f<T>(0.0f);
  }
}

}  // namespace detail

template <typename T, int DP>
__global__ void __launch_bounds__(128) attention_fwd_kernel(AttnParams p, AttnPlan plan, float* partial) {
  using namespace nvcuda;
  constexpr bool TC = !std::is_same<T, float>::value;
  constexpr int LDK = DP + (TC ? 8 : 1);  // +8 halves: 16-byte rows for WMMA; +1 float: no bank conflicts
  constexpr int KT = kMaxKeys / 32;       // key columns per lane in the row softmax
  const int Mp = plan.Mp, QT = plan.QT, lds = Mp + 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  const int64_t tile = blockIdx.x, hh = blockIdx.y, b = blockIdx.z;
  const detail::TileMap tm(p, plan, tile);

  extern __shared__ __align__(128) unsigned char smem[];
  T* KV = reinterpret_cast<T*>(smem);                                   // [Mp][LDK]: K, later V
  T* Qs = reinterpret_cast<T*>(smem + ((size_t(Mp) * LDK * sizeof(T) + 127) / 128) * 128);  // [QT][LDK]
  float* S = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(Qs) +
                                      ((size_t(QT) * LDK * sizeof(T) + 127) / 128) * 128);  // [QT][lds]

  auto qtok = [&](int r) { return tm.query(r); };
  auto ktok = [&](int j) { return tm.key(j); };
  detail::load_tile<T, DP>(Qs, LDK, static_cast<const T*>(p.q), p.q_stride, b, hh, QT, p.d, qtok);
  detail::load_tile<T, DP>(KV, LDK, static_cast<const T*>(p.k), p.k_stride, b, hh, Mp, p.d, ktok);
  __syncthreads();

  // S = Q K^T for this warp's 16 rows.
  if constexpr (TC) {
    for (int nt = 0; nt < Mp / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kt = 0; kt < DP / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // K rows = columns of K^T
        wmma::load_matrix_sync(fa, Qs + r0 * LDK + kt * 16, LDK);
        wmma::load_matrix_sync(fb, KV + nt * 16 * LDK + kt * 16, LDK);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(S + r0 * lds + nt * 16, acc, lds, wmma::mem_row_major);
    }
  } else {
    for (int r = r0; r < r0 + 16; ++r) {
      for (int j = lane; j < Mp; j += 32) {
        float acc = 0.0f;
#pragma unroll 8
        for (int c = 0; c < DP; ++c) acc += to_f(Qs[r * LDK + c]) * to_f(KV[j * LDK + c]);
        S[r * lds + j] = acc;
      }
    }
  }
  __syncthreads();  // K is no longer read: V replaces it

  detail::load_tile<T, DP>(KV, LDK, static_cast<const T*>(p.v), p.v_stride, b, hh, Mp, p.d, ktok);

  // Exact row softmax in base 2 (exp2f of pre-scaled scores), written back as probabilities.
  const float sl2 = p.scale * 1.4426950408889634f;
  for (int r = r0; r < r0 + 16; ++r) {
    const int64_t qt = tm.query(r);
    float e[KT];
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      const int j = lane + 32 * t;
      e[t] = (j < Mp && tm.key(j) >= 0) ? S[r * lds + j] * sl2 : -INFINITY;
      mx = fmaxf(mx, e[t]);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      e[t] = e[t] == -INFINITY ? 0.0f : exp2f(e[t] - mx);
      sum += e[t];
    }
    sum = warp_sum(sum);
    const float inv = qt >= 0 ? 1.0f / sum : 0.0f;  // masked query rows: all-zero P
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      const int j = lane + 32 * t;
      if (j < Mp) S[r * lds + j] = e[t] * inv;
    }
    if (qt >= 0 && lane == 0) p.lse[(b * p.h + hh) * p.N + qt] = (mx + log2f(sum)) * 0.6931471805599453f;
  }
  __syncthreads();

  // Importance partials: column sums of this tile's probabilities, rows in order.
  if (partial != nullptr) {
    const int64_t s = p.window > 0 ? tile % plan.subtiles : tile;
    float* dst = partial + ((b * p.h + hh) * plan.subtiles + s) * plan.ncols;
    for (int j = threadIdx.x; j < Mp; j += blockDim.x) {
      if (tm.key(j) < 0) continue;
      float acc = 0.0f;
      for (int r = 0; r < QT; ++r) acc += S[r * lds + j];
      dst[tm.column(j)] = acc;
    }
  }

  T* out = static_cast<T*>(p.out) + (b * p.h + hh) * p.N * p.d;
  if constexpr (TC) {
    __syncthreads();  // all columns summed before P is narrowed in place
    // P rows to T in place: row r's T values occupy the first half of its fp32 row.
    for (int r = r0; r < r0 + 16; ++r) {
      float pr[KT];
#pragma unroll
      for (int t = 0; t < KT; ++t) pr[t] = (lane + 32 * t < Mp) ? S[r * lds + lane + 32 * t] : 0.0f;
      __syncwarp();
      T* prow = reinterpret_cast<T*>(S + r * lds);
#pragma unroll
      for (int t = 0; t < KT; ++t)
        if (lane + 32 * t < Mp) prow[lane + 32 * t] = from_f<T>(pr[t]);
      __syncwarp();
    }
    __syncthreads();  // V loaded by all threads
    const T* P = reinterpret_cast<const T*>(S + r0 * lds);
    float* stage = reinterpret_cast<float*>(Qs + r0 * LDK);  // Q is spent: 16 x 16 fp32 staging
    for (int nt = 0; nt < DP / 16 && nt * 16 < p.d; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kt = 0; kt < Mp / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, P + kt * 16, 2 * lds);
        wmma::load_matrix_sync(fb, KV + kt * 16 * LDK + nt * 16, LDK);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t qt = tm.query(r0 + e / 16);
        const int c = nt * 16 + e % 16;
        if (qt >= 0 && c < p.d) out[qt * p.d + c] = from_f<T>(stage[e]);
      }
      __syncwarp();
    }
  } else {
    __syncthreads();  // V loaded by all threads
    for (int r = r0; r < r0 + 16; ++r) {
      const int64_t qt = tm.query(r);
      if (qt < 0) continue;
      for (int c = lane; c < DP; c += 32) {
        float acc = 0.0f;
#pragma unroll 4
        for (int j = 0; j < Mp; ++j) acc += S[r * lds + j] * to_f(KV[j * LDK + c]);
        if (c < p.d) out[qt * p.d + c] = from_f<T>(acc);
      }
    }
  }
}

// importance[b, col] = (sum over heads and query tiles of the partials) / count,
// count = h * N (global) or h * real queries of col's window.
__global__ void importance_reduce_kernel(const float* partial, float* importance, AttnParams p, AttnPlan plan) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * plan.ncols) return;
  const int64_t b = i / plan.ncols, col = i % plan.ncols, T = p.h * plan.subtiles;
  const float* src = partial + b * T * plan.ncols + col;
  float acc = 0.0f;
  for (int64_t t = 0; t < T; ++t) acc += src[t * plan.ncols];
  float count = float(p.h * p.N);
  if (p.window > 0) {
    const WindowGeom geo(p.H, p.W, p.window);
    count = float(p.h * geo.real_count(geo.window_of(col)));
  }
  importance[i] = acc / count;
}

template <typename T, int DP>
inline size_t attention_smem(int Mp, int QT) {
  constexpr int LDK = DP + (std::is_same<T, float>::value ? 1 : 8);
  auto up = [](size_t x) { return (x + 127) / 128 * 128; };
  return up(size_t(Mp) * LDK * sizeof(T)) + up(size_t(QT) * LDK * sizeof(T)) + size_t(QT) * (Mp + 4) * 4;
}

// Plans the launch (warps chosen to fit max_smem); plan.error says why not.
template <typename T, int DP>
AttnPlan plan_attention_dp(const AttnParams& p, size_t max_smem) {
  AttnPlan plan;
  const int64_t keys = p.window > 0 ? p.window * p.window : p.M;
  if (keys > kMaxKeys) {
    plan.error = "more than 256 keys per query (global M or window w*w): the fused kernel holds all keys in shared memory";
    return plan;
  }
  if (p.d > DP) { plan.error = "head dim larger than the kernel's padded head dim"; return plan; }
  plan.Mp = static_cast<int>((keys + 31) / 32 * 32);
  for (int warps = 4; warps >= 1; warps /= 2) {
    if (attention_smem<T, DP>(plan.Mp, 16 * warps) <= max_smem) { plan.warps = warps; break; }
  }
  if (plan.warps == 0) { plan.error = "not enough shared memory for one 16-query tile"; return plan; }
  plan.QT = 16 * plan.warps;
  plan.smem = attention_smem<T, DP>(plan.Mp, plan.QT);
  if (p.window > 0) {
    const WindowGeom geo(p.H, p.W, p.window);
    plan.subtiles = (geo.size() + plan.QT - 1) / plan.QT;
    plan.tiles = geo.num_windows() * plan.subtiles;
    plan.ncols = p.N;
  } else {
    plan.tiles = plan.subtiles = (p.N + plan.QT - 1) / plan.QT;
    plan.ncols = p.M;
  }
  plan.partial_elems = p.B * p.h * plan.subtiles * plan.ncols;
  if (plan.tiles > 0x7fffffff || p.h > 65535 || p.B > 65535) plan.error = "grid too large";
  return plan;
}

// partial: plan.partial_elems fp32 scratch and importance [B, ncols], or both null.
template <typename T, int DP>
cudaError_t attention_forward_launch(const AttnParams& p, const AttnPlan& plan, float* partial, float* importance,
                                     cudaStream_t stream) {
  auto kernel = attention_fwd_kernel<T, DP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(plan.tiles), unsigned(p.h), unsigned(p.B)), 32 * plan.warps, plan.smem, stream>>>(p, plan, partial);
  err = cudaGetLastError();
  if (err != cudaSuccess || partial == nullptr) return err;
  const int64_t n = p.B * plan.ncols;
  importance_reduce_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(partial, importance, p, plan);
  return cudaGetLastError();
}

}  // namespace sgattn
