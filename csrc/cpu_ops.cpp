// CPU (OpenMP) implementation of sgattn's native ops, registered with
// TORCH_LIBRARY. Schemas and names come from the header setup.py generates
// from sgattn/_ops_names.py. Light headers only (no torch/extension.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <Python.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sgattn_common.h"
#include "sgattn_op_schemas.h"

namespace {

using sgattn::ReallocPlan;
using sgattn::WindowGeom;

// Calls f(T{}) with T the C++ type of a floating dtype.
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

// 8-lane float vector (GCC/Clang vector extension): AVX with -march=native,
// lowered to SSE pairs otherwise. Unaligned loads/stores through memcpy.
typedef float v8f __attribute__((vector_size(32)));
inline v8f ld8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8f splat(float x) { return v8f{} + x; }

// exp(x) for x <= 0 (softmax arguments), 8 lanes at a time: std::exp stays
// scalar without -ffast-math. Cephes expf polynomial, ~1 ulp; arguments below
// -87 flush to ~1e-38.
inline v8f exp8_nonpos(v8f x) {
  const v8f lo = splat(-87.0f);
  x = x < lo ? lo : x;
  v8f fx = x * 1.44269504088896341f + 0.5f;
  v8i n = __builtin_convertvector(fx, v8i);  // truncation; fix up to floor below
  v8f fn = __builtin_convertvector(n, v8f);
  const v8i gt = fn > fx;  // -1 where truncation rounded up
  n += gt;
  fn = __builtin_convertvector(n, v8f);
  const v8f r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  const v8f z = r * r;
  v8f y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  return y * reinterpret_cast<v8f>((n + 127) << 23);
}

// Column counts of the fp32 scratch tiles are padded to 16 (two vectors).
inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

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
// to zero); optional row log-sum-exp and column sums.
void softmax_rows(float* S, int64_t nq, int64_t nk, int64_t nkp, float* lse, float* colsum) {
  for (int64_t i = 0; i < nq; ++i) {
    float* s = S + i * nkp;
    float mx = s[0];
    for (int64_t j = 1; j < nk; ++j) mx = std::max(mx, s[j]);
    v8f vsum{};
    for (int64_t j = 0; j < nkp; j += 8) {
      v8f e = exp8_nonpos(ld8(s + j) - mx);
      if (j + 8 > nk) {  // padded keys take no part in the sum nor in P.V
        for (int l = 0; l < 8; ++l) e[l] = j + l < nk ? e[l] : 0.0f;
      }
      st8(s + j, e);
      vsum += e;
    }
    float sum = 0.0f;
    for (int l = 0; l < 8; ++l) sum += vsum[l];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < nkp; j += 8) st8(s + j, ld8(s + j) * inv);
    if (lse) lse[i] = mx + std::log(sum);
    if (colsum) {
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) colsum[j] += s[j];
    }
  }
}

