// The CPU attention drivers (framework-free): the parallel partition, scratch
// and per-item loops of the forward (with importance) and the backward, over
// strided inputs given by pointer and element strides. They call the tile
// kernels of attention.h; csrc/cpu_ops.cpp validates the tensors, unpacks them
// and calls these. T is the element type (float, or a 16-bit float type that
// converts to and from float). Every work partition depends on the shapes
// only, never on the thread count, and every reduction runs in a fixed order:
// results are bitwise independent of the number of threads.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/attention.h"
#include "cpu/scratch.h"
#include "sgformer_geometry.h"

namespace sgattn::cpu {

// One attention call: q [B, h, N, d], k [B, h, M, d], v [B, h, M, dv]; window
// 0 is global attention, window > 0 are w x w windows on the H x W grid (M == N == H*W).
struct AttnCall {
  int64_t B, h, N, M, d, dv;
  float scale;
  int64_t window, H, W;
};

// Which keys each query sees in global attention, and how the heads share
// keys (SG-Former's attention: the defaults, every query sees every key).
// q has AttnCall::h heads; k and v have h / G (query head hq reads kv head hq / G).
struct Visibility {
  int64_t G = 1;
  bool causal = false;  // bottom-right aligned: query i sees keys j <= i + M - N
  // Key padding: batch b's padding keys are pad_key[pad_begin[b] .. pad_begin[b + 1]) (null: none).
  const int64_t* pad_begin = nullptr;
  const int64_t* pad_key = nullptr;

  bool masks() const { return causal || pad_key; }
  // Keys [0, key_end) hold every key that query rows i0 .. i0 + nq - 1 see
  // (causal: the tiles past it are skipped); <= 0: they see none.
  int64_t key_end(const AttnCall& a, int64_t i0, int64_t nq) const {
    return causal ? std::min(a.M, i0 + nq + a.M - a.N) : a.M;
  }
  // Sets the scores S[i][j] (ld ldS; keys j < nk) that query rows i0 + i of
  // batch b do not see to -inf.
  void apply(const AttnCall& a, int64_t b, int64_t i0, int64_t nq, int64_t nk, float* S, int64_t ldS) const {
    if (causal) {
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = std::max<int64_t>(0, i0 + i + a.M - a.N + 1); j < nk; ++j) S[i * ldS + j] = -INFINITY;
    }
    if (pad_key) {
      for (int64_t p = pad_begin[b]; p < pad_begin[b + 1] && pad_key[p] < nk; ++p)
        for (int64_t i = 0; i < nq; ++i) S[i * ldS + pad_key[p]] = -INFINITY;
    }
  }
};

// What the global forward's column sums of P are (imp): SG-Former's importance
// (the mean over heads and queries, [B, M]), or per query head the weighted
// sum over the queries ([B, h, M]: weight[i] per query, null: 1).
// lse: P = exp(s - lse) from this lse [B, h, N] (no output: o, l, V unused).
struct ColSums {
  bool per_head = false;
  const float* weight = nullptr;
  const float* lse = nullptr;
};

// A [B, h, L, c] view given by pointer and element strides.
template <typename T>
struct View4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  const T* row(int64_t b, int64_t h, int64_t n) const { return p + b * s0 + h * s1 + n * s2; }
};

