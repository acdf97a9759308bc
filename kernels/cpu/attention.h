// Framework-free CPU attention tile kernels (no torch headers): fp32 tiles
// given by pointers, leading dimensions and sizes. The drivers in
// attention_driver.h own the scratch and the parallel partition and call
// these. GEMMs go to the machine's BLAS (sgemm_) when the process has one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

// Column-major single-precision GEMM of the BLAS (Fortran calling convention);
// weak: null when no loaded library provides it (gemm_cm then loops).
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace sgattn::cpu {

// 8-lane float vector (GCC/Clang vector extension): AVX with -march=native,
// lowered to SSE pairs otherwise. Unaligned loads/stores through memcpy.
typedef float v8f __attribute__((vector_size(32)));
inline v8f ld8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8f splat(float x) { return v8f{} + x; }

// a * b + c, fused where the target has FMA (-std=c++20 does not contract
// a * b + c by itself). Fixed per build: results do not depend on threads.
inline v8f fmadd(v8f a, v8f b, v8f c) {
#if defined(__FMA__) && defined(__AVX__)
  return reinterpret_cast<v8f>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                               reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// exp(x) for x <= 0 (softmax arguments), 8 lanes at a time: std::exp stays
// scalar without -ffast-math. Cephes expf polynomial, ~1 ulp; arguments below
// -87 flush to ~1e-38. n = round(x log2 e) with the 1.5 * 2^23 shifter.
inline v8f exp8_nonpos(v8f x) {
  const v8f lo = splat(-87.0f);
  x = x < lo ? lo : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const v8f t = fmadd(x, splat(1.44269504088896341f), splat(shifter));
  const v8f fn = t - shifter;
  const v8i n = reinterpret_cast<v8i>(t) - reinterpret_cast<v8i>(splat(shifter));
  v8f r = fmadd(fn, splat(-0.693359375f), x);
  r = fmadd(fn, splat(2.12194440e-4f), r);
  const v8f z = r * r;
  v8f y = splat(1.9875691500e-4f);
  y = fmadd(y, r, splat(1.3981999507e-3f));
  y = fmadd(y, r, splat(8.3334519073e-3f));
  y = fmadd(y, r, splat(4.1665795894e-2f));
  y = fmadd(y, r, splat(1.6666665459e-1f));
  y = fmadd(y, r, splat(5.0000001201e-1f));
  y = fmadd(y, z, r + 1.0f);
  return y * reinterpret_cast<v8f>((n + 127) << 23);
}

// Column counts of the fp32 scratch tiles are padded to 16 (two vectors).
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// Column-major single-precision GEMM, BLAS semantics:
// C[m x n] = alpha * op(A)[m x k] . op(B)[k x n] + beta * C (C is overwritten when beta == 0).
// The machine's BLAS (sgemm_, exported by libtorch_cpu: MKL on x86 wheels, as
// PyTorch's own CPU flash attention uses through cpublas) when the process has
// it; a plain loop otherwise. Every call runs inside the drivers' parallel
// regions (or with one thread), where the BLAS runs sequentially, on operands
// whose sizes and alignment depend on the shapes only: results do not depend
// on the thread count.
inline void gemm_cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (sgemm_) {
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(std::max<int64_t>(k, 1));
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    const char* tA = ta ? "T" : "N";
    const char* tB = tb ? "T" : "N";
    if (k <= 0) alpha = 0.0f;
    sgemm_(tA, tB, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0.0f;
      for (int64_t l = 0; l < k; ++l)
        acc += (ta ? a[i * lda + l] : a[l * lda + i]) * (tb ? b[l * ldb + j] : b[j * ldb + l]);
      c[j * ldc + i] = alpha * acc + (beta == 0.0f ? 0.0f : beta * c[j * ldc + i]);
    }
  }
}

// Row-major helpers: C[m][n] (ld ldc) = alpha * A[m][k] . B[k][n] + beta * C,
// with A given as stored rows (ta: A is stored as [k][m]) and B likewise (tb: [n][k]).
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // Row-major C = A B is column-major C^T = B^T A^T.
  gemm_cm(tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// C[R][0:ncols] = A[R][0:K] . Bm[K][0:ncols] (row-major, ncols a multiple of
// 16): a 4 x 16 register tile, so each loaded row of Bm serves R rows.
template <int R, bool ACC>
inline void gemm_rows(const float* A, int64_t lda, int64_t K, const float* Bm, int64_t ldb,
                      int64_t ncols, float* C, int64_t ldc) {
  for (int64_t j = 0; j < ncols; j += 16) {
    v8f acc[R][2] = {};
    if (ACC) {
      for (int r = 0; r < R; ++r) {
        acc[r][0] = ld8(C + r * ldc + j);
        acc[r][1] = ld8(C + r * ldc + j + 8);
      }
    }
    for (int64_t c = 0; c < K; ++c) {
      const v8f b0 = ld8(Bm + c * ldb + j), b1 = ld8(Bm + c * ldb + j + 8);
      for (int r = 0; r < R; ++r) {
        const float a = A[r * lda + c];
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      st8(C + r * ldc + j, acc[r][0]);
      st8(C + r * ldc + j + 8, acc[r][1]);
    }
  }
}

// C[nrows][ncols] = A[nrows][K] . Bm[K][ncols] (ACC: C += ...).
template <bool ACC = false>
inline void gemm(const float* A, int64_t lda, int64_t nrows, int64_t K, const float* Bm, int64_t ldb,
                 int64_t ncols, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= nrows; i += 4) gemm_rows<4, ACC>(A + i * lda, lda, K, Bm, ldb, ncols, C + i * ldc, ldc);
  for (; i < nrows; ++i) gemm_rows<1, ACC>(A + i * lda, lda, K, Bm, ldb, ncols, C + i * ldc, ldc);
}

// Exact softmax of each score row S[i][0:nk] in place (padding [nk, nkp) set
// to zero), its row log-sum-exp lse[i] and optional column sums (colsum has nkp entries).
// With row_inv the rows are left unnormalised, exp(s - max), and row_inv[i] =
// 1 / sum: the caller scales P.V's rows instead, and the tile is not written
// a third time (the column sums, if asked for, only read it).
// MASKED: scores of -inf (keys the query does not see) get probability 0 (not
// exp's flush value), and a row with no finite score is 0 with lse -inf
// (row_inv 0). row_w (row_inv's path): row i adds row_w[i] * P[i] to colsum.
template <bool MASKED = false>
inline void softmax_rows(float* S, int64_t nq, int64_t nk, int64_t nkp, float* lse, float* colsum,
                         float* row_inv = nullptr, const float* row_w = nullptr) {
  const int64_t nk8 = nk / 8 * 8;
  const v8f ninf = splat(-INFINITY);
  for (int64_t i = 0; i < nq; ++i) {
    float* s = S + i * nkp;
    v8f vm = splat(s[0]);
    for (int64_t j = 0; j < nk8; j += 8) {
      const v8f x = ld8(s + j);
      vm = x > vm ? x : vm;
    }
    float mx = s[0];
    for (int l = 0; l < 8; ++l) mx = std::max(mx, vm[l]);
    for (int64_t j = nk8; j < nk; ++j) mx = std::max(mx, s[j]);
    if (MASKED && mx == -INFINITY) {  // the query sees no key
      std::fill(s, s + nkp, 0.0f);
      lse[i] = -INFINITY;
      if (row_inv) row_inv[i] = 0.0f;
      continue;
    }
    v8f vsum{};
    for (int64_t j = 0; j < nkp; j += 8) {
      const v8f x = ld8(s + j);
      v8f e = exp8_nonpos(x - mx);
      if (MASKED) e = x == ninf ? v8f{} : e;
      if (j + 8 > nk) {  // padded keys take no part in the sum nor in P.V
        for (int l = 0; l < 8; ++l) e[l] = j + l < nk ? e[l] : 0.0f;
      }
      st8(s + j, e);
      vsum += e;
    }
    float sum = 0.0f;
    for (int l = 0; l < 8; ++l) sum += vsum[l];
    const float inv = 1.0f / sum;
    if (row_inv) {
      row_inv[i] = inv;
      if (colsum && !(row_w && row_w[i] == 0.0f)) {
        const v8f vinv = splat(row_w ? inv * row_w[i] : inv);
        for (int64_t j = 0; j < nkp; j += 8) st8(colsum + j, fmadd(ld8(s + j), vinv, ld8(colsum + j)));
      }
    } else if (colsum) {
      for (int64_t j = 0; j < nkp; j += 8) {
        const v8f p = ld8(s + j) * inv;
        st8(s + j, p);
        st8(colsum + j, ld8(colsum + j) + p);
      }
    } else {
      for (int64_t j = 0; j < nkp; j += 8) st8(s + j, ld8(s + j) * inv);
    }
    lse[i] = mx + std::log(sum);
  }
}

// The forward's probabilities from its row log-sum-exp, in place and in one
// pass: P[i][j] = exp(S[i][j] - lse[i]) for j < nk, padding [nk, nkp) zero.
// MASKED: scores of -inf and rows of lse -inf (no key seen) give 0.
template <bool MASKED = false>
inline void probs_from_lse(float* S, int64_t nq, int64_t nk, int64_t nkp, const float* lse) {
  const v8f ninf = splat(-INFINITY);
  for (int64_t i = 0; i < nq; ++i) {
    float* s = S + i * nkp;
    if (MASKED && lse[i] == -INFINITY) {
      std::fill(s, s + nkp, 0.0f);
      continue;
    }
    const v8f l = splat(lse[i]);
    for (int64_t j = 0; j < nkp; j += 8) {
      const v8f x = ld8(s + j);
      v8f e = exp8_nonpos(x - l);
      if (MASKED) e = x == ninf ? v8f{} : e;
      if (j + 8 > nk) {
        for (int t = 0; t < 8; ++t) e[t] = j + t < nk ? e[t] : 0.0f;
      }
      st8(s + j, e);
    }
  }
}

// One tile: nq queries Q [nq][ldq] (already multiplied by scale) against nk keys
// Kt [d][nkp] and values V [nkp][dvp] (padding zero-filled); exact softmax over
// the whole key row (the S block is nq x nkp, never N x M). Writes O [nq][dvp]
// and lse [nq]; adds the column sums of P to colsum if given.
inline void tile_forward(const float* Q, int64_t ldq, int64_t nq, int64_t d, const float* Kt, const float* V, int64_t nk,
                  int64_t nkp, int64_t dvp, float* S, float* O, float* lse, float* colsum) {
  gemm(Q, ldq, nq, d, Kt, nkp, nkp, S, nkp);
  softmax_rows(S, nq, nk, nkp, lse, colsum);
  gemm(S, nkp, nq, nkp, V, dvp, dvp, O, dvp);
}

// dst[j][i] = src[i][j] for i < rows, j < cols.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// Backward of one tile from the forward's row log-sum-exp lse [nq]: P = exp(s - lse),
// one pass; D = rowsum(P * dP) of the tile, as in the reference's softmax
// backward (rowsum(dO * O), from the output rounded to its dtype, does not
// cancel where the reference does: a single key gets a nonzero dq). Qs [nq][dp] (scaled by scale),
// K [nkp][dp], Kt [d][nkp], Vt [dv][nkp], dO [nq][dvp], padding zero.
// Writes dQ [nq][dp]; accumulates dK [nkp][dp] and dV [nkp][dvp].
// Scratch: P, dP [nq][nkp], Tr [nkp][nq].
inline void tile_backward(int64_t nq, int64_t nk, int64_t nkp, int64_t d, int64_t dp, int64_t dv, int64_t dvp, float scale,
                   const float* Qs, const float* K, const float* Kt, const float* Vt, const float* dO, const float* lse,
                   float* P, float* dP, float* Tr, float* dQ, float* dK, float* dV) {
  gemm(Qs, dp, nq, d, Kt, nkp, nkp, P, nkp);
  probs_from_lse(P, nq, nk, nkp, lse);
  gemm(dO, dvp, nq, dv, Vt, nkp, nkp, dP, nkp);
  for (int64_t i = 0; i < nq; ++i) {  // dS = P * (dP - rowsum(P * dP)), in dP
    const float* p = P + i * nkp;
    float* g = dP + i * nkp;
    float D = 0.0f;
#pragma omp simd reduction(+ : D)
    for (int64_t j = 0; j < nkp; ++j) D += p[j] * g[j];
#pragma omp simd
    for (int64_t j = 0; j < nkp; ++j) g[j] = p[j] * (g[j] - D);
  }
  gemm(dP, nkp, nq, nkp, K, dp, dp, dQ, dp);
  for (int64_t e = 0; e < nq * dp; ++e) dQ[e] *= scale;
  transpose(dP, nkp, nq, nk, Tr, nq);
  gemm<true>(Tr, nq, nk, nq, Qs, dp, dp, dK, dp);  // Qs carries the scale
  transpose(P, nkp, nq, nk, Tr, nq);
  gemm<true>(Tr, nq, nk, nq, dO, dvp, dvp, dV, dvp);
}

// Backward of one tile with BLAS GEMMs (global mode) from the forward's row
// log-sum-exp lse [nq] (as tile_backward). Qs [nq][dp] (scaled by
// scale), K [nk] rows of ldk, V [nk] rows of ldv, dO [nq][dvp]. Writes dQ
// [nq][dp]; accumulates dK [nk][dp] and dV [nk][dvp] (kv_beta = 1), or
// overwrites them (kv_beta = 0: their old contents, even garbage, are not read).
// Scratch P, dP [nq][nkp].
// mask(P), if given, sets the scores of keys a query does not see to -inf.
template <typename Mask = std::nullptr_t>
inline void tile_backward_blas(int64_t nq, int64_t nk, int64_t nkp, int64_t d, int64_t dp, int64_t dv, int64_t dvp,
                        float scale, const float* Qs, const float* K, int64_t ldk, const float* V, int64_t ldv,
                        const float* dO, const float* lse, float* P, float* dP, float* dQ, float* dK, float* dV,
                        float kv_beta = 1.0f, const Mask& mask = nullptr) {
  gemm_rm(false, true, nq, nk, d, 1.0f, Qs, dp, K, ldk, 0.0f, P, nkp);
  constexpr bool masked = !std::is_same_v<Mask, std::nullptr_t>;
  if constexpr (masked) mask(P);
  probs_from_lse<masked>(P, nq, nk, nkp, lse);
  gemm_rm(false, true, nq, nk, dv, 1.0f, dO, dvp, V, ldv, 0.0f, dP, nkp);
  for (int64_t i = 0; i < nq; ++i) {  // dS = P * (dP - rowsum(P * dP)), in dP
    const float* p = P + i * nkp;
    float* g = dP + i * nkp;
    v8f vD{};
    const int64_t nk8 = nk / 8 * 8;
    for (int64_t j = 0; j < nk8; j += 8) vD += ld8(p + j) * ld8(g + j);
    float D = 0.0f;
    for (int l = 0; l < 8; ++l) D += vD[l];
    for (int64_t j = nk8; j < nk; ++j) D += p[j] * g[j];
    for (int64_t j = 0; j < nk8; j += 8) st8(g + j, ld8(p + j) * (ld8(g + j) - D));
    for (int64_t j = nk8; j < nk; ++j) g[j] = p[j] * (g[j] - D);
  }
  gemm_rm(false, false, nq, d, nk, scale, dP, nkp, K, ldk, 0.0f, dQ, dp);
  gemm_rm(true, false, nk, d, nq, 1.0f, dP, nkp, Qs, dp, kv_beta, dK, dp);  // Qs carries the scale
  gemm_rm(true, false, nk, dv, nq, 1.0f, P, nkp, dO, dvp, kv_beta, dV, dvp);
}

}  // namespace sgattn::cpu
