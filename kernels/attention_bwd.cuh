// Fused attention backward (dQ, dK, dV) for global and window attention, any
// key count, fp16/bf16 on tensor cores (WMMA, fp32 accumulation) and fp32 SIMT.
// The forward's output O and row log-sum-exp (natural log, fp32) are handed
// over, so the forward is not rerun: P = exp2(s * scale * log2(e) - lse2),
// lse2 = lse * log2(e), one exp per score, and
//   delta kernel: D = rowsum(dO * O) per query (fp32, O in the output dtype);
//   dK/dV kernel (key-major): one block owns 16 * kv_warps keys of one
//     (batch, head, segment) and loops over that segment's queries (or one
//     query split of them: long global rows) in chunks of 32:
//     P^T = exp2(K Q^T * scale * log2(e) - lse2), dP^T = V dO^T,
//     dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q * scale;
//     with several splits, fp32 partials are summed in split order by a
//     small reduction kernel;
//   dQ kernel (query-major): one block owns 16 * dq_warps queries and loops
//     over key tiles of 64: dQ += dS K * scale.
// On tensor cores each warp's dS tile is scaled into half range and split into
// hi + lo before the dots (detail::split_ds_tile), as the Triton backward does.
// Every output element is written by exactly one block in a fixed order:
// deterministic, no atomics.
#pragma once
#include "attention.cuh"

namespace sgattn {

namespace detail {

// Writes one row of values (lane-owned columns) over an fp32 row: as T in
// place for tensor cores (the caller has read the row), as fp32 otherwise.
template <typename T, int PER>
__device__ __forceinline__ void put_row(float* row, const float (&v)[PER]) {
  const int lane = threadIdx.x & 31;
  if constexpr (!std::is_same<T, float>::value) {
    T* rt = reinterpret_cast<T*>(row);
#pragma unroll
    for (int t = 0; t < PER; ++t) rt[lane + 32 * t] = from_f<T>(v[t]);
  } else {
#pragma unroll
    for (int t = 0; t < PER; ++t) row[lane + 32 * t] = v[t];
  }
}

// dS = P (dP - D) may exceed half's range (large dO) while dQ, dK are small,
// and rounded to 8 or 11 bits it loses their accuracy in saturated rows. One
// warp's fp32 tile A[16][KC] (row stride ldf >= KC + 4 floats) is scaled by
// c = 2**e that puts its largest entry in [2**13, 2**14), e clamped to
// [-126, 126] so c and 1/c are finite (a tile of tiny probabilities must not
// give 0 * inf), then split in place into hi + lo in T (relative error 2**-22,
// bf16 2**-16): hi in a row's first KC elements, lo in the next KC (the row
// holds 2 * ldf). Returns 1/c for warp_ab_acc<..., 2>.
template <typename T, int KC>
__device__ __forceinline__ float split_ds_tile(float* A, int ldf) {
  const int lane = threadIdx.x & 31;
  float amax = 0.0f;
  for (int r = 0; r < 16; ++r) {
#pragma unroll
    for (int t = 0; t < KC / 32; ++t) amax = fmaxf(amax, fabsf(A[r * ldf + lane + 32 * t]));
  }
  amax = warp_max(amax);
  int ex = 0;  // amax in [2**(ex-1), 2**ex)
  if (amax > 0.0f) frexpf(amax, &ex);
  const int e = amax > 0.0f ? min(max(14 - ex, -126), 126) : 0;
  const float c = __int_as_float((127 + e) << 23), unscale = __int_as_float((127 - e) << 23);
  for (int r = 0; r < 16; ++r) {
    float v[KC / 32];
#pragma unroll
    for (int t = 0; t < KC / 32; ++t) v[t] = A[r * ldf + lane + 32 * t] * c;
    __syncwarp();  // the row is read before it is overwritten
    T* rt = reinterpret_cast<T*>(A + r * ldf);
#pragma unroll
    for (int t = 0; t < KC / 32; ++t) {
      const T hi = from_f<T>(v[t]);
      rt[lane + 32 * t] = hi;
      rt[KC + lane + 32 * t] = from_f<T>(v[t] - to_f(hi));
    }
  }
  __syncwarp();
  return unscale;
}

}  // namespace detail

// D[bh, n] = sum_c dO[b, hh, n, c] * O[bh, n, c]; one warp per query row.
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_delta_kernel(AttnParams p, AttnBwdArgs g) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= p.B * p.h * p.N) return;
  const int64_t bh = row / p.N, n = row - bh * p.N, b = bh / p.h, hh = bh - b * p.h;
  const T* dO = static_cast<const T*>(g.dout) + b * g.do_stride[0] + hh * g.do_stride[1] + n * g.do_stride[2];
  const T* o = static_cast<const T*>(g.out) + b * g.out_stride[0] + hh * g.out_stride[1] + n * g.out_stride[2];
  float s = 0.0f;
  for (int c = lane; c < p.d; c += 32) s += to_f(dO[c * g.do_stride[3]]) * to_f(o[c * g.out_stride[3]]);
  s = warp_sum(s);
  if (lane == 0) g.delta[row] = s;
}