// Gathers n rows of (b, h), rows tok[i] (or first + i when tok is null), as
// fp32 times mul: row-major dst[i * ld + e], or transposed dst[e * ld + i].
// The caller zero-fills padding.
template <typename T>
void gather_rows(const View4<T>& v, int64_t b, int64_t h, const int64_t* tok, int64_t first, int64_t n, int64_t c,
                 float mul, float* dst, int64_t ld, bool transpose) {
  for (int64_t i = 0; i < n; ++i) {
    const T* src = v.row(b, h, tok ? tok[i] : first + i);
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

// The n rows of (b, h) as a BLAS operand (global paths): fp32 rows with unit
// stride are used in place (ld = their row stride); others are converted
// (gathered) into the fp32 scratch, whose row stride is ld_scratch.
template <typename T>
bool blas_in_place(const View4<T>& v, int64_t c) {
  return std::is_same_v<T, float> && v.s3 == 1 && v.s2 >= c && v.s2 <= std::numeric_limits<int>::max();
}
struct Rows {
  const float* p;
  int64_t ld;
};
template <typename T>
Rows blas_rows(const View4<T>& v, bool in_place, int64_t b, int64_t h, int64_t n, int64_t c, float* scratch,
               int64_t ld_scratch) {
  if (in_place) return {reinterpret_cast<const float*>(v.row(b, h, 0)), v.s2};
  gather_rows(v, b, h, nullptr, 0, n, c, 1.0f, scratch, ld_scratch, false);
  return {scratch, ld_scratch};
}

// Writes n rows src[i * ld + 0:c] to base[row * c + 0:c], row = tok[i] (or first + i).
template <typename T>
void put_rows(T* base, const float* src, int64_t ld, const int64_t* tok, int64_t first, int64_t n, int64_t c) {
  for (int64_t i = 0; i < n; ++i) {
    T* dst = base + (tok ? tok[i] : first + i) * c;
    for (int64_t e = 0; e < c; ++e) dst[e] = static_cast<T>(src[i * ld + e]);
  }
}

constexpr int64_t kQB = 64;      // query rows per tile
constexpr int64_t kChunks = 64;  // global forward and backward: work items per call (fewer per item as B*h grows)
// Global backward: floats of a P (or dP) tile up to which the query block grows
// past kQB (to at most 256 rows).
constexpr int64_t kBwdTileFloats = 16384;
constexpr int64_t kRB = 32;  // global backward: key rows per item of the partials' reduction
// Global backward: bytes of fp32 dK/dV partials per call (chunks * Mp * (dp + dvp)
// floats); shapes that would need more split each head into fewer chunks. A
// larger buffer is fresh memory on every call (above glibc's largest mmap
// threshold, 32 MiB) whose first-touch page faults cost more than the chunks
// gain: B*h = 8, M = 2352, d = 32 ran 16% slower on one thread with 8 chunks
// per head (38.5 MB) than with 6 (28.9 MB, within this bound), and no slower
// than one chunk. 32 MiB holds kChunks = 64 slices (the most a call has) of
// M = 2048 keys with d = dv = 32; M = 8192 with d = dv = 64 gets 8 chunks in all.
constexpr int64_t kMaxBwdPartials = int64_t(32) << 20;

// o, l rows tok[i] (or first + i) of (b, hh) from the tile's O [nq][dvp] and L [nq].
template <typename T>
void store_rows(const AttnCall& a, T* o, float* l, int64_t b, int64_t hh, const int64_t* tok, int64_t first,
                int64_t nq, const float* O, const float* L) {
  put_rows(o + (b * a.h + hh) * a.N * a.dv, O, pad16(a.dv), tok, first, nq, a.dv);
  float* lrow = l + (b * a.h + hh) * a.N;
  for (int64_t i = 0; i < nq; ++i) lrow[tok ? tok[i] : first + i] = L[i];
}

// The forward's lse of n query rows of (b, hh), rows tok[i] (or first + i), into L.
inline void gather_lse(const AttnCall& a, const float* lse, int64_t b, int64_t hh, const int64_t* tok, int64_t first,
                       int64_t n, float* L) {
  for (int64_t i = 0; i < n; ++i) L[i] = lse[(b * a.h + hh) * a.N + (tok ? tok[i] : first + i)];
}

// Global forward: every query sees the keys `vis` gives it (all M by default).
template <typename T>
void forward_global(const AttnCall& a, const View4<T>& Q, const View4<T>& K, const View4<T>& V, T* o, float* l,
                    float* imp, const Visibility& vis = {}, const ColSums& cols = {}) {
  const int64_t B = a.B, h = a.h, N = a.N, d = a.d, M = a.M, dv = a.dv, dvp = pad16(dv), G = vis.G;
  const float scale = a.scale;
  const bool need_imp = imp != nullptr, from_lse = cols.lse != nullptr;
  // Work items (b, head slice, chunk of query blocks). The importance: one
  // slice of all heads, so an item owns its importance partial and gathers
  // each head's keys once. Per-head column sums: a slice per kv head, so an
  // item reuses its keys and values (in cache) for G heads and all its blocks.
  const int64_t hs = cols.per_head ? 1 : h / G, nhs = h / G / hs;  // kv heads per slice, slices
  const int64_t hmt = cols.per_head ? G : 1;                        // column sums per item
  // Per-head column sums with G > 1 (grouped-query heads): a tile holds the
  // same query block of all G heads (G * nq rows), so the kv head's K and V
  // are read once per block instead of once per head: a decode step (N = 1)
  // streams its cache once, and small blocks make larger GEMMs.
  const int64_t F = cols.per_head ? G : 1;  // heads folded into one tile
  // Query blocks: S tiles of about 16K floats (L2-resident), 64 to 256 rows
  // (with F heads folded, 1/F as many queries each); for the importance
  // smaller when B*N is small, so that every thread gets work.
  const int64_t Mp = pad16(M);
  int64_t QB = 64;
  while (QB < 256 && 2 * QB * Mp <= 16384) QB *= 2;
  if (!cols.per_head) QB = std::min(QB, std::clamp<int64_t>((B * N / 64 + 3) / 4 * 4, 16, 256));
  QB = std::max<int64_t>(1, std::min(QB / F, N));  // (a decode step's N = 1: a tile of F rows)
  const int64_t RB = QB * F;  // tile rows
  const int64_t nqb = (N + QB - 1) / QB;
  const int64_t per_b = std::min(nqb, (kChunks + B * nhs - 1) / (B * nhs)), ntask = B * nhs * per_b;
  // fp32 K, V with unit-stride rows feed the GEMMs in place (blas_rows); an
  // fp32 output is written in place too.
  const bool dirK = blas_in_place(K, d), dirV = blas_in_place(V, dv),
             dirO = std::is_same_v<T, float> && dv <= std::numeric_limits<int>::max() && F == 1;
  // Scratch is zero-filled on every call: K and V copies only where the
  // GEMMs cannot read the inputs in place (128 MiB a thread for a 128k-key
  // fp32 cache otherwise), no V for the column sums from an lse.
  Scratch sc;
  const int64_t hK = sc.reserve<float>(dirK ? 0 : Mp, d), hV = sc.reserve<float>(dirV || from_lse ? 0 : Mp, dvp),
                hQ = sc.reserve<float>(RB, d),
                hS = sc.reserve<float>(RB, Mp), hO = sc.reserve<float>(RB, dvp), hL = sc.reserve<float>(RB, 1),
                hC = sc.reserve<float>(F * Mp, 1), hR = sc.reserve<float>(RB, 1);
  if (sc.too_big())
    too_large("M=", M, " keys with d=", d, ", dv=", dv, " need more than ",
              kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
  Buffer partial_t = need_imp ? shared_buffer<double>(ntask * hmt, M, "the importance partials") : Buffer();
  double* partial = need_imp ? partial_t.as<double>() : nullptr;
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    float *Kr = sc.get<float>(hK), *Vf = sc.get<float>(hV), *Qs = sc.get<float>(hQ), *S = sc.get<float>(hS),
          *O = sc.get<float>(hO), *L = sc.get<float>(hL), *cs = sc.get<float>(hC), *Ri = sc.get<float>(hR);
    // Items handed out one at a time, the costliest first: a causal item's
    // cost grows with its chunk c, and round-robin gave one of two threads all
    // the odd chunks (12% over the mean). An item's results do not depend on
    // the thread that runs it.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t task = ntask - 1 - t, b = task / (nhs * per_b), sl = task / per_b % nhs, c = task % per_b;
      const int64_t blk0 = c * nqb / per_b, blk1 = (c + 1) * nqb / per_b;
      for (int64_t hk = sl * hs; hk < (sl + 1) * hs; ++hk) {
        const Rows kr = blas_rows(K, dirK, b, hk, M, d, Kr, d);
        const Rows vr = from_lse ? Rows{} : blas_rows(V, dirV, b, hk, M, dv, Vf, dvp);
        for (int64_t h0 = hk * G; h0 < (hk + 1) * G; h0 += F) {  // F heads h0 .. h0 + F - 1 per tile
          for (int64_t blk = blk0; blk < blk1; ++blk) {
            const int64_t i0 = blk * QB, nq = std::min(QB, N - i0), nk = vis.key_end(a, i0, nq), R = F * nq;
            const float* w = cols.weight ? cols.weight + i0 : nullptr;
            // from an lse, only the mass: blocks of unchosen queries are skipped
            if (from_lse && w && std::all_of(w, w + nq, [](float x) { return x == 0.0f; })) continue;
            if (nk <= 0) {  // no row of the block sees a key: out 0, lse -inf, no mass
              if (from_lse) continue;
              std::fill(O, O + nq * dvp, 0.0f);
              std::fill(L, L + nq, -INFINITY);
              for (int64_t f = 0; f < F; ++f) store_rows(a, o, l, b, h0 + f, nullptr, i0, nq, O, L);
              continue;
            }
            const int64_t ldS = pad16(nk);  // the tile's score rows (Mp unless causal)
            // head h0 + f's rows are f * nq .. (f + 1) * nq - 1 of Qs, S, O, L, Ri; its column sums cs + f * ldS
            for (int64_t f = 0; f < F; ++f)
              gather_rows(Q, b, h0 + f, nullptr, i0, nq, d, scale, Qs + f * nq * d, d, false);
            if (need_imp) std::fill(cs, cs + F * ldS, 0.0f);
            // S = Qs K^T over the keys the block sees, masked, softmax rows
            // (and their column sums), O = P V.
            gemm_rm(false, true, R, nk, d, 1.0f, Qs, d, kr.p, kr.ld, 0.0f, S, ldS);
            if (vis.masks())
              for (int64_t f = 0; f < F; ++f) vis.apply(a, b, i0, nq, nk, S + f * nq * ldS, ldS);
            if (from_lse) {  // P = exp(s - lse); only the column sums
              for (int64_t f = 0; f < F; ++f) gather_lse(a, cols.lse, b, h0 + f, nullptr, i0, nq, L + f * nq);
              probs_from_lse<true>(S, R, nk, ldS, L);
              for (int64_t r = 0; r < R; ++r) {
                const float wi = w ? w[r % nq] : 1.0f;
                if (wi == 0.0f) continue;
                float* c = cs + r / nq * ldS;
                for (int64_t j = 0; j < nk; ++j) c[j] += wi * S[r * ldS + j];
              }
            } else {
              // The rows stay unnormalised and O's rows are scaled instead (the
              // tile is not written a third time).
              for (int64_t f = 0; f < F; ++f) {
                float *Sf = S + f * nq * ldS, *csf = need_imp ? cs + f * ldS : nullptr;
                if (vis.masks())
                  softmax_rows<true>(Sf, nq, nk, ldS, L + f * nq, csf, Ri + f * nq, w);
                else
                  softmax_rows(Sf, nq, nk, ldS, L + f * nq, csf, Ri + f * nq, w);
              }
              auto normalise = [&](float* rows, int64_t ld) {
                for (int64_t r = 0; r < R; ++r)
                  for (int64_t e = 0; e < dv; ++e) rows[r * ld + e] *= Ri[r];
              };
              if (dirO) {  // fp32 output (one head per tile): written in place, rows i0.. of (b, h0)
                float* orow = reinterpret_cast<float*>(o) + ((b * h + h0) * N + i0) * dv;
                gemm_rm(false, false, nq, dv, nk, 1.0f, S, ldS, vr.p, vr.ld, 0.0f, orow, dv);
                normalise(orow, dv);
                float* lrow = l + (b * h + h0) * N + i0;
                std::copy(L, L + nq, lrow);
              } else {
                gemm_rm(false, false, R, dv, nk, 1.0f, S, ldS, vr.p, vr.ld, 0.0f, O, dvp);
                normalise(O, dvp);
                for (int64_t f = 0; f < F; ++f)
                  store_rows(a, o, l, b, h0 + f, nullptr, i0, nq, O + f * nq * dvp, L + f * nq);
              }
            }
            if (need_imp) {  // a tile's fp32 column sums, accumulated in double in a fixed order
              for (int64_t f = 0; f < F; ++f) {
                double* acc = partial + (task * hmt + (cols.per_head ? (h0 + f) % G : 0)) * M;
                const float* c = cs + f * ldS;
                for (int64_t j = 0; j < nk; ++j) acc[j] += c[j];
              }
            }
          }
        }
      }
    }
  }
  if (need_imp) {
    // the importance is a mean over heads and queries; per-head sums are raw
    const double inv = cols.per_head ? 1.0 : 1.0 / (static_cast<double>(h) * static_cast<double>(N));
    // Each element sums its partials in the same order (c = 0, 1, ...) whoever
    // runs it. Items: kJB-key blocks of a result row, so that the sums run
    // along contiguous keys (no index arithmetic per element: a decode step's
    // 32 x 8k sums took twice as long as its attention). Small reductions skip the
    // extra parallel region (a barrier on a loaded machine).
    constexpr int64_t kJB = 1024;
    const int64_t hm = cols.per_head ? h : 1, njb = (M + kJB - 1) / kJB;  // heads of the result, key blocks
#pragma omp parallel for schedule(static) num_threads(nt) if (B * hm * M * per_b > (int64_t(1) << 16))
    for (int64_t item = 0; item < B * hm * njb; ++item) {
      const int64_t b = item / (hm * njb), hh = item / njb % hm, j0 = item % njb * kJB, nj = std::min(kJB, M - j0);
      const int64_t sl = cols.per_head ? hh / G : 0, lh = cols.per_head ? hh % G : 0;
      const double* src = partial + ((b * nhs + sl) * per_b * hmt + lh) * M + j0;  // partial c at src + c * hmt * M
      double s[kJB] = {};
      for (int64_t c = 0; c < per_b; ++c)
        for (int64_t j = 0; j < nj; ++j) s[j] += src[c * hmt * M + j];
      float* out = imp + (b * hm + hh) * M + j0;
      for (int64_t j = 0; j < nj; ++j) out[j] = static_cast<float>(s[j] * inv);
    }
  }
}

// Window forward (more than one window).
template <typename T>
void forward_window(const AttnCall& a, const View4<T>& Q, const View4<T>& K, const View4<T>& V, T* o, float* l,
                    float* imp) {
  const int64_t B = a.B, h = a.h, N = a.N, d = a.d, dv = a.dv, dvp = pad16(dv);
  const float scale = a.scale;
  const bool need_imp = imp != nullptr;
  // Window mode: work items (b, window); only the real tokens of a window take
  // part, which is exactly the reference's masking of padded queries and keys.
  const auto geo = WindowGeom<>::clamped(a.H, a.W, a.window);
  const int64_t nW = geo.num_windows(), Lmax = geo.max_real(), Lp = pad16(Lmax), QB = std::min(kQB, Lmax);
  Scratch sc;
  const int64_t hKt = sc.reserve<float>(d, Lp), hV = sc.reserve<float>(Lp, dvp), hQ = sc.reserve<float>(QB, d),
                hS = sc.reserve<float>(QB, Lp), hO = sc.reserve<float>(QB, dvp), hL = sc.reserve<float>(QB, 1),
                hC = sc.reserve<float>(Lp, 1), hA = sc.reserve<double>(Lmax, 1), hT = sc.reserve<int64_t>(Lmax, 1);
  if (sc.too_big())
    too_large("windows of ", Lmax, " tokens with d=", d, ", dv=", dv, " need more than ",
              kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
  float* dst = imp;
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    float *Kt = sc.get<float>(hKt), *Vf = sc.get<float>(hV), *Qs = sc.get<float>(hQ), *S = sc.get<float>(hS),
          *O = sc.get<float>(hO), *L = sc.get<float>(hL), *cs = sc.get<float>(hC);
    double* acc = sc.get<double>(hA);
    int64_t* tok = sc.get<int64_t>(hT);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * nW; ++task) {
      const int64_t b = task / nW, n = geo.window(task % nW).tokens(tok), np = pad16(n);
      if (need_imp) std::fill(acc, acc + n, 0.0);
      for (int64_t hh = 0; hh < h; ++hh) {
        // Edge windows have fewer real tokens: clear what an earlier window left.
        std::fill(Kt, Kt + d * np, 0.0f);
        std::fill(Vf, Vf + np * dvp, 0.0f);
        gather_rows(K, b, hh, tok, 0, n, d, 1.0f, Kt, np, true);
        gather_rows(V, b, hh, tok, 0, n, dv, 1.0f, Vf, dvp, false);
        for (int64_t i0 = 0; i0 < n; i0 += QB) {
          const int64_t nq = std::min(QB, n - i0);
          gather_rows(Q, b, hh, tok + i0, 0, nq, d, scale, Qs, d, false);
          if (need_imp) std::fill(cs, cs + np, 0.0f);
          tile_forward(Qs, d, nq, d, Kt, Vf, n, np, dvp, S, O, L, need_imp ? cs : nullptr);
          store_rows(a, o, l, b, hh, tok + i0, 0, nq, O, L);
          if (need_imp) {
            for (int64_t j = 0; j < n; ++j) acc[j] += cs[j];
          }
        }
      }
      if (need_imp) {
        const double inv = 1.0 / (static_cast<double>(h) * static_cast<double>(n));
        for (int64_t i = 0; i < n; ++i) dst[b * N + tok[i]] = static_cast<float>(acc[i] * inv);
      }
    }
  }
}