// One tile: nq queries Q [nq][ldq] (already multiplied by scale) against nk keys
// Kt [d][nkp] and values V [nkp][dvp] (padding zero-filled); exact softmax over
// the whole key row (the S block is nq x nkp, never N x M). Writes O [nq][dvp]
// and lse [nq]; adds the column sums of P to colsum if given.
void tile_forward(const float* Q, int64_t ldq, int64_t nq, int64_t d, const float* Kt, const float* V, int64_t nk,
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

// Backward of one tile by recomputation. Qs [nq][dp] (scaled by scale),
// K [nkp][dp], Kt [d][nkp], Vt [dv][nkp], dO [nq][dvp], padding zero.
// Writes dQ [nq][dp]; accumulates dK [nkp][dp] and dV [nkp][dvp].
// Scratch: P, dP [nq][nkp], Tr [nkp][nq].
void tile_backward(int64_t nq, int64_t nk, int64_t nkp, int64_t d, int64_t dp, int64_t dv, int64_t dvp, float scale,
                   const float* Qs, const float* K, const float* Kt, const float* Vt, const float* dO, float* P,
                   float* dP, float* Tr, float* dQ, float* dK, float* dV) {
  gemm(Qs, dp, nq, d, Kt, nkp, nkp, P, nkp);
  softmax_rows(P, nq, nk, nkp, nullptr, nullptr);
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

// A [B, h, L, c] view given by pointer and element strides.
template <typename T>
struct View4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  View4(const at::Tensor& t)
      : p(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* row(int64_t b, int64_t h, int64_t n) const { return p + b * s0 + h * s1 + n * s2; }
};

// Gathers rows `tok` of (b, h) as fp32, times mul: row-major dst[i * ld + e],
// or transposed dst[e * ld + i]. The caller zero-fills padding.
template <typename T>
void gather_rows(const View4<T>& v, int64_t b, int64_t h, const int64_t* tok, int64_t n, int64_t c,
                 float mul, float* dst, int64_t ld, bool transpose) {
  for (int64_t i = 0; i < n; ++i) {
    const T* src = v.row(b, h, tok[i]);
    if (v.s3 == 1 && !transpose) {  // the common layout: a contiguous row, vectorised convert
      float* d = dst + i * ld;
#pragma omp simd
      for (int64_t e = 0; e < c; ++e) d[e] = static_cast<float>(src[e]) * mul;
    } else if (transpose) {
      for (int64_t e = 0; e < c; ++e) dst[e * ld + i] = static_cast<float>(src[e * v.s3]) * mul;
    } else {
      for (int64_t e = 0; e < c; ++e) dst[i * ld + e] = static_cast<float>(src[e * v.s3]) * mul;
    }
  }
}

template <typename T>
void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                       int64_t window, int64_t H, int64_t W, bool need_imp, at::Tensor& out,
                       at::Tensor& lse, at::Tensor& imp) {
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t M = k.size(2), dv = v.size(3);
  const float scale = static_cast<float>(scale_d);
  const View4<T> Q(q), K(k), V(v);
  T* o = out.data_ptr<T>();  // contiguous [B, h, N, dv]
  float* l = lse.data_ptr<float>();  // contiguous [B, h, N]
  const int nthreads = omp_get_max_threads();

  // Writes one tile's rows back (out in T, lse fp32).
  const int64_t dvp = pad16(dv);
  auto store = [&](int64_t b, int64_t hh, const int64_t* tok, int64_t nq, const float* O, const float* L) {
    for (int64_t i = 0; i < nq; ++i) {
      T* dst = o + ((b * h + hh) * N + tok[i]) * dv;
      for (int64_t c = 0; c < dv; ++c) dst[c] = static_cast<T>(O[i * dvp + c]);
      l[(b * h + hh) * N + tok[i]] = L[i];
    }
  };

  if (window == 0) {
    // Tasks (b, query block); heads loop inside so a task owns its importance partial.
    const int64_t want = std::max<int64_t>(1, (B * N) / (4 * nthreads));
    const int64_t QB = std::clamp<int64_t>(want, 16, 64);
    const int64_t nqb = (N + QB - 1) / QB;
    std::vector<float> partial(need_imp ? B * nqb * M : 0);
#pragma omp parallel
    {
      const int64_t Mp = pad16(M);
      std::vector<float> Kt(d * Mp, 0.0f), Vf(Mp * dvp, 0.0f), Qs(QB * d), S(QB * Mp), O(QB * dvp), L(QB);
      std::vector<int64_t> tok(std::max(M, QB));
#pragma omp for schedule(static)
      for (int64_t task = 0; task < B * nqb; ++task) {
        const int64_t b = task / nqb, i0 = (task % nqb) * QB, nq = std::min(QB, N - i0);
        float* colsum = need_imp ? partial.data() + task * M : nullptr;
        for (int64_t hh = 0; hh < h; ++hh) {
          for (int64_t j = 0; j < M; ++j) tok[j] = j;
          // Padding stays zero: every (b, h) fills the same M real columns/rows.
          gather_rows(K, b, hh, tok.data(), M, d, 1.0f, Kt.data(), Mp, true);
          gather_rows(V, b, hh, tok.data(), M, dv, 1.0f, Vf.data(), dvp, false);
          for (int64_t i = 0; i < nq; ++i) tok[i] = i0 + i;
          gather_rows(Q, b, hh, tok.data(), nq, d, scale, Qs.data(), d, false);
          tile_forward(Qs.data(), d, nq, d, Kt.data(), Vf.data(), M, Mp, dvp, S.data(), O.data(), L.data(),
                       colsum);
          store(b, hh, tok.data(), nq, O.data(), L.data());
        }
      }
    }
    if (need_imp) {
      // Fixed-order reduction of the per-block partials: deterministic.
      float* dst = imp.data_ptr<float>();
      const float inv = 1.0f / static_cast<float>(h * N);
#pragma omp parallel for schedule(static)
      for (int64_t bj = 0; bj < B * M; ++bj) {
        const int64_t b = bj / M, j = bj % M;
        float acc = 0.0f;
        for (int64_t t = 0; t < nqb; ++t) acc += partial[(b * nqb + t) * M + j];
        dst[bj] = acc * inv;
      }
    }
    return;
  }

  // Window mode: tasks (b, window); only the real tokens of a window take part,
  // which is exactly the reference's masking of padded queries and keys.
  const WindowGeom geo(H, W, window);
  const int64_t nW = geo.num_windows(), Lmax = geo.size();
  float* dst = need_imp ? imp.data_ptr<float>() : nullptr;
#pragma omp parallel
  {
    const int64_t Lp = pad16(Lmax);
    std::vector<float> Kt(d * Lp), Vf(Lp * dvp), Qs(Lmax * d), S(Lmax * Lp), O(Lmax * dvp), L(Lmax),
        colsum(Lmax);
    std::vector<int64_t> tok(Lmax);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * nW; ++task) {
      const int64_t b = task / nW, win = task % nW;
      int64_t n = 0;
      for (int64_t l = 0; l < Lmax; ++l) {
        const int64_t t = geo.token(win, l);
        if (t >= 0) tok[n++] = t;
      }
      std::fill(colsum.begin(), colsum.end(), 0.0f);
      for (int64_t hh = 0; hh < h; ++hh) {
        // Edge windows have fewer real tokens: clear what an earlier window left.
        const int64_t np = pad16(n);
        std::fill(Kt.begin(), Kt.end(), 0.0f);
        std::fill(Vf.begin(), Vf.end(), 0.0f);
        gather_rows(K, b, hh, tok.data(), n, d, 1.0f, Kt.data(), np, true);
        gather_rows(V, b, hh, tok.data(), n, dv, 1.0f, Vf.data(), dvp, false);
        gather_rows(Q, b, hh, tok.data(), n, d, scale, Qs.data(), d, false);
        tile_forward(Qs.data(), d, n, d, Kt.data(), Vf.data(), n, np, dvp, S.data(), O.data(), L.data(),
                     need_imp ? colsum.data() : nullptr);
        store(b, hh, tok.data(), n, O.data(), L.data());
      }
      if (need_imp) {
        const float inv = 1.0f / static_cast<float>(h * n);
        for (int64_t i = 0; i < n; ++i) dst[b * N + tok[i]] = colsum[i] * inv;
      }
    }
  }
}

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          int64_t window, int64_t H, int64_t W) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_fwd: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention_fwd: q, k, v must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "attention_fwd: k must be [B, h, M, d] matching q");
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "attention_fwd: v must be [B, h, M, dv] matching k");
  TORCH_CHECK(q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0 && v.size(3) > 0,
              "attention_fwd: empty input");
  TORCH_CHECK(window >= 0, "attention_fwd: window must be >= 0 (0: global)");
  if (window > 0) {
    TORCH_CHECK(k.size(2) == q.size(2), "attention_fwd: window mode needs M == N");
    TORCH_CHECK(H > 0 && W > 0 && H * W == q.size(2), "attention_fwd: H*W must equal N");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale,
                                                             int64_t window, int64_t H, int64_t W,
                                                             bool need_importance) {
  check_attention_args(q, k, v, window, H, W);
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), M = k.size(2), dv = v.size(3);
  auto out = at::empty({B, h, N, dv}, q.options());
  auto lse = at::empty({B, h, N}, q.options().dtype(at::kFloat));
  auto imp = need_importance ? at::empty({B, window ? N : M}, q.options().dtype(at::kFloat))
                             : at::empty({0}, q.options().dtype(at::kFloat));
  dispatch_floating(q.scalar_type(), false, "attention_fwd", [&](auto tag) {
    using T = decltype(tag);
    attention_fwd_cpu<T>(q, k, v, scale, window, H, W, need_importance, out, lse, imp);
  });
  return {out, lse, imp};
}