template <typename T, int DP>
__global__ void __launch_bounds__(128, 1) attention_bwd_kv_kernel(AttnParams p, AttnPlan plan, AttnBwdArgs g) {
  constexpr bool TC = !std::is_same<T, float>::value;
  constexpr int LDK = DP + (TC ? 8 : 1), QC = kBwdQueryChunk, LDQ = QC + 4, LDO = DP + 4;
  const int KTb = 16 * plan.kv_warps;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, k0w = warp * 16;
  const int splits = int(plan.kv_splits);
  const detail::KeyBlock kb(int(plan.segments), int(plan.kv_ktiles), splits);
  const int bh = kb.bh, seg_id = kb.seg, split = kb.split, k0 = kb.kt * KTb;
  const int b = bh / int(p.h), hh = bh - b * int(p.h), d = int(p.d);
  const detail::Segment seg(p, seg_id);

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* at = smem;
  T* Ks = detail::carve<T>(at, size_t(KTb) * LDK * sizeof(T));
  T* Vs = detail::carve<T>(at, size_t(KTb) * LDK * sizeof(T));
  T* Qs = detail::carve<T>(at, size_t(QC) * LDK * sizeof(T));
  T* dOs = detail::carve<T>(at, size_t(QC) * LDK * sizeof(T));
  float* St = detail::carve<float>(at, size_t(KTb) * LDQ * 4);   // P^T (T in place for TC)
  float* dPt = detail::carve<float>(at, size_t(KTb) * LDQ * 4);  // dP^T, then dS^T
  float* dKa = detail::carve<float>(at, size_t(KTb) * LDO * 4);
  float* dVa = detail::carve<float>(at, size_t(KTb) * LDO * 4);
  float* L2 = detail::carve<float>(at, size_t(QC) * 4);  // lse2 (+inf: masked query)
  float* Dq = detail::carve<float>(at, size_t(QC) * 4);

  auto ktok = [&](int j) { return seg.key(k0 + j); };
  detail::load_tile_any<T, DP>(p.k_load, Ks, LDK, static_cast<const T*>(p.k), p.k_stride, b, hh, KTb, d, ktok);
  detail::load_tile_any<T, DP>(p.v_load, Vs, LDK, static_cast<const T*>(p.v), p.v_stride, b, hh, KTb, d, ktok);
  for (int i = threadIdx.x; i < KTb * LDO; i += blockDim.x) { dKa[i] = 0.0f; dVa[i] = 0.0f; }

  const float sl2 = p.scale * 1.4426950408889634f;
  const float* lse = p.lse + int64_t(bh) * p.N;
  const float* delta = g.delta + int64_t(bh) * p.N;
  const int qbeg = split * int(plan.kv_split_queries), qend = min(seg.nq, qbeg + int(plan.kv_split_queries));
  for (int c0 = qbeg; c0 < qend; c0 += QC) {
    auto qtok = [&](int r) { return c0 + r < qend ? seg.query(c0 + r) : -1; };
    __syncthreads();  // previous chunk fully read
    detail::load_tile_any<T, DP>(p.q_load, Qs, LDK, static_cast<const T*>(p.q), p.q_stride, b, hh, QC, d, qtok);
    detail::load_tile_any<T, DP>(g.do_load, dOs, LDK, static_cast<const T*>(g.dout), g.do_stride, b, hh, QC, d, qtok);
    for (int r = threadIdx.x; r < QC; r += blockDim.x) {
      const int t = qtok(r);
      L2[r] = t >= 0 ? lse[t] * 1.4426950408889634f : INFINITY;  // masked queries: P = 0
      Dq[r] = t >= 0 ? delta[t] : 0.0f;
    }
    detail::load_wait();  // this chunk (and, first time round, the K and V tiles)
    __syncthreads();
    detail::warp_abt<T, DP, QC>(St + k0w * LDQ, LDQ, Ks + k0w * LDK, LDK, Qs, LDK);
    detail::warp_abt<T, DP, QC>(dPt + k0w * LDQ, LDQ, Vs + k0w * LDK, LDK, dOs, LDK);
    __syncwarp();
    for (int j = k0w; j < k0w + 16; ++j) {
      float pv[QC / 32], ds[QC / 32];
#pragma unroll
      for (int t = 0; t < QC / 32; ++t) {
        const int r = lane + 32 * t;
        pv[t] = exp2f(St[j * LDQ + r] * sl2 - L2[r]);
        ds[t] = pv[t] * (dPt[j * LDQ + r] - Dq[r]);
      }
      __syncwarp();
      detail::put_row<T, QC / 32>(St + j * LDQ, pv);
      detail::put_row<float, QC / 32>(dPt + j * LDQ, ds);  // narrowed by split_ds_tile
    }
    __syncwarp();
    float unscale = 1.0f;
    if constexpr (TC) unscale = detail::split_ds_tile<T, QC>(dPt + k0w * LDQ, LDQ);
    detail::warp_ab_acc<T, DP, QC>(dVa + k0w * LDO, LDO, St + k0w * LDQ, LDQ, dOs, LDK);
    detail::warp_ab_acc<T, DP, QC, TC ? 2 : 1>(dKa + k0w * LDO, LDO, dPt + k0w * LDQ, LDQ, Qs, LDK, unscale);
  }
  detail::load_wait();  // nothing pending (no query chunk: the K and V tiles)
  __syncwarp();
  if (splits > 1) {  // per-split fp32 partials, summed in split order by attention_bwd_kv_reduce_kernel
    const int64_t elems = p.B * p.h * p.M * d;
    float* pk = g.kv_partial + split * elems + int64_t(bh) * p.M * d;
    float* pv = g.kv_partial + (splits + split) * elems + int64_t(bh) * p.M * d;
    for (int j = k0w; j < k0w + 16; ++j) {
      const int key = seg.key(k0 + j);
      if (key < 0) continue;
      for (int c = lane; c < d; c += 32) {
        pk[int64_t(key) * d + c] = dKa[j * LDO + c];
        pv[int64_t(key) * d + c] = dVa[j * LDO + c];
      }
    }
    return;
  }
  T* dk = static_cast<T*>(g.dk) + int64_t(bh) * p.M * d;
  T* dv = static_cast<T*>(g.dv) + int64_t(bh) * p.M * d;
  for (int j = k0w; j < k0w + 16; ++j) {
    const int key = seg.key(k0 + j);
    if (key < 0) continue;
    for (int c = lane; c < d; c += 32) {
      dk[int64_t(key) * d + c] = from_f<T>(dKa[j * LDO + c] * p.scale);
      dv[int64_t(key) * d + c] = from_f<T>(dVa[j * LDO + c]);
    }
  }
}

