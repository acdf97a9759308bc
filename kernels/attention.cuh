// Fused attention with importance for any key count (flash-style).
//
// Forward (attention_fwd_kernel): one block = one tile of QT = 16 * warps
// queries of one (batch, head, segment); a segment is the whole sequence
// (global mode) or one w x w window (padded positions masked). The block loops
// over key tiles of 64 keys with an online softmax: scores S = Q K^T, running
// row max m and sum l, O = O * alpha + P V in an fp32 shared-memory
// accumulator; it writes out = O / l and the row log-sum-exp.
// Importance (attention_imp_kernel): a second, key-major pass recomputes the
// probabilities from the stored log-sum-exp, p = exp(s - lse), one block per
// (batch, head, segment, key tile, query split), and writes per-split column
// sums; importance_reduce_kernel sums them in a fixed order (deterministic,
// no atomics).
// fp16/bf16 use tensor cores (WMMA 16x16x16, fp32 accumulation); fp32 runs a
// SIMT path with the same staging. When a segment has a single key tile
// (plan.o_in_s: fp16/bf16, head dim <= 64, at most 64 keys: most SG-Former
// calls at 224), O = P V is accumulated in registers and stored over the
// score rows after the last read of P, so the block needs no O buffer (less
// shared memory, more resident blocks); the values are those of the general
// path (there O starts at +0 and alpha multiplies only zeros).
// Head dims up to 128 (zero-padded to DP).
// Index arithmetic is 32-bit (N, M < 2^31 and block counts < 2^31 are checked
// by the planner); element offsets are 64-bit.
#pragma once
#include <mma.h>

#include <type_traits>

#include "cuda_plan.h"
#include "sgattn_cuda_types.cuh"

namespace sgattn {

namespace detail {

// Local positions of one segment -> token index (-1: masked): the whole
// sequence (global mode) or one window, in 32-bit arithmetic.
struct Segment {
  Window<int> win;
  int nq, nk;
  bool windowed;
  __device__ Segment(const AttnParams& p, int seg) : win{0, 0, 0, 0, 0} {
    windowed = p.window > 0;
    if (windowed) {
      win = WindowGeom<int>(int(p.H), int(p.W), int(p.window)).window(seg);
      nq = nk = win.w * win.w;
    } else {
      nq = int(p.N); nk = int(p.M);
    }
  }
  __device__ int query(int l) const { return l >= nq ? -1 : (windowed ? win.token(l) : l); }
  __device__ int key(int l) const { return l >= nk ? -1 : (windowed ? win.token(l) : l); }
};

// rows x DP tile of (b, hh, token(r), c) into smem (row stride ld), zeros where masked or c >= d.
template <typename T, int DP, typename TokenFn>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, const int64_t* st, int b, int hh,
                                          int rows, int d, TokenFn token) {
  const T* base = src + b * st[0] + hh * st[1];
  for (int i = threadIdx.x; i < rows * DP; i += blockDim.x) {
    const int r = i / DP, c = i - r * DP;
    const int t = token(r);
    dst[r * ld + c] = (t >= 0 && c < d) ? base[t * st[2] + c * st[3]] : from_f<T>(0.0f);
  }
}

// Asynchronous tile loads (cp.async, sm_80+). Modes chosen on the host per tensor and per launch
// (choose_load_modes): kLoadSync = load_tile; kLoadAsync4 = one 4-byte cp.async per element (fp32);
// kLoadAsync16 = 16-byte cp.async.cg chunks of 8 fp16/bf16 elements (base pointer and the three
// outer strides multiples of 16 bytes, unit stride over the head dim). Masked rows and columns >= d
// are zero-filled by cp.async's src-size operand, so shared memory ends up bit-for-bit as load_tile
// leaves it. Every load is completed by load_wait() before the __syncthreads that publishes it.
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes, std::integral_constant<int, 4>) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes, std::integral_constant<int, 16>) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
#endif
}
// Waits for every cp.async this thread issued (a no-op when none is pending).
__device__ __forceinline__ void load_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// load_tile in the given mode (kLoadSync on architectures without cp.async); call load_wait() before use.
template <typename T, int DP, typename TokenFn>
__device__ __forceinline__ void load_tile_any(int mode, T* dst, int ld, const T* src, const int64_t* st, int b,
                                              int hh, int rows, int d, TokenFn token) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const T* base = src + b * st[0] + hh * st[1];
  if constexpr (sizeof(T) == 2) {
    if (mode == kLoadAsync16) {
      constexpr int V = 8, CH = DP / V;  // 16-byte chunks per row
      for (int i = threadIdx.x; i < rows * CH; i += blockDim.x) {
        const int r = i / CH, c = (i - r * CH) * V;
        const int t = token(r);
        const int n = t >= 0 ? max(0, min(V, d - c)) : 0;  // real elements of this chunk
        cp_async(dst + r * ld + c, n > 0 ? base + t * st[2] + c : base, n * 2, std::integral_constant<int, 16>{});
      }
      return;
    }
  } else {
    if (mode == kLoadAsync4) {
      for (int i = threadIdx.x; i < rows * DP; i += blockDim.x) {
        const int r = i / DP, c = i - r * DP;
        const int t = token(r);
        const bool ok = t >= 0 && c < d;
        cp_async(dst + r * ld + c, ok ? base + t * st[2] + c * st[3] : base, ok ? 4 : 0,
                 std::integral_constant<int, 4>{});
      }
      return;
    }
  }