// Backward: recomputes each tile's probabilities (never the N x M matrix).
// Global mode: tasks (b, h) own their dK, dV and walk the query blocks;
// window mode: tasks (b, window) own the window's keys. Deterministic.
template <typename T>
void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       double scale_d, int64_t window, int64_t H, int64_t W, at::Tensor& dq, at::Tensor& dk,
                       at::Tensor& dv_t) {
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t M = k.size(2), dv = v.size(3), dp = pad16(d), dvp = pad16(dv);
  const float scale = static_cast<float>(scale_d);
  const View4<T> Q(q), K(k), V(v), dO(dout);
  T* dqp = dq.data_ptr<T>();  // contiguous outputs
  T* dkp = dk.data_ptr<T>();
  T* dvp_ = dv_t.data_ptr<T>();
  auto put = [](T* base, const float* src, int64_t ld, const int64_t* tok, int64_t n, int64_t c) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < c; ++e) base[tok[i] * c + e] = static_cast<T>(src[i * ld + e]);
  };
  const bool windowed = window > 0;
  const WindowGeom geo(windowed ? H : 1, windowed ? W : 1, windowed ? window : 1);
  const int64_t QB = 64;
  const int64_t nk_max = windowed ? geo.size() : M, nq_max = windowed ? geo.size() : std::min(QB, N);
  const int64_t nkp_max = pad16(nk_max);
  const int64_t ntask = windowed ? B * geo.num_windows() : B * h;