// dK = scale * sum over splits of the dK partials, dV likewise; splits in order (deterministic).
template <typename T>
__global__ void attention_bwd_kv_reduce_kernel(AttnParams p, AttnPlan plan, AttnBwdArgs g) {
  const int64_t elems = p.B * p.h * p.M * p.d;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= elems) return;
  float sk = 0.0f, sv = 0.0f;
  for (int64_t s = 0; s < plan.kv_splits; ++s) {
    sk += g.kv_partial[s * elems + i];
    sv += g.kv_partial[(plan.kv_splits + s) * elems + i];
  }
  static_cast<T*>(g.dk)[i] = from_f<T>(sk * p.scale);
  static_cast<T*>(g.dv)[i] = from_f<T>(sv);
}

// The prologue and shared-memory carving mirror attention_bwd_kv_kernel's on purpose, query-major
// instead of key-major: the two tiles' shapes and strides differ, so each kernel keeps its own.
template <typename T, int DP>
__global__ void __launch_bounds__(128, 1) attention_bwd_dq_kernel(AttnParams p, AttnPlan plan, AttnBwdArgs g) {
  constexpr bool TC = !std::is_same<T, float>::value;
  constexpr int LDK = DP + (TC ? 8 : 1), KT = kKeyTile, LDS = KT + 4, LDO = DP + 4;
  const int QTb = 16 * plan.dq_warps;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  const int subtiles = int(plan.dq_subtiles), per_bh = int(plan.segments) * subtiles;
  const int bh = int(blockIdx.x) / per_bh, rest = int(blockIdx.x) - bh * per_bh;
  const int seg_id = rest / subtiles, q0 = (rest - seg_id * subtiles) * QTb;
  const int b = bh / int(p.h), hh = bh - b * int(p.h), d = int(p.d);
  const detail::Segment seg(p, seg_id);

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* at = smem;
  T* Qs = detail::carve<T>(at, size_t(QTb) * LDK * sizeof(T));
  T* dOs = detail::carve<T>(at, size_t(QTb) * LDK * sizeof(T));
  T* Ks = detail::carve<T>(at, size_t(KT) * LDK * sizeof(T));
  T* Vs = detail::carve<T>(at, size_t(KT) * LDK * sizeof(T));
  float* S = detail::carve<float>(at, size_t(QTb) * LDS * 4);   // scores, then dS (T in place for TC)
  float* dP = detail::carve<float>(at, size_t(QTb) * LDS * 4);
  float* dQa = detail::carve<float>(at, size_t(QTb) * LDO * 4);
  float* L2 = detail::carve<float>(at, size_t(QTb) * 4);  // lse2
  float* Dr = detail::carve<float>(at, size_t(QTb) * 4);

  auto qtok = [&](int r) { return seg.query(q0 + r); };
  detail::load_tile_any<T, DP>(p.q_load, Qs, LDK, static_cast<const T*>(p.q), p.q_stride, b, hh, QTb, d, qtok);
  detail::load_tile_any<T, DP>(g.do_load, dOs, LDK, static_cast<const T*>(g.dout), g.do_stride, b, hh, QTb, d, qtok);
  const float* lse = p.lse + int64_t(bh) * p.N;
  const float* delta = g.delta + int64_t(bh) * p.N;
  for (int r = threadIdx.x; r < QTb; r += blockDim.x) {
    const int t = qtok(r);
    L2[r] = t >= 0 ? lse[t] * 1.4426950408889634f : INFINITY;
    Dr[r] = t >= 0 ? delta[t] : 0.0f;
  }
  for (int i = threadIdx.x; i < QTb * LDO; i += blockDim.x) dQa[i] = 0.0f;

  const float sl2 = p.scale * 1.4426950408889634f;
  const int ktiles = (seg.nk + KT - 1) / KT;
  for (int kt = 0; kt < ktiles; ++kt) {
    const int k0 = kt * KT;
    auto ktok = [&](int j) { return seg.key(k0 + j); };
    __syncthreads();  // previous K, V tiles fully read (and the setup above done)
    detail::load_tile_any<T, DP>(p.k_load, Ks, LDK, static_cast<const T*>(p.k), p.k_stride, b, hh, KT, d, ktok);
    detail::load_tile_any<T, DP>(p.v_load, Vs, LDK, static_cast<const T*>(p.v), p.v_stride, b, hh, KT, d, ktok);
    detail::load_wait();  // K and V of this tile (and, first time round, the Q and dO tiles)
    __syncthreads();
    detail::warp_abt<T, DP, KT>(S + r0 * LDS, LDS, Qs + r0 * LDK, LDK, Ks, LDK);
    detail::warp_abt<T, DP, KT>(dP + r0 * LDS, LDS, dOs + r0 * LDK, LDK, Vs, LDK);
    __syncwarp();
    bool valid[KT / 32];
#pragma unroll
    for (int t = 0; t < KT / 32; ++t) valid[t] = seg.key(k0 + lane + 32 * t) >= 0;
    for (int r = r0; r < r0 + 16; ++r) {
      float ds[KT / 32];
#pragma unroll
      for (int t = 0; t < KT / 32; ++t) {
        const int j = lane + 32 * t;
        const float pv = valid[t] ? exp2f(S[r * LDS + j] * sl2 - L2[r]) : 0.0f;
        ds[t] = pv * (dP[r * LDS + j] - Dr[r]);
      }
      __syncwarp();
      detail::put_row<float, KT / 32>(S + r * LDS, ds);  // narrowed by split_ds_tile
    }
    __syncwarp();
    float unscale = 1.0f;
    if constexpr (TC) unscale = detail::split_ds_tile<T, KT>(S + r0 * LDS, LDS);
    detail::warp_ab_acc<T, DP, KT, TC ? 2 : 1>(dQa + r0 * LDO, LDO, S + r0 * LDS, LDS, Ks, LDK, unscale);
  }
  detail::load_wait();  // nothing pending (no key tile: the Q and dO tiles)
  __syncwarp();
  T* dq = static_cast<T*>(g.dq) + int64_t(bh) * p.N * d;
  for (int r = r0; r < r0 + 16; ++r) {
    const int qt = seg.query(q0 + r);
    if (qt < 0) continue;
    for (int c = lane; c < d; c += 32) dq[int64_t(qt) * d + c] = from_f<T>(dQa[r * LDO + c] * p.scale);
  }
}

