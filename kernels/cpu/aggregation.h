// The CPU token-reallocation kernels (framework-free): the weighted group sums
// of importance-sorted tokens (plan: sgformer_geometry.h's ReallocPlan) and
// their backward, OpenMP over a fixed partition with fixed-order reductions
// (deterministic, independent of the thread count). csrc/cpu_ops.cpp
// validates and unpacks the tensors and calls these.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/scratch.h"
#include "sgformer_geometry.h"

namespace sgattn::cpu {

// Every index row of idx [rows, N] (contiguous) must be a permutation of
// 0..N-1 (an argsort): other values would read or write out of bounds, and the
// backward relies on each token having exactly one sorted position per
// ordering. Returns the first row that is not one, or -1. O(rows * N).
inline int64_t first_non_permutation(const int64_t* p, int64_t rows, int64_t N) {
  if (rows == 0 || N == 0) return -1;
  const int nt = threads_for(N);
  Buffer seen_t(int64_t(nt) * N, true), bad_t(rows, true);
  uint8_t* seen = seen_t.as<uint8_t>();
  uint8_t* bad = bad_t.as<uint8_t>();
#pragma omp parallel num_threads(nt)
  {
    uint8_t* s = seen + static_cast<int64_t>(omp_get_thread_num()) * N;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* row = p + r * N;
      int64_t i = 0;
      for (; i < N; ++i) {
        const int64_t t = row[i];
        if (t < 0 || t >= N || s[t]) break;
        s[t] = 1;
      }
      bad[r] = i < N;
      for (int64_t j = 0; j < i; ++j) s[row[j]] = 0;  // clear what this row set
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    if (bad[r]) return r;
  return -1;
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Forward: out [G, B, M, C] = for each ordering g, the weighted group sums
// (plus the part's bias) of the tokens of x [B, N, C] in the order of idx
// [G, B, N]; weights wp as plan.woff, biases bp [P]. All contiguous.
template <typename T>
void aggregate_forward(const T* xp, const int64_t* ip, const T* wp, const T* bp, int64_t G, int64_t B, int64_t N,
                       int64_t C, const ReallocPlan& plan, T* op) {
  using A = acc_t<T>;
  const int64_t M = plan.M;
  Scratch sc;
  const int64_t hA = sc.reserve<A>(C, 1);
  if (sc.too_big()) too_large("C=", C, " channels are not supported");
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    A* acc = sc.get<A>(hA);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < G * B * M; ++row) {
      const int64_t gb = row / M, m = row % M, b = gb % B;
      const int p = plan.part_of_row(m);
      int64_t first, count;
      plan.members(m, p, first, count);
      std::fill(acc, acc + C, static_cast<A>(bp[p]));
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

// Backward of aggregate_forward from gp [G, B, M, C]: dxp like x, dwp like the
// weights, dbp [P]. All contiguous.
template <typename T>
void aggregate_backward(const T* gp, const T* xp, const int64_t* ip, const T* wp, int64_t G, int64_t B, int64_t N,
                        int64_t C, const ReallocPlan& plan, T* dxp, T* dwp, T* dbp) {
  using A = acc_t<T>;
  const int64_t M = plan.M, P = plan.P;
  // Only the first min(r_p, n_p) weights of a part meet a token; the others get
  // zero gradient. Partials are kept for those (compact offsets coff), so their
  // size is bounded by N whatever the group sizes.
  int64_t coff[3] = {0, 0, 0}, R = 0;
  for (int p = 0; p < P; ++p) {
    coff[p] = R;
    R += std::min(plan.r[p], plan.len[p]);
  }
  // Work items (b, channel chunk) own their dx rows; a fixed partition and a
  // fixed-order reduction of the per-item dweights/dbiases: deterministic.
  const int64_t CH = 64, ncc = (C + CH - 1) / CH, ntask = B * ncc;
  Buffer partial_t = shared_buffer<double>(ntask, R + P, "the weight-gradient partials");
  double* partial = partial_t.as<double>();
  Scratch sc;
  const int64_t hD = sc.reserve<A>(N, std::min(CH, C));
  if (sc.too_big()) too_large("N=", N, " tokens are not supported");
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    A* dxa = sc.get<A>(hD);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < ntask; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * CH, cn = std::min(CH, C - c0);
      std::fill(dxa, dxa + N * cn, A(0));
      double* pw = partial + task * (R + P);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t* irow = ip + (g * B + b) * N;
        const T* grow = gp + (g * B + b) * M * C + c0;
        for (int64_t pos = 0; pos < N; ++pos) {
          const int p = plan.part_of_pos(pos);
          int64_t m, j;
          plan.slot(pos, p, m, j);
          const A wj = static_cast<A>(wp[plan.woff[p] + j]);
          const T* gr = grow + m * C;
          const T* xr = xp + (b * N + irow[pos]) * C + c0;
          A* dr = dxa + irow[pos] * cn;
          // dweights/dbias sum over B*M*C terms: accumulate them in double.
          double dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < cn; ++c) {
            const A gv = static_cast<A>(gr[c]);
            dr[c] += wj * gv;
            dot += static_cast<double>(gv) * static_cast<double>(xr[c]);
          }
          pw[coff[p] + j] += dot;
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
  // Fixed-order reduction of the item partials.
  auto total = [&](int64_t e) {
    double s = 0;
    for (int64_t t = 0; t < ntask; ++t) s += partial[t * (R + P) + e];
    return s;
  };
  for (int p = 0; p < P; ++p) {
    for (int64_t j = 0; j < plan.r[p]; ++j)
      dwp[plan.woff[p] + j] = static_cast<T>(j < plan.len[p] ? total(coff[p] + j) : 0.0);
    dbp[p] = static_cast<T>(total(R + p));
  }
}


}  // namespace sgattn::cpu