#pragma omp parallel
  {
    std::vector<float> Qs(nq_max * dp), Kr(nkp_max * dp), Kt(d * nkp_max), Vt(dv * nkp_max), dOs(nq_max * dvp),
        P(nq_max * nkp_max), dP(nq_max * nkp_max), Tr(nkp_max * nq_max), dQ(nq_max * dp), dK(nkp_max * dp),
        dV(nkp_max * dvp);
    std::vector<int64_t> ktok(nk_max), qtok(nq_max);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < ntask; ++task) {
      // (b, heads, keys) of this task; global tasks hold one head, window tasks all heads.
      const int64_t b = windowed ? task / geo.num_windows() : task / h;
      int64_t nk = 0;
      if (windowed) {
        for (int64_t l = 0; l < geo.size(); ++l) {
          const int64_t t = geo.token(task % geo.num_windows(), l);
          if (t >= 0) ktok[nk++] = t;
        }
      } else {
        for (int64_t j = 0; j < M; ++j) ktok[j] = j;
        nk = M;
      }
      const int64_t nkp = pad16(nk);
      const int64_t h0 = windowed ? 0 : task % h, h1 = windowed ? h : h0 + 1;
      for (int64_t hh = h0; hh < h1; ++hh) {
        std::fill(Kr.begin(), Kr.end(), 0.0f);
        std::fill(Kt.begin(), Kt.end(), 0.0f);
        std::fill(Vt.begin(), Vt.end(), 0.0f);
        std::fill(dK.begin(), dK.end(), 0.0f);
        std::fill(dV.begin(), dV.end(), 0.0f);
        gather_rows(K, b, hh, ktok.data(), nk, d, 1.0f, Kr.data(), dp, false);
        gather_rows(K, b, hh, ktok.data(), nk, d, 1.0f, Kt.data(), nkp, true);
        gather_rows(V, b, hh, ktok.data(), nk, dv, 1.0f, Vt.data(), nkp, true);
        const int64_t nqs = windowed ? nk : N;
        for (int64_t i0 = 0; i0 < nqs; i0 += QB) {
          const int64_t nq = std::min(QB, nqs - i0);
          for (int64_t i = 0; i < nq; ++i) qtok[i] = windowed ? ktok[i0 + i] : i0 + i;
          gather_rows(Q, b, hh, qtok.data(), nq, d, scale, Qs.data(), dp, false);
          gather_rows(dO, b, hh, qtok.data(), nq, dv, 1.0f, dOs.data(), dvp, false);
          tile_backward(nq, nk, nkp, d, dp, dv, dvp, scale, Qs.data(), Kr.data(), Kt.data(), Vt.data(),
                        dOs.data(), P.data(), dP.data(), Tr.data(), dQ.data(), dK.data(), dV.data());
          put(dqp + (b * h + hh) * N * d, dQ.data(), dp, qtok.data(), nq, d);
        }
        put(dkp + (b * h + hh) * M * d, dK.data(), dp, ktok.data(), nk, d);
        put(dvp_ + (b * h + hh) * M * dv, dV.data(), dvp, ktok.data(), nk, dv);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             double scale, int64_t window, int64_t H, int64_t W) {
  check_attention_args(q, k, v, window, H, W);
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == q.size(0) && dout.size(1) == q.size(1) &&
                  dout.size(2) == q.size(2) && dout.size(3) == v.size(3) && dout.scalar_type() == q.scalar_type(),
              "attention_bwd: dout must be [B, h, N, dv] in q's dtype");
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  dispatch_floating(q.scalar_type(), false, "attention_bwd", [&](auto tag) {
    attention_bwd_cpu<decltype(tag)>(dout, q, k, v, scale, window, H, W, dq, dk, dv);
  });
  return {dq, dk, dv};
}

