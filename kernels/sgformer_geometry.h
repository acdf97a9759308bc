// SG-Former arithmetic shared by the CPU (kernels/cpu/) and CUDA (kernels/*.cuh)
// kernels and the host planner: window geometry and the reallocation plan.
// Framework-free, plain C++ that also compiles as __host__ __device__ code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SGATTN_HD __host__ __device__ __forceinline__
#else
#define SGATTN_HD inline
#endif

namespace sgattn {

// One w x w window whose top-left corner is (y0, x0) on the H x W grid.
// Window-local position l = dy * w + dx; token() is -1 for a position past
// the grid's bottom or right edge (padding).
template <typename I>
struct Window {
  I y0, x0, w, H, W;
  SGATTN_HD I token(I l) const {
    const I dy = l / w, dx = l - dy * w, y = y0 + dy, x = x0 + dx;
    return (y < H && x < W) ? y * W + x : -1;
  }
  SGATTN_HD I rows() const { return H - y0 < w ? H - y0 : w; }
  SGATTN_HD I cols() const { return W - x0 < w ? W - x0 : w; }
  // Real tokens (the mean of a window's importance runs over these).
  SGATTN_HD I real_count() const { return rows() * cols(); }
  // Lists the real tokens row-major into tok (padding skipped); returns their count.
  SGATTN_HD I tokens(I* tok) const {
    const I y1 = y0 + rows(), x1 = x0 + cols();
    I n = 0;
    for (I y = y0; y < y1; ++y)
      for (I x = x0; x < x1; ++x) tok[n++] = y * W + x;
    return n;
  }
};

// Non-overlapping w x w windows on an H x W row-major grid, padded at the
// bottom/right to multiples of w, numbered row-major. I is the index type:
// int64_t on the host, int in the CUDA kernels (sizes checked by the planner).
template <typename I = int64_t>
struct WindowGeom {
  I H, W, w, nwx, nwy;
  SGATTN_HD WindowGeom(I H_, I W_, I w_) : H(H_), W(W_), w(w_), nwx((W_ + w_ - 1) / w_), nwy((H_ + w_ - 1) / w_) {}
  // The same windows with the side clamped to max(H, W): a larger window covers
  // the whole grid in each direction exactly as the clamped one does, and the
  // clamped side bounds every size by the grid's.
  SGATTN_HD static WindowGeom clamped(I H, I W, I w) {
    const I side = H > W ? H : W;
    return WindowGeom(H, W, w < side ? w : side);
  }
  SGATTN_HD I num_windows() const { return nwx * nwy; }
  // Positions per window, padding included.
  SGATTN_HD I size() const { return w * w; }
  // Real tokens of the largest window.
  SGATTN_HD I max_real() const { return (w < H ? w : H) * (w < W ? w : W); }
  SGATTN_HD Window<I> window(I win) const {
    const I wy = win / nwx;
    return {wy * w, (win - wy * nwx) * w, w, H, W};
  }
  // Window holding token tok.
  SGATTN_HD I window_of(I tok) const { return (tok / W / w) * nwx + (tok % W) / w; }
  SGATTN_HD I real_count(I win) const { return window(win).real_count(); }
};

// Reallocation plan for N importance-sorted tokens and P = 2 or 3 parts with
// group sizes r_p: part p covers sorted positions [start[p], start[p]+len[p])
// (quarters [N/4, 2*(N/4), rest] for three parts, halves [N/2, rest] for two,
// as sgattn.reference.reallocation_parts), its groups of r_p consecutive
// positions are output rows [out[p], out[p] + groups(p)), and its weights sit
// at [woff[p], woff[p] + r[p]) of the concatenated weight vector.
struct ReallocPlan {
  int P;
  int64_t N, M;
  int64_t start[3], len[3], out[3], r[3], woff[3];

  SGATTN_HD ReallocPlan() : P(0), N(0), M(0) {}
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
      if (p < P) { s += len[p]; M += groups(p); w += r[p]; }
    }
  }
  // Groups (output rows) of part p; the last one may be short.
  SGATTN_HD int64_t groups(int p) const { return (len[p] + r[p] - 1) / r[p]; }
  // Part of output row m.
  SGATTN_HD int part_of_row(int64_t m) const {
    return (P > 1 && m >= out[1]) ? ((P > 2 && m >= out[2]) ? 2 : 1) : 0;
  }
  // Part of sorted position pos.
  SGATTN_HD int part_of_pos(int64_t pos) const {
    return (P > 1 && pos >= start[1]) ? ((P > 2 && pos >= start[2]) ? 2 : 1) : 0;
  }
  // Members of output row m (of part p): sorted positions [first, first + count).
  SGATTN_HD void members(int64_t m, int p, int64_t& first, int64_t& count) const {
    const int64_t g = m - out[p];
    first = start[p] + g * r[p];
    const int64_t end = start[p] + len[p];
    count = (end - first < r[p]) ? end - first : r[p];
  }
  // Where sorted position pos (of part p) goes: output row m, with the part's weight j (0 <= j < r[p]).
  SGATTN_HD void slot(int64_t pos, int p, int64_t& m, int64_t& j) const {
    const int64_t off = pos - start[p], g = off / r[p];
    m = out[p] + g;
    j = off - g * r[p];
  }
};

}  // namespace sgattn