// Forward: o [B, h, N, dv] and l (the row log-sum-exp) [B, h, N], both
// contiguous; imp [B, M] (global) or [B, N] (window), or null when the
// importance is not needed. A window covering the whole grid is one window
// over all tokens in order: exactly global attention, computed by the global
// path (same bits).
template <typename T>
void attention_forward(const AttnCall& a, const View4<T>& Q, const View4<T>& K, const View4<T>& V, T* o, float* l,
                       float* imp) {
  if (a.window > 0 && WindowGeom<>::clamped(a.H, a.W, a.window).num_windows() > 1)
    forward_window(a, Q, K, V, o, l, imp);
  else
    forward_global(a, Q, K, V, o, l, imp);
}

// Global backward.
// Keys as `vis` gives them; a kv head's dK, dV sum its G query heads in order.
template <typename T>
void backward_global(const AttnCall& a, const View4<T>& Q, const View4<T>& K, const View4<T>& V,
                     const View4<T>& dO, const float* lsep, T* dqp, T* dkp, T* dvp_, const Visibility& vis = {}) {
  const int64_t B = a.B, N = a.N, d = a.d, M = a.M, dv = a.dv, dp = pad16(d), dvp = pad16(dv);
  const int64_t G = vis.G, h = a.h / G;  // h: kv heads (items), G query heads each
  const float scale = a.scale;
  // Global mode: work items (b, h, c), c one of per_bh chunks of consecutive
  // query blocks; five BLAS GEMMs per block (see tile_backward_blas). An item
  // writes the dQ rows of its own blocks (exclusive). With one chunk per head
  // it owns the head's dK, dV and writes them; with more, each item
  // accumulates dK, dV over its blocks into its own fp32 partial slice, and
  // the slices are summed in the fixed order c = 0..per_bh-1 afterwards.
  // fp32 partials: each is a sum over a chunk's blocks exactly as the
  // one-chunk path accumulates all of a head's blocks (BLAS, beta = 1), and
  // summing per_bh of them is no less accurate than that sequential sum.
  const int64_t Mp = pad16(M), BH = B * h, target = (kChunks + BH - 1) / BH;
  // Query block: 64 rows, up to 256 while the P and dP tiles stay within
  // kBwdTileFloats each (64 KiB, L2-resident) and the head keeps at least
  // `target` blocks: with few keys, fewer and larger GEMMs amortise the
  // BLAS's per-call cost (M = 49, N = 3136: 13 blocks, 65 GEMMs per head
  // instead of 49 and 245; ~25% less backward time on one thread).
  int64_t QB = kQB;
  while (QB < 256 && Mp <= kBwdTileFloats / (2 * QB) && (N + 2 * QB - 1) / (2 * QB) >= target) QB *= 2;
  const int64_t nq_max = std::min(QB, N), nqb = (N + nq_max - 1) / nq_max;
  const bool dirK = blas_in_place(K, d), dirV = blas_in_place(V, dv);
  Scratch sc;  // (K, V copies only where they cannot be read in place, as in the forward)
  const int64_t hQs = sc.reserve<float>(nq_max, dp), hKr = sc.reserve<float>(dirK ? 0 : Mp, dp),
                hVr = sc.reserve<float>(dirV ? 0 : Mp, dvp), hdO = sc.reserve<float>(nq_max, dvp),
                hP = sc.reserve<float>(nq_max, Mp), hdP = sc.reserve<float>(nq_max, Mp),
                hdQ = sc.reserve<float>(nq_max, dp), hdK = sc.reserve<float>(Mp, dp),
                hdV = sc.reserve<float>(Mp, dvp), hAcc = sc.reserve<float>(kRB, dp + dvp),
                hL = sc.reserve<float>(nq_max, 1);
  if (sc.too_big())
    too_large(M, " keys per row with d=", d, ", dv=", dv, " need more than ",
              kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
  // Partials: per_bh slices of Mp * (dp + dvp) floats per head, at most
  // kMaxBwdPartials bytes in all (fewer chunks per head beyond that).
  const int64_t slice = Mp * (dp + dvp);  // no overflow: the scratch (dK, dV) holds as much
  int64_t per_bh = std::min(nqb, target);
  if (per_bh > 1) per_bh = std::min(per_bh, kMaxBwdPartials / static_cast<int64_t>(sizeof(float)) / slice / BH);
  per_bh = std::max<int64_t>(per_bh, 1);
  const int64_t ntask = BH * per_bh, nrb = (M + kRB - 1) / kRB;
  Buffer partial_t = per_bh > 1 ? shared_buffer<float>(ntask, slice, "the dK/dV partials", false) : Buffer();
  float* partial = per_bh > 1 ? partial_t.as<float>() : nullptr;
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    float *Qs = sc.get<float>(hQs), *Kr = sc.get<float>(hKr), *Vr = sc.get<float>(hVr),
          *dOs = sc.get<float>(hdO), *P = sc.get<float>(hP), *dP = sc.get<float>(hdP), *dQ = sc.get<float>(hdQ),
          *L = sc.get<float>(hL);
    // Items handed out one at a time, the costliest first (a causal item's
    // cost grows with its chunk c: in contiguous static shares, one thread
    // of many got a head's last chunks).
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t task = ntask - 1 - t, bh = task / per_bh, c = task % per_bh, b = bh / h, hh = bh % h;
      const int64_t blk0 = c * nqb / per_bh, blk1 = (c + 1) * nqb / per_bh;
      const Rows kr = blas_rows(K, dirK, b, hh, M, d, Kr, dp), vr = blas_rows(V, dirV, b, hh, M, dv, Vr, dvp);
      // The item's dK [Mp][dp] and dV [Mp][dvp]: its partial slice or the
      // thread's scratch, overwritten by its first block (every item has at
      // least one: per_bh <= nqb) and accumulated by the others. Only rows
      // < M and columns < d (dv) are read back. Masked: zeroed first (a
      // causal block only adds to the keys it sees).
      float* dK = partial ? partial + task * slice : sc.get<float>(hdK);
      float* dV = partial ? dK + Mp * dp : sc.get<float>(hdV);
      if (vis.masks()) {
        std::fill(dK, dK + Mp * dp, 0.0f);
        std::fill(dV, dV + Mp * dvp, 0.0f);
      }
      for (int64_t hq = hh * G; hq < (hh + 1) * G; ++hq) {
        T* dq_head = dqp + (b * a.h + hq) * N * d;
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t i0 = blk * nq_max, nq = std::min(nq_max, N - i0), nk = vis.key_end(a, i0, nq);
          if (nk <= 0) {  // the block's rows see no key: dq 0
            std::fill(dQ, dQ + nq * dp, 0.0f);
            put_rows(dq_head, dQ, dp, nullptr, i0, nq, d);
            continue;
          }
          gather_rows(Q, b, hq, nullptr, i0, nq, d, scale, Qs, dp, false);
          gather_rows(dO, b, hq, nullptr, i0, nq, dv, 1.0f, dOs, dvp, false);
          gather_lse(a, lsep, b, hq, nullptr, i0, nq, L);
          const float beta = vis.masks() || hq > hh * G || blk > blk0 ? 1.0f : 0.0f;
          if (vis.masks()) {
            const int64_t ldP = pad16(nk);
            tile_backward_blas(nq, nk, ldP, d, dp, dv, dvp, scale, Qs, kr.p, kr.ld, vr.p, vr.ld, dOs, L, P, dP, dQ,
                               dK, dV, beta, [&](float* S) { vis.apply(a, b, i0, nq, nk, S, ldP); });
          } else {
            tile_backward_blas(nq, M, Mp, d, dp, dv, dvp, scale, Qs, kr.p, kr.ld, vr.p, vr.ld, dOs, L, P, dP, dQ,
                               dK, dV, beta);
          }
          put_rows(dq_head, dQ, dp, nullptr, i0, nq, d);
        }
      }
      if (!partial) {
        put_rows(dkp + bh * M * d, dK, dp, nullptr, 0, M, d);
        put_rows(dvp_ + bh * M * dv, dV, dvp, nullptr, 0, M, dv);
      }
    }
    if (partial) {
      // After the loop's implicit barrier: each key row of each head sums its
      // per_bh partials in the order c = 0, 1, ..., whoever runs it. Items of
      // kRB rows, slices outer: each slice is read as a contiguous run.
      float* acc = sc.get<float>(hAcc);
#pragma omp for schedule(static) nowait  // the region's end is the barrier
      for (int64_t item = 0; item < BH * nrb; ++item) {
        const int64_t bh = item / nrb, j0 = item % nrb * kRB, nj = std::min(kRB, M - j0);
        const float* src = partial + bh * per_bh * slice;
        float* ak = acc;
        float* av = acc + kRB * dp;
        for (int64_t c = 0; c < per_bh; ++c) {  // padding columns (never written) are skipped
          const float* sk = src + c * slice + j0 * dp;
          const float* sv = src + c * slice + Mp * dp + j0 * dvp;
          for (int64_t i = 0; i < nj; ++i) {
            if (c == 0) {
              std::copy(sk + i * dp, sk + i * dp + d, ak + i * dp);
              std::copy(sv + i * dvp, sv + i * dvp + dv, av + i * dvp);
              continue;
            }
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) ak[i * dp + e] += sk[i * dp + e];
#pragma omp simd
            for (int64_t e = 0; e < dv; ++e) av[i * dvp + e] += sv[i * dvp + e];
          }
        }
        put_rows(dkp + bh * M * d, ak, dp, nullptr, j0, nj, d);
        put_rows(dvp_ + bh * M * dv, av, dvp, nullptr, j0, nj, dv);
      }
    }
  }
}