// ---------------------------------------------------------------- aggregation

ReallocPlan make_plan(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weights,
                      c10::IntArrayRef group_sizes, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, C]");
  TORCH_CHECK(index.dim() == 3 && index.scalar_type() == at::kLong, op, ": index must be [G, B, N] int64");
  TORCH_CHECK(index.size(1) == x.size(0) && index.size(2) == x.size(1), op,
              ": index must be [G, B, N] matching x [B, N, C]");
  const int P = static_cast<int>(group_sizes.size());
  TORCH_CHECK(P == 2 || P == 3, op, ": 2 or 3 parts, got ", P);
  int64_t total = 0;
  for (auto r : group_sizes) {
    TORCH_CHECK(r >= 1, op, ": group sizes must be >= 1");
    total += r;
  }
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == total, op,
              ": weights must hold sum(group_sizes) = ", total, " values");
  TORCH_CHECK(weights.scalar_type() == x.scalar_type(), op, ": weights must have x's dtype");
  return ReallocPlan(x.size(1), P, group_sizes.data());
}

// Out-of-range rows would read or write out of bounds: refuse them up front.
void check_index_range(const at::Tensor& idx, int64_t N, const char* op) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  bool ok = true;
#pragma omp parallel for reduction(&& : ok) schedule(static)
  for (int64_t i = 0; i < n; ++i) ok = ok && p[i] >= 0 && p[i] < N;
  TORCH_CHECK(ok, op, ": index values must lie in [0, N) = [0, ", N, ")");
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void aggregate_fwd_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& w,
                       const at::Tensor& bias, const ReallocPlan& plan, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t G = idx.size(0), B = x.size(0), N = x.size(1), C = x.size(2), M = plan.M;
  const T* xp = x.const_data_ptr<T>();  // contiguous
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = bias.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
#pragma omp parallel
  {
    std::vector<A> acc(C);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < G * B * M; ++row) {
      const int64_t gb = row / M, m = row % M, b = gb % B;
      const int p = plan.part_of_row(m);
      int64_t first, count;
      plan.members(m, p, first, count);
      std::fill(acc.begin(), acc.end(), static_cast<A>(bp[p]));
      for (int64_t j = 0; j < count; ++j) {
        const A wj = static_cast<A>(wp[plan.woff[p] + j]);
        const T* src = xp + (b * N + ip[gb * N + first + j]) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) acc[c] += wj * static_cast<A>(src[c]);
      }
      T* dst = op + row * C;
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<T>(acc[c]);
    }
  }
}