#endif
  load_tile<T, DP>(dst, ld, src, st, b, hh, rows, d, token);
}

// A key-major kernel's block: (batch * head, segment, key tile, query split),
// linearised on grid.x in that order.
struct KeyBlock {
  int bh, seg, kt, split;
  __device__ KeyBlock(int segments, int ktiles, int splits) {
    const int per_bh = segments * ktiles * splits;
    bh = int(blockIdx.x) / per_bh;
    int rest = int(blockIdx.x) - bh * per_bh;
    seg = rest / (ktiles * splits);
    rest -= seg * ktiles * splits;
    kt = rest / splits;
    split = rest - kt * splits;
  }
};

template <typename T>
__device__ __forceinline__ T* carve(unsigned char*& at, size_t bytes) {
  T* p = reinterpret_cast<T*>(at);
  at += (bytes + 127) / 128 * 128;
  return p;
}

// The warp-level tile products of the attention kernels (forward, importance
// and backward): tensor cores (WMMA 16x16x16, fp32 accumulation) for fp16/bf16,
// SIMT for fp32. UNROLL unrolls the loop over 16-column output tiles (1: rolled,
// fewer registers). Every output element sums its products in the same order
// whatever UNROLL is.

// The fp32 (SIMT) product for one warp: C[16][COLS] = A[16][K] * op(B) (ACC:
// C +=), with op(B)[k][col] = B[col * ldb + k] (TRANS_B) or B[k * ldb + col];
// lanes own columns, each sum runs over k in order.
template <int COLS, int K, bool TRANS_B, bool ACC>
__device__ __forceinline__ void warp_simt(float* C, int ldc, const float* A, int lda, const float* B, int ldb) {
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < 16; ++r) {
#pragma unroll
    for (int t = 0; t < COLS / 32; ++t) {
      const int col = lane + 32 * t;
      float acc = 0.0f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) acc += A[r * lda + k] * (TRANS_B ? B[col * ldb + k] : B[k * ldb + col]);
      if (ACC) C[r * ldc + col] += acc;
      else C[r * ldc + col] = acc;
    }
  }
}

// C[16][NC] (fp32, ldc) = A[16][DP] * B[NC][DP]^T for one warp; A and B row-major T in smem.
template <typename T, int DP, int NC, int UNROLL = 1>
__device__ __forceinline__ void warp_abt(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
  using namespace nvcuda;
  if constexpr (!std::is_same<T, float>::value) {
#pragma unroll UNROLL
    for (int nt = 0; nt < NC / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, A + kk * 16, lda);
        wmma::load_matrix_sync(fb, B + nt * 16 * ldb + kk * 16, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(C + nt * 16, acc, ldc, wmma::mem_row_major);
    }
  } else {
    warp_simt<NC, DP, true, false>(C, ldc, A, lda, B, ldb);
  }
}