// Window backward (more than one window).
template <typename T>
void backward_window(const AttnCall& a, const View4<T>& Q, const View4<T>& K, const View4<T>& V,
                     const View4<T>& dO, const float* lsep, T* dqp, T* dkp, T* dvp_) {
  const int64_t B = a.B, h = a.h, N = a.N, d = a.d, M = a.M, dv = a.dv, dp = pad16(d), dvp = pad16(dv);
  const float scale = a.scale;
  // Items (b, window) own the window's keys, all heads.
  const auto geo = WindowGeom<>::clamped(a.H, a.W, a.window);
  const int64_t nk_max = geo.max_real(), nq_max = std::min(kQB, nk_max), nkp_max = pad16(nk_max);
  const int64_t nW = geo.num_windows(), ntask = B * nW;
  Scratch sc;
  const int64_t hQs = sc.reserve<float>(nq_max, dp), hKr = sc.reserve<float>(nkp_max, dp),
                hKt = sc.reserve<float>(d, nkp_max), hVt = sc.reserve<float>(dv, nkp_max),
                hdO = sc.reserve<float>(nq_max, dvp), hP = sc.reserve<float>(nq_max, nkp_max),
                hdP = sc.reserve<float>(nq_max, nkp_max), hTr = sc.reserve<float>(nkp_max, nq_max),
                hdQ = sc.reserve<float>(nq_max, dp), hdK = sc.reserve<float>(nkp_max, dp),
                hdV = sc.reserve<float>(nkp_max, dvp), hT = sc.reserve<int64_t>(nk_max, 1),
                hL = sc.reserve<float>(nq_max, 1);
  if (sc.too_big())
    too_large(nk_max, " keys per row with d=", d, ", dv=", dv, " need more than ",
              kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    float *Qs = sc.get<float>(hQs), *Kr = sc.get<float>(hKr), *Kt = sc.get<float>(hKt), *Vt = sc.get<float>(hVt),
          *dOs = sc.get<float>(hdO), *P = sc.get<float>(hP), *dP = sc.get<float>(hdP), *Tr = sc.get<float>(hTr),
          *dQ = sc.get<float>(hdQ), *dK = sc.get<float>(hdK), *dV = sc.get<float>(hdV), *L = sc.get<float>(hL);
    int64_t* tok = sc.get<int64_t>(hT);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < ntask; ++task) {
      const int64_t b = task / nW, nk = geo.window(task % nW).tokens(tok), nkp = pad16(nk);
      for (int64_t hh = 0; hh < h; ++hh) {
        std::fill(Kr, Kr + nkp * dp, 0.0f);
        std::fill(Kt, Kt + d * nkp, 0.0f);
        std::fill(Vt, Vt + dv * nkp, 0.0f);
        std::fill(dK, dK + nkp * dp, 0.0f);
        std::fill(dV, dV + nkp * dvp, 0.0f);
        gather_rows(K, b, hh, tok, 0, nk, d, 1.0f, Kr, dp, false);
        gather_rows(K, b, hh, tok, 0, nk, d, 1.0f, Kt, nkp, true);
        gather_rows(V, b, hh, tok, 0, nk, dv, 1.0f, Vt, nkp, true);
        for (int64_t i0 = 0; i0 < nk; i0 += nq_max) {  // the window's queries are its keys' tokens
          const int64_t nq = std::min(nq_max, nk - i0);
          gather_rows(Q, b, hh, tok + i0, 0, nq, d, scale, Qs, dp, false);
          gather_rows(dO, b, hh, tok + i0, 0, nq, dv, 1.0f, dOs, dvp, false);
          gather_lse(a, lsep, b, hh, tok + i0, 0, nq, L);
          tile_backward(nq, nk, nkp, d, dp, dv, dvp, scale, Qs, Kr, Kt, Vt, dOs, L, P, dP, Tr, dQ, dK, dV);
          put_rows(dqp + (b * h + hh) * N * d, dQ, dp, tok + i0, 0, nq, d);
        }
        put_rows(dkp + (b * h + hh) * M * d, dK, dp, tok, 0, nk, d);
        put_rows(dvp_ + (b * h + hh) * M * dv, dV, dvp, tok, 0, nk, dv);
      }
    }
  }
}

// Backward from the forward's lse (contiguous [B, h, N]) into the
// contiguous dq, dk, dv: each tile's scores are recomputed (never
// the N x M matrix) and P = exp(s - lse) taken in one pass (see
// tile_backward for D). Global mode: work items (b, h, chunk of query
// blocks), the chunks' dK, dV partials reduced in a fixed order (see below);
// window mode: items (b, window) own the window's keys. Deterministic and
// independent of the thread count.
template <typename T>
void attention_backward(const AttnCall& a, const View4<T>& Q, const View4<T>& K, const View4<T>& V,
                        const View4<T>& dO, const float* lse, T* dq, T* dk, T* dv) {
  if (a.window > 0 && WindowGeom<>::clamped(a.H, a.W, a.window).num_windows() > 1)  // else one window: global
    backward_window(a, Q, K, V, dO, lse, dq, dk, dv);
  else
    backward_global(a, Q, K, V, dO, lse, dq, dk, dv);
}

}  // namespace sgattn::cpu
