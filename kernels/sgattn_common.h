// Per-element logic shared by the CPU (csrc/cpu_ops.cpp) and CUDA (kernels/*.cuh)
// implementations: window geometry and the reallocation plan. Framework-free,
// compiles as plain C++ or CUDA.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SGATTN_HD __host__ __device__ __forceinline__
#else
#define SGATTN_HD inline
#endif

namespace sgattn {

// Non-overlapping w x w windows on an H x W row-major grid, padded at the
// bottom/right to multiples of w (SPEC 2a generalisation). Window-local index
// l = dy * w + dx; token() is -1 for padded positions.
struct WindowGeom {
  int64_t H, W, w, nwx, nwy;
  SGATTN_HD WindowGeom(int64_t H_, int64_t W_, int64_t w_)
      : H(H_), W(W_), w(w_), nwx((W_ + w_ - 1) / w_), nwy((H_ + w_ - 1) / w_) {}
  SGATTN_HD int64_t num_windows() const { return nwx * nwy; }
  SGATTN_HD int64_t size() const { return w * w; }
  SGATTN_HD int64_t token(int64_t win, int64_t l) const {
    const int64_t y = (win / nwx) * w + l / w, x = (win % nwx) * w + l % w;
    return (y < H && x < W) ? y * W + x : -1;
  }
  // Window holding token tok (row-major on the H x W grid).
  SGATTN_HD int64_t window_of(int64_t tok) const { return (tok / W / w) * nwx + (tok % W) / w; }
  // Real tokens of a window (the mean of its importance runs over these).
  SGATTN_HD int64_t real_count(int64_t win) const {
    const int64_t y0 = (win / nwx) * w, x0 = (win % nwx) * w;
    const int64_t hy = (H - y0 < w) ? H - y0 : w, wx = (W - x0 < w) ? W - x0 : w;
    return hy * wx;
  }
};

// SPEC 2b reallocation plan for N sorted tokens and P = 2 or 3 parts with
// group sizes r_p: part p covers sorted positions [start[p], start[p]+len[p]),
// its groups are output rows [out[p], out[p] + ceil(len[p]/r[p])), and its
// weights sit at [woff[p], woff[p] + r[p]) of the concatenated weight vector.
struct ReallocPlan {
  int P;
  int64_t N, M;
  int64_t start[3], len[3], out[3], r[3], woff[3];

  SGATTN_HD ReallocPlan() : P(0), N(0), M(0) {}
  // Same part sizes as sgattn.reference.reallocation_parts.
  SGATTN_HD ReallocPlan(int64_t N_, int P_, const int64_t* r_) : P(P_), N(N_), M(0) {
    if (P == 3) {
      const int64_t q = N / 4;
      len[0] = q; len[1] = 2 * q; len[2] = N - 3 * q;
    } else {
      len[0] = N / 2; len[1] = N - N / 2; len[2] = 0;
    }
    int64_t s = 0, w = 0;
    for (int p = 0; p < 3; ++p) {
      r[p] = p < P ? r_[p] : 1;
      start[p] = s; out[p] = M; woff[p] = w;
      if (p < P) { s += len[p]; M += (len[p] + r[p] - 1) / r[p]; w += r[p]; }
    }
  }
  // Part of output row m.
  SGATTN_HD int part_of_row(int64_t m) const {
    return (P > 1 && m >= out[1]) ? ((P > 2 && m >= out[2]) ? 2 : 1) : 0;
  }
  // Part of sorted position pos.
  SGATTN_HD int part_of_pos(int64_t pos) const {
    return (P > 1 && pos >= start[1]) ? ((P > 2 && pos >= start[2]) ? 2 : 1) : 0;
  }
  // Members of output row m: sorted positions [first, first + count).
  SGATTN_HD void members(int64_t m, int p, int64_t& first, int64_t& count) const {
    const int64_t g = m - out[p];
    first = start[p] + g * r[p];
    const int64_t end = start[p] + len[p];
    count = (end - first < r[p]) ? end - first : r[p];
  }
};

}  // namespace sgattn