// C[16][DP] (fp32, ldc) += A[16][KC] * B[KC][DP] for one warp; A sits in an fp32
// buffer with row stride ldf floats, narrowed in place to T for tensor cores
// (row stride 2 * ldf elements); B row-major T in smem. PARTS = 2 (tensor cores):
// A is a split_ds_tile tile, C += (hi + lo) B * unscale.
template <typename T, int DP, int KC, int PARTS = 1, int UNROLL = 1>
__device__ __forceinline__ void warp_ab_acc(float* C, int ldc, const float* A, int ldf, const T* B, int ldb,
                                            float unscale = 1.0f) {
  using namespace nvcuda;
  if constexpr (!std::is_same<T, float>::value) {
    const T* At = reinterpret_cast<const T*>(A);
#pragma unroll UNROLL
    for (int nt = 0; nt < DP / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if constexpr (PARTS == 1) wmma::load_matrix_sync(acc, C + nt * 16, ldc, wmma::mem_row_major);
      else wmma::fill_fragment(acc, 0.0f);  // the scaled product, unscaled into C below
#pragma unroll
      for (int part = 0; part < PARTS; ++part) {
#pragma unroll
        for (int kk = 0; kk < KC / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, At + part * KC + kk * 16, 2 * ldf);
          wmma::load_matrix_sync(fb, B + kk * 16 * ldb + nt * 16, ldb);
          wmma::mma_sync(acc, fa, fb, acc);
        }
      }
      if constexpr (PARTS > 1) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf;  // same element mapping as acc
        wmma::load_matrix_sync(cf, C + nt * 16, ldc, wmma::mem_row_major);
#pragma unroll
        for (int i = 0; i < cf.num_elements; ++i) cf.x[i] += acc.x[i] * unscale;
        wmma::store_matrix_sync(C + nt * 16, cf, ldc, wmma::mem_row_major);
      } else {
        wmma::store_matrix_sync(C + nt * 16, acc, ldc, wmma::mem_row_major);
      }
    }
  } else {
    warp_simt<DP, KC, false, true>(C, ldc, A, ldf, B, ldb);
  }
}

}  // namespace detail