template <typename T>
void aggregate_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& idx,
                       const at::Tensor& w, const ReallocPlan& plan, at::Tensor& dx, at::Tensor& dw,
                       at::Tensor& db) {
  using A = acc_t<T>;
  const int64_t G = idx.size(0), B = x.size(0), N = x.size(1), C = x.size(2), M = plan.M;
  const int64_t R = w.numel(), P = plan.P;
  const T* gp = grad.const_data_ptr<T>();  // contiguous [G, B, M, C]
  const T* xp = x.const_data_ptr<T>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const T* wp = w.const_data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  // Tasks (b, channel chunk) own their dx rows, so repeated index values (not
  // produced by a sort, but accepted) accumulate without races.
  const int64_t CH = 64, ncc = (C + CH - 1) / CH, ntask = B * ncc;
  std::vector<double> partial(ntask * (R + P), 0.0);  // per-task dweights, dbiases
#pragma omp parallel
  {
    std::vector<A> dxa;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < ntask; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * CH, cn = std::min(CH, C - c0);
      dxa.assign(N * cn, A(0));
      double* pw = partial.data() + task * (R + P);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t* irow = ip + (g * B + b) * N;
        const T* grow = gp + (g * B + b) * M * C + c0;
        for (int64_t pos = 0; pos < N; ++pos) {
          const int p = plan.part_of_pos(pos);
          const int64_t off = pos - plan.start[p], m = plan.out[p] + off / plan.r[p];
          const int64_t j = plan.woff[p] + off % plan.r[p];
          const A wj = static_cast<A>(wp[j]);
          const T* gr = grow + m * C;
          const T* xr = xp + (b * N + irow[pos]) * C + c0;
          A* dr = dxa.data() + irow[pos] * cn;
          // dweights/dbias sum over B*M*C terms: accumulate them in double.
          double dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < cn; ++c) {
            const A gv = static_cast<A>(gr[c]);
            dr[c] += wj * gv;
            dot += static_cast<double>(gv) * static_cast<double>(xr[c]);
          }
          pw[j] += dot;
        }
        for (int64_t m = 0; m < M; ++m) {
          const T* gr = grow + m * C;
          double s = 0;
          for (int64_t c = 0; c < cn; ++c) s += static_cast<double>(gr[c]);
          pw[R + plan.part_of_row(m)] += s;
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        T* dst = dxp + (b * N + n) * C + c0;
        for (int64_t c = 0; c < cn; ++c) dst[c] = static_cast<T>(dxa[n * cn + c]);
      }
    }
  }
  // Fixed-order reduction of the task partials: deterministic.
  T* dwp = dw.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  for (int64_t e = 0; e < R + P; ++e) {
    double s = 0;
    for (int64_t t = 0; t < ntask; ++t) s += partial[t * (R + P) + e];
    if (e < R) dwp[e] = static_cast<T>(s); else dbp[e - R] = static_cast<T>(s);
  }
}

at::Tensor aggregate_fwd(const at::Tensor& x_in, const at::Tensor& index, const at::Tensor& weights,
                         const at::Tensor& biases, c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_fwd";
  ReallocPlan plan = make_plan(x_in, index, weights, group_sizes, op);
  TORCH_CHECK(biases.numel() == plan.P && biases.scalar_type() == x_in.scalar_type(), op,
              ": biases must hold one value per part in x's dtype");
  auto x = x_in.contiguous();
  auto idx = index.contiguous();
  check_index_range(idx, x.size(1), op);
  auto w = weights.contiguous(), b = biases.contiguous();
  auto out = at::empty({idx.size(0), x.size(0), plan.M, x.size(2)}, x.options());
  dispatch_floating(x.scalar_type(), true, op, [&](auto tag) {
    aggregate_fwd_cpu<decltype(tag)>(x, idx, w, b, plan, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_bwd(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                             const at::Tensor& index, const at::Tensor& weights,
                                                             c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_bwd";
  ReallocPlan plan = make_plan(x_in, index, weights, group_sizes, op);
  auto x = x_in.contiguous();
  auto idx = index.contiguous();
  auto grad = grad_in.contiguous();
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == idx.size(0) && grad.size(1) == x.size(0) &&
                  grad.size(2) == plan.M && grad.size(3) == x.size(2) &&
                  grad.scalar_type() == x.scalar_type(),
              op, ": grad must be [G, B, M, C] in x's dtype");
  check_index_range(idx, x.size(1), op);
  auto w = weights.contiguous();
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(w);
  auto db = at::empty({plan.P}, x.options());
  dispatch_floating(x.scalar_type(), true, op, [&](auto tag) {
    aggregate_bwd_cpu<decltype(tag)>(grad, x, idx, w, plan, dx, dw, db);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY(sgattn, m) {
  m.def(SGATTN_SCHEMA_ATTENTION_FWD);
  m.def(SGATTN_SCHEMA_ATTENTION_BWD);
  m.def(SGATTN_SCHEMA_AGGREGATE_FWD);
  m.def(SGATTN_SCHEMA_AGGREGATE_BWD);
}

TORCH_LIBRARY_IMPL(sgattn, CPU, m) {
  m.impl(SGATTN_OP_ATTENTION_FWD, &attention_fwd);
  m.impl(SGATTN_OP_ATTENTION_BWD, &attention_bwd);
  m.impl(SGATTN_OP_AGGREGATE_FWD, &aggregate_fwd);
  m.impl(SGATTN_OP_AGGREGATE_BWD, &aggregate_bwd);
}

// An importable (empty) Python module: importing sgattn._C loads the library
// above, which registers the ops with the dispatcher.
static PyModuleDef sgattn_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "sgattn CPU ops, registered as torch.ops.sgattn.*", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sgattn_c_module); }