// Backward from the forward's g.out and p.lse: delta, dK/dV, dQ (g.delta and
// g.kv_partial are scratch; p.out is unused).
template <typename T, int DP>
cudaError_t attention_backward_launch(AttnParams p, const AttnPlan& plan, AttnBwdArgs g, cudaStream_t stream) {
  static int kv_set[64] = {}, dq_set[64] = {};
  if (plan.fwd_blocks == 0) return cudaSuccess;
  choose_load_modes<T>(p);
  g.do_load = choose_load_mode<T>(g.dout, g.do_stride);
  const int64_t rows = p.B * p.h * p.N;
  attention_bwd_delta_kernel<T><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(p, g);
  auto kv = attention_bwd_kv_kernel<T, DP>;
  cudaError_t err = ensure_smem(kv, plan.kv_smem, kv_set);
  if (err != cudaSuccess) return err;
  kv<<<unsigned(plan.kv_blocks), 32 * plan.kv_warps, plan.kv_smem, stream>>>(p, plan, g);
  if (plan.kv_splits > 1) {
    const int64_t elems = p.B * p.h * p.M * p.d;
    attention_bwd_kv_reduce_kernel<T><<<unsigned((elems + 255) / 256), 256, 0, stream>>>(p, plan, g);
  }
  auto dq = attention_bwd_dq_kernel<T, DP>;
  if ((err = ensure_smem(dq, plan.dq_smem, dq_set)) != cudaSuccess) return err;
  dq<<<unsigned(plan.dq_blocks), 32 * plan.dq_warps, plan.dq_smem, stream>>>(p, plan, g);
  return cudaGetLastError();
}

}  // namespace sgattn