// Head dim 32 (every SG-Former call): at most 64 registers, so 8 blocks of 4 warps (50%) fit by registers
// wherever shared memory allows it (one key tile on sm_90); no spills on sm_80/sm_90 (CI gate).
template <typename T, int DP>
__global__ void __launch_bounds__(128, DP == 32 ? 8 : 1) attention_fwd_kernel(AttnParams p, AttnPlan plan) {
  using namespace nvcuda;
  constexpr bool TC = !std::is_same<T, float>::value;
  constexpr int LDK = DP + (TC ? 8 : 1);
  constexpr int KT = kKeyTile, LDS = KT + 4, LDO = DP + 4;
  const int QT = plan.QT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
  const int tiles = int(plan.segments * plan.subtiles);
  const int bh = int(blockIdx.x) / tiles, tile = int(blockIdx.x) - bh * tiles;
  const int b = bh / int(p.h), hh = bh - b * int(p.h);
  const int subtiles = int(plan.subtiles), seg_id = tile / subtiles;
  const int q0 = (tile - seg_id * subtiles) * QT;
  const detail::Segment seg(p, seg_id);
  const int d = int(p.d);

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* at = smem;
  T* Qs = detail::carve<T>(at, size_t(QT) * LDK * sizeof(T));
  T* KV = detail::carve<T>(at, size_t(KT) * LDK * sizeof(T));  // K tile, then V tile
  float* S = detail::carve<float>(at, size_t(QT) * LDS * 4);     // scores, then P (T in place for TC)
  const bool o_in_s = TC && DP <= LDS && plan.o_in_s != 0;        // O lands in S's rows (one key tile)
  float* O = S;
  if (!o_in_s) O = detail::carve<float>(at, size_t(QT) * LDO * 4);
  const int ldo = o_in_s ? LDS : LDO;
  float* Mrow = detail::carve<float>(at, size_t(QT) * 4);
  float* Lrow = detail::carve<float>(at, size_t(QT) * 4);

  auto qtok = [&](int r) { return seg.query(q0 + r); };
  detail::load_tile_any<T, DP>(p.q_load, Qs, LDK, static_cast<const T*>(p.q), p.q_stride, b, hh, QT, d, qtok);
  if (!o_in_s)
    for (int i = threadIdx.x; i < QT * LDO; i += blockDim.x) O[i] = 0.0f;
  for (int i = threadIdx.x; i < QT; i += blockDim.x) { Mrow[i] = -INFINITY; Lrow[i] = 0.0f; }

  const float sl2 = p.scale * 1.4426950408889634f;  // base-2 softmax of pre-scaled scores
  const int ktiles = (seg.nk + KT - 1) / KT;
  for (int kt = 0; kt < ktiles; ++kt) {
    const int k0 = kt * KT;
    auto ktok = [&](int j) { return seg.key(k0 + j); };
    __syncthreads();  // previous V tile fully read
    detail::load_tile_any<T, DP>(p.k_load, KV, LDK, static_cast<const T*>(p.k), p.k_stride, b, hh, KT, d, ktok);
    detail::load_wait();  // this K tile (and, first time round, the Q tile)
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    detail::warp_abt<T, DP, KT, KT / 16>(S + r0 * LDS, LDS, Qs + r0 * LDK, LDK, KV, LDK);
    // Every warp done with K (and its own S rows written): the V tile goes into the same buffer while
    // the softmax below runs (asynchronously with cp.async; it touches S, O, Mrow, Lrow only).
    __syncthreads();
    detail::load_tile_any<T, DP>(p.v_load, KV, LDK, static_cast<const T*>(p.v), p.v_stride, b, hh, KT, d, ktok);

    // Online softmax update of this warp's rows; P replaces S (as T for tensor cores).
    bool valid[KT / 32];
#pragma unroll
    for (int t = 0; t < KT / 32; ++t) valid[t] = seg.key(k0 + lane + 32 * t) >= 0;
    for (int r = r0; r < r0 + 16; ++r) {
      float e[KT / 32];
      float mt = -INFINITY;
#pragma unroll
      for (int t = 0; t < KT / 32; ++t) {
        e[t] = valid[t] ? S[r * LDS + lane + 32 * t] * sl2 : -INFINITY;
        mt = fmaxf(mt, e[t]);
      }
      mt = warp_max(mt);
      const float m_old = Mrow[r], m_new = fmaxf(m_old, mt);
      const bool none = m_new == -INFINITY;  // no valid key yet
      const float alpha = none ? 1.0f : exp2f(m_old - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < KT / 32; ++t) {
        e[t] = (none || !valid[t]) ? 0.0f : exp2f(e[t] - m_new);
        sum += e[t];
      }
      sum = warp_sum(sum);
      __syncwarp();  // all lanes read S row r and Mrow[r]
      if constexpr (TC) {
        T* prow = reinterpret_cast<T*>(S + r * LDS);
#pragma unroll
        for (int t = 0; t < KT / 32; ++t) prow[lane + 32 * t] = from_f<T>(e[t]);
      } else {
#pragma unroll
        for (int t = 0; t < KT / 32; ++t) S[r * LDS + lane + 32 * t] = e[t];
      }
      if (!o_in_s)  // (single key tile: O is +0 here and alpha is finite, so the product is +0)
        for (int c = lane; c < DP; c += 32) O[r * LDO + c] *= alpha;
      if (lane == 0) { Mrow[r] = m_new; Lrow[r] = Lrow[r] * alpha + sum; }
    }
    detail::load_wait();  // this V tile
    __syncthreads();

    // O += P V for this warp's rows.
    if constexpr (TC) {
      const T* P = reinterpret_cast<const T*>(S + r0 * LDS);
      if (o_in_s) {  // the only key tile: all of O in registers, stored over P once every read of P is done
        // Each acc[nt] takes the products of kk = 0, 1, ... in the same order as the general path.
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DP / 16];
#pragma unroll
        for (int nt = 0; nt < DP / 16; ++nt) wmma::fill_fragment(acc[nt], 0.0f);
#pragma unroll 1
        for (int kk = 0; kk < KT / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, P + kk * 16, 2 * LDS);
#pragma unroll
          for (int nt = 0; nt < DP / 16; ++nt) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, KV + kk * 16 * LDK + nt * 16, LDK);
            wmma::mma_sync(acc[nt], fa, fb, acc[nt]);
          }
        }
        __syncwarp();
#pragma unroll
        for (int nt = 0; nt < DP / 16; ++nt)
          wmma::store_matrix_sync(O + r0 * LDS + nt * 16, acc[nt], LDS, wmma::mem_row_major);
        continue;  // (the loop has no further key tile)
      }
    }
    detail::warp_ab_acc<T, DP, KT, 1, DP / 16>(O + r0 * LDO, LDO, S + r0 * LDS, LDS, KV, LDK);
  }
  detail::load_wait();  // nothing pending (no key tile: the Q tile)
  __syncwarp();

  // out = O / l (rows of this warp), lse = (m + log2 l) * ln 2.
  T* out = static_cast<T*>(p.out) + int64_t(bh) * p.N * d;
  for (int r = r0; r < r0 + 16; ++r) {
    const int qt = seg.query(q0 + r);
    if (qt < 0) continue;
    const float l = Lrow[r], inv = 1.0f / l;
    for (int c = lane; c < d; c += 32) out[int64_t(qt) * d + c] = from_f<T>(O[r * ldo + c] * inv);
    if (lane == 0) p.lse[int64_t(bh) * p.N + qt] = (Mrow[r] + log2f(l)) * 0.6931471805599453f;
  }
}

// Key-major importance pass: partial[b, hh * splits + split, col] = sum over
// this split's queries of exp(s - lse), for the 64 keys of one key tile.
template <typename T, int DP>
__global__ void __launch_bounds__(128, 1) attention_imp_kernel(AttnParams p, AttnPlan plan, float* partial) {
  constexpr bool TC = !std::is_same<T, float>::value;
  constexpr int LDK = DP + (TC ? 8 : 1);
  constexpr int KT = kKeyTile, QC = kQueryChunk, LDS = QC + 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, k0w = warp * 16;
  const int splits = int(plan.splits);
  const detail::KeyBlock kb(int(plan.segments), int(plan.ktiles), splits);
  const int bh = kb.bh, seg_id = kb.seg, kt = kb.kt, split = kb.split;
  const int b = bh / int(p.h), hh = bh - b * int(p.h);
  const detail::Segment seg(p, seg_id);
  const int d = int(p.d), k0 = kt * KT;

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* at = smem;
  T* Ks = detail::carve<T>(at, size_t(KT) * LDK * sizeof(T));
  T* Qs = detail::carve<T>(at, size_t(QC) * LDK * sizeof(T));
  float* St = detail::carve<float>(at, size_t(KT) * LDS * 4);  // [key][query]
  float* L2 = detail::carve<float>(at, size_t(QC) * 4);          // lse in log2 units (+inf: masked query)
  float* Acc = detail::carve<float>(at, size_t(KT) * 4);          // column sums

  auto ktok = [&](int j) { return seg.key(k0 + j); };
  detail::load_tile_any<T, DP>(p.k_load, Ks, LDK, static_cast<const T*>(p.k), p.k_stride, b, hh, KT, d, ktok);
  for (int i = threadIdx.x; i < KT; i += blockDim.x) Acc[i] = 0.0f;

  const float sl2 = p.scale * 1.4426950408889634f;
  const float* lse = p.lse + int64_t(bh) * p.N;
  const int qbeg = split * int(plan.split_queries);
  const int qend = min(seg.nq, qbeg + int(plan.split_queries));
  for (int c0 = qbeg; c0 < qend; c0 += QC) {
    auto qtok = [&](int r) { return c0 + r < qend ? seg.query(c0 + r) : -1; };
    __syncthreads();  // previous chunk fully read
    detail::load_tile_any<T, DP>(p.q_load, Qs, LDK, static_cast<const T*>(p.q), p.q_stride, b, hh, QC, d, qtok);
    for (int r = threadIdx.x; r < QC; r += blockDim.x) {
      const int t = qtok(r);
      L2[r] = t >= 0 ? lse[t] * 1.4426950408889634f : INFINITY;
    }
    detail::load_wait();  // this Q chunk (and, first time round, the K tile)
    __syncthreads();
    // St rows [k0w, k0w + 16) = K Q^T for this warp's 16 keys.
    detail::warp_abt<T, DP, QC>(St + k0w * LDS, LDS, Ks + k0w * LDK, LDK, Qs, LDK);
    __syncwarp();
    // Column sums in a fixed order: lanes over queries, a warp tree, then chunk by chunk.
    for (int j = k0w; j < k0w + 16; ++j) {
      float s = 0.0f;
#pragma unroll
      for (int t = 0; t < QC / 32; ++t) {
        const int r = lane + 32 * t;
        s += exp2f(St[j * LDS + r] * sl2 - L2[r]);
      }
      s = warp_sum(s);
      if (lane == 0) Acc[j] += s;
    }
  }
  detail::load_wait();  // nothing pending (no query chunk: the K tile)
  __syncthreads();
  float* dst = partial + (int64_t(bh) * splits + split) * plan.ncols;
  for (int j = threadIdx.x; j < KT; j += blockDim.x) {
    const int col = seg.key(k0 + j);
    if (col >= 0) dst[col] = Acc[j];
  }
}

// importance[b, col] = (sum over heads and query splits of the partials) / count,
// count = h * N (global) or h * real queries of col's window.
__global__ void importance_reduce_kernel(const float* partial, float* importance, AttnParams p, AttnPlan plan) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * plan.ncols) return;
  const int64_t b = i / plan.ncols, col = i - b * plan.ncols, T = p.h * plan.splits;
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

// Load mode of one [B, h, rows, d] input (host side, per launch): 16-byte cp.async for fp16/bf16
// when the base pointer is 16-byte aligned, the head dim has unit stride and the batch, head and
// row strides are multiples of 8 elements (every 8-element chunk of a row then starts on a 16-byte
// boundary); 4-byte cp.async for 4-byte aligned fp32; element loads otherwise.
template <typename T>
int choose_load_mode(const void* ptr, const int64_t* st) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  if (sizeof(T) == 4) return a % 4 == 0 ? kLoadAsync4 : kLoadSync;
  if (sizeof(T) == 2 && a % 16 == 0 && st[3] == 1 && st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0)
    return kLoadAsync16;
  return kLoadSync;
}
template <typename T>
void choose_load_modes(AttnParams& p) {
  p.q_load = choose_load_mode<T>(p.q, p.q_stride);
  p.k_load = choose_load_mode<T>(p.k, p.k_stride);
  p.v_load = choose_load_mode<T>(p.v, p.v_stride);
}

// Raises the kernel's dynamic shared-memory limit once per device (cached).
template <typename Kernel>
cudaError_t ensure_smem(Kernel kernel, size_t smem, int* done_per_device) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (done_per_device[dev] >= int(smem)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess) done_per_device[dev] = int(smem);  // benign race: a repeated set is harmless
  return err;
}

// partial: plan.partial_elems fp32 scratch and importance [B, ncols], or both null.
template <typename T, int DP>
cudaError_t attention_forward_launch(AttnParams p, const AttnPlan& plan, float* partial, float* importance,
                                     cudaStream_t stream) {
  static int fwd_set[64] = {}, imp_set[64] = {};
  if (plan.fwd_blocks == 0) return cudaSuccess;
  choose_load_modes<T>(p);
  auto fwd = attention_fwd_kernel<T, DP>;
  cudaError_t err = ensure_smem(fwd, plan.smem, fwd_set);
  if (err != cudaSuccess) return err;
  fwd<<<unsigned(plan.fwd_blocks), 32 * plan.warps, plan.smem, stream>>>(p, plan);
  err = cudaGetLastError();
  if (err != cudaSuccess || partial == nullptr) return err;
  auto imp = attention_imp_kernel<T, DP>;
  err = ensure_smem(imp, plan.imp_smem, imp_set);
  if (err != cudaSuccess) return err;
  imp<<<unsigned(plan.imp_blocks), 32 * kImpWarps, plan.imp_smem, stream>>>(p, plan, partial);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n = p.B * plan.ncols;
  importance_reduce_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(partial, importance, p, plan);
  return cudaGetLastError();
}

}  // namespace sgattn
