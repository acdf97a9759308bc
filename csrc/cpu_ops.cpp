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
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention.h"
#include "op_contract.h"
#include "sgattn_common.h"
#include "sgattn_op_schemas.h"

namespace {

using sgattn::ReallocPlan;
using namespace sgattn::cpu;  // kernels/cpu/attention.h: the framework-free tile kernels

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

// ------------------------------------------------------------------ scratch

// Every registered op validates all of its arguments before it touches memory
// (sizes with overflow-checked arithmetic, dtypes, devices, index contents,
// scratch sizes) and fails with a ValueError that names the problem.
// Scratch is allocated before each parallel region, so no C++ exception can
// leave an OpenMP region (which would terminate the process).

// Scratch limits. Real inputs need a few MiB per thread (a tile of query rows
// and one head's keys); sizes beyond these limits (e.g. expanded tensors with
// billions of keys) are refused with a clear error instead of failing in the
// allocator or swapping. Fewer threads run when the total would exceed
// kMaxTotalScratch; results never depend on the thread count.
constexpr int64_t kMaxThreadScratch = int64_t(1) << 30;  // 1 GiB per thread
constexpr int64_t kMaxTotalScratch = int64_t(4) << 30;   // 4 GiB per call

// Per-thread scratch arrays carved out of one zero-filled allocation.
class Scratch {
 public:
  // Reserves a * b elements of E per thread; returns the array's handle.
  template <typename E>
  int64_t reserve(int64_t a, int64_t b) {
    int64_t n = 0, nb = 0;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &n) ||
        __builtin_mul_overflow(n, static_cast<int64_t>(sizeof(E)), &nb) || nb > kMaxThreadScratch) {
      too_big_ = true;
      return 0;
    }
    const int64_t off = bytes_;
    bytes_ += (nb + 63) / 64 * 64;
    if (bytes_ > kMaxThreadScratch) too_big_ = true;
    return off;
  }
  bool too_big() const { return too_big_; }
  // Allocates the reserved arrays (zero-filled) for the threads to run; returns their count.
  int allocate() {
    TORCH_INTERNAL_ASSERT(!too_big_);
    per_ = std::max<int64_t>(bytes_, 64);
    nthreads_ = static_cast<int>(
        std::clamp<int64_t>(kMaxTotalScratch / per_, 1, std::max(1, omp_get_max_threads())));
    buf_ = at::zeros({nthreads_, per_ / 8}, at::TensorOptions().dtype(at::kDouble));
    base_ = static_cast<char*>(buf_.data_ptr());
    return nthreads_;
  }
  // The calling thread's array (inside a parallel region of allocate()'s thread count).
  template <typename E>
  E* get(int64_t handle) const {
    return reinterpret_cast<E*>(base_ + static_cast<int64_t>(omp_get_thread_num()) * per_ + handle);
  }

 private:
  int64_t bytes_ = 0, per_ = 0;
  bool too_big_ = false;
  int nthreads_ = 1;
  at::Tensor buf_;
  char* base_ = nullptr;
};

// A shared (not per-thread) buffer of a * b elements, zero-filled (uninitialised
// when !zero: the work items fill their own parts), within the total limit.
template <typename E>
at::Tensor shared_buffer(int64_t a, int64_t b, at::ScalarType st, const char* op, const char* what,
                         bool zero = true) {
  int64_t n = 0, nb = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &n) && !__builtin_mul_overflow(n, static_cast<int64_t>(sizeof(E)), &nb) &&
                  nb <= kMaxTotalScratch,
              op, ": ", what, " would need ", a, " x ", b, " elements of scratch, above the cpu kernel's limit of ",
              kMaxTotalScratch >> 30, " GiB; such sizes are not supported");
  return zero ? at::zeros({a, b}, at::TensorOptions().dtype(st)) : at::empty({a, b}, at::TensorOptions().dtype(st));
}

// ---------------------------------------------------------------- validation
// The contract shared with the cuda binding is csrc/op_contract.h; the device
// check is this binding's.

void check_cpu(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts) {
    TORCH_CHECK_VALUE(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name,
                      " must be a CPU tensor (this is the cpu kernel), got a tensor on ", t->device());
  }
}

// ----------------------------------------------------------------- attention

// A [B, h, L, c] view given by pointer and element strides.
template <typename T>
struct View4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  View4(const at::Tensor& t)
      : p(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
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

// Forward. Every work partition below depends on the shapes only, never on the
// thread count, and every reduction runs in a fixed order: results are
// bitwise independent of the number of threads.
template <typename T>
void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                       int64_t window, int64_t H, int64_t W, bool need_imp, at::Tensor& out,
                       at::Tensor& lse, at::Tensor& imp) {
  const char* op = "attention_fwd";
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t M = k.size(2), dv = v.size(3), dvp = pad16(dv);
  const float scale = static_cast<float>(scale_d);
  const View4<T> Q(q), K(k), V(v);
  T* o = out.data_ptr<T>();          // contiguous [B, h, N, dv]
  float* l = lse.data_ptr<float>();  // contiguous [B, h, N]
  auto store = [&](int64_t b, int64_t hh, const int64_t* tok, int64_t first, int64_t nq, const float* O,
                   const float* L) {
    put_rows(o + (b * h + hh) * N * dv, O, dvp, tok, first, nq, dv);
    float* lrow = l + (b * h + hh) * N;
    for (int64_t i = 0; i < nq; ++i) lrow[tok ? tok[i] : first + i] = L[i];
  };

  // A window covering the whole grid is one window over all tokens in order:
  // exactly global attention, computed by the global path (same bits).
  if (window > 0 && Windows(H, W, window).count() == 1) window = 0;
  if (window == 0) {
    // Work items (b, chunk of query blocks); the heads loop inside, so an item
    // owns its importance partial and gathers each head's keys once.
    // Query blocks: S tiles of about 16K floats (L2-resident), 64 to 256 rows;
    // smaller when B*N is small, so that every thread gets work.
    const int64_t Mp = pad16(M);
    int64_t QB = 64;
    while (QB < 256 && 2 * QB * Mp <= 16384) QB *= 2;
    QB = std::min(QB, std::clamp<int64_t>((B * N / 64 + 3) / 4 * 4, 16, 256));
    const int64_t nqb = (N + QB - 1) / QB;
    const int64_t per_b = std::min(nqb, (kChunks + B - 1) / B), ntask = B * per_b;
    // fp32 K, V with unit-stride rows feed the GEMMs in place (blas_rows); an
    // fp32 output is written in place too.
    const bool dirK = blas_in_place(K, d), dirV = blas_in_place(V, dv),
               dirO = std::is_same_v<T, float> && dv <= std::numeric_limits<int>::max();
    Scratch sc;
    const int64_t hK = sc.reserve<float>(Mp, d), hV = sc.reserve<float>(Mp, dvp), hQ = sc.reserve<float>(QB, d),
                  hS = sc.reserve<float>(QB, Mp), hO = sc.reserve<float>(QB, dvp), hL = sc.reserve<float>(QB, 1),
                  hC = sc.reserve<float>(Mp, 1), hR = sc.reserve<float>(QB, 1);
    TORCH_CHECK_VALUE(!sc.too_big(), op, ": M=", M, " keys with d=", d, ", dv=", dv, " need more than ",
                kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
    at::Tensor partial_t = need_imp ? shared_buffer<double>(ntask, M, at::kDouble, op, "the importance partials")
                                    : at::Tensor();
    double* partial = need_imp ? partial_t.data_ptr<double>() : nullptr;
    const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
    {
      float *Kr = sc.get<float>(hK), *Vf = sc.get<float>(hV), *Qs = sc.get<float>(hQ), *S = sc.get<float>(hS),
            *O = sc.get<float>(hO), *L = sc.get<float>(hL), *cs = sc.get<float>(hC), *Ri = sc.get<float>(hR);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t b = task / per_b, c = task % per_b;
        const int64_t blk0 = c * nqb / per_b, blk1 = (c + 1) * nqb / per_b;
        double* acc = need_imp ? partial + task * M : nullptr;
        for (int64_t hh = 0; hh < h; ++hh) {
          const Rows kr = blas_rows(K, dirK, b, hh, M, d, Kr, d), vr = blas_rows(V, dirV, b, hh, M, dv, Vf, dvp);
          for (int64_t blk = blk0; blk < blk1; ++blk) {
            const int64_t i0 = blk * QB, nq = std::min(QB, N - i0);
            gather_rows(Q, b, hh, nullptr, i0, nq, d, scale, Qs, d, false);
            if (acc) std::fill(cs, cs + Mp, 0.0f);
            // S = Qs K^T, softmax rows (and their column sums), O = P V.
            gemm_rm(false, true, nq, M, d, 1.0f, Qs, d, kr.p, kr.ld, 0.0f, S, Mp);
            // The rows stay unnormalised and O's rows are scaled instead (the
            // nq x M tile is not written a third time).
            softmax_rows(S, nq, M, Mp, L, acc ? cs : nullptr, Ri);
            auto normalise = [&](float* rows, int64_t ld) {
              for (int64_t i = 0; i < nq; ++i)
                for (int64_t e = 0; e < dv; ++e) rows[i * ld + e] *= Ri[i];
            };
            if (dirO) {  // fp32 output: written in place, rows i0.. of (b, hh)
              float* orow = reinterpret_cast<float*>(o) + ((b * h + hh) * N + i0) * dv;
              gemm_rm(false, false, nq, dv, M, 1.0f, S, Mp, vr.p, vr.ld, 0.0f, orow, dv);
              normalise(orow, dv);
              float* lrow = l + (b * h + hh) * N + i0;
              std::copy(L, L + nq, lrow);
            } else {
              gemm_rm(false, false, nq, dv, M, 1.0f, S, Mp, vr.p, vr.ld, 0.0f, O, dvp);
              normalise(O, dvp);
              store(b, hh, nullptr, i0, nq, O, L);
            }
            if (acc) {  // a tile's fp32 column sums, accumulated in double in a fixed order
              for (int64_t j = 0; j < M; ++j) acc[j] += cs[j];
            }
          }
        }
      }
    }
    if (need_imp) {
      float* dst = imp.data_ptr<float>();
      const double inv = 1.0 / (static_cast<double>(h) * static_cast<double>(N));
      // Each element sums its partials in the same order whoever runs it; small
      // reductions skip the extra parallel region (a barrier on a loaded machine).
#pragma omp parallel for schedule(static) num_threads(nt) if (B * M * per_b > (int64_t(1) << 16))
      for (int64_t bj = 0; bj < B * M; ++bj) {
        const int64_t b = bj / M, j = bj % M;
        double s = 0;
        for (int64_t c = 0; c < per_b; ++c) s += partial[(b * per_b + c) * M + j];
        dst[bj] = static_cast<float>(s * inv);
      }
    }
    return;
  }

  // Window mode: work items (b, window); only the real tokens of a window take
  // part, which is exactly the reference's masking of padded queries and keys.
  const Windows geo(H, W, window);
  const int64_t nW = geo.count(), Lmax = geo.max_tokens(), Lp = pad16(Lmax), QB = std::min(kQB, Lmax);
  Scratch sc;
  const int64_t hKt = sc.reserve<float>(d, Lp), hV = sc.reserve<float>(Lp, dvp), hQ = sc.reserve<float>(QB, d),
                hS = sc.reserve<float>(QB, Lp), hO = sc.reserve<float>(QB, dvp), hL = sc.reserve<float>(QB, 1),
                hC = sc.reserve<float>(Lp, 1), hA = sc.reserve<double>(Lmax, 1), hT = sc.reserve<int64_t>(Lmax, 1);
  TORCH_CHECK_VALUE(!sc.too_big(), op, ": windows of ", Lmax, " tokens with d=", d, ", dv=", dv, " need more than ",
              kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
  float* dst = need_imp ? imp.data_ptr<float>() : nullptr;
  const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
  {
    float *Kt = sc.get<float>(hKt), *Vf = sc.get<float>(hV), *Qs = sc.get<float>(hQ), *S = sc.get<float>(hS),
          *O = sc.get<float>(hO), *L = sc.get<float>(hL), *cs = sc.get<float>(hC);
    double* acc = sc.get<double>(hA);
    int64_t* tok = sc.get<int64_t>(hT);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * nW; ++task) {
      const int64_t b = task / nW, n = geo.tokens(task % nW, tok), np = pad16(n);
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
          store(b, hh, tok + i0, 0, nq, O, L);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale,
                                                             int64_t window, int64_t H, int64_t W,
                                                             bool need_importance) {
  check_cpu("attention_fwd", {{"q", &q}, {"k", &k}, {"v", &v}});
  sgattn::contract::check_attention("attention_fwd", q, k, v, scale, window, H, W, need_importance);
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), M = k.size(2), dv = v.size(3);
  // Contract of every native op: contiguous outputs, whatever the inputs' strides.
  auto out = at::empty({B, h, N, dv}, q.options());
  auto lse = at::empty({B, h, N}, q.options().dtype(at::kFloat));
  auto imp = need_importance ? at::empty({B, window ? N : M}, q.options().dtype(at::kFloat))
                             : at::empty({0}, q.options().dtype(at::kFloat));
  if (B == 0 || h == 0) return {out, lse, imp};  // empty results (importance [0, *] when B == 0)
  dispatch_floating(q.scalar_type(), false, "attention_fwd", [&](auto tag) {
    using T = decltype(tag);
    attention_fwd_cpu<T>(q, k, v, scale, window, H, W, need_importance, out, lse, imp);
  });
  return {out, lse, imp};
}

// Backward from the forward's lse: each tile's scores are recomputed (never
// the N x M matrix) and P = exp(s - lse) taken in one pass (see
// tile_backward for D). Global mode: work items (b, h, chunk of query
// blocks), the chunks' dK, dV partials reduced in a fixed order (see below);
// window mode: items (b, window) own the window's keys. Deterministic and
// independent of the thread count.
template <typename T>
void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& lse, double scale_d, int64_t window, int64_t H, int64_t W, at::Tensor& dq,
                       at::Tensor& dk, at::Tensor& dv_t) {
  const char* op = "attention_bwd";
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t M = k.size(2), dv = v.size(3), dp = pad16(d), dvp = pad16(dv);
  const float scale = static_cast<float>(scale_d);
  const View4<T> Q(q), K(k), V(v), dO(dout);
  // The forward's lse of n query rows of (b, hh), rows tok[i] (or first + i), into L.
  const float* lsep = lse.const_data_ptr<float>();  // contiguous [B, h, N]
  auto gather_lse = [&](int64_t b, int64_t hh, const int64_t* tok, int64_t first, int64_t n, float* L) {
    for (int64_t i = 0; i < n; ++i) L[i] = lsep[(b * h + hh) * N + (tok ? tok[i] : first + i)];
  };
  T* dqp = dq.data_ptr<T>();  // contiguous outputs
  T* dkp = dk.data_ptr<T>();
  T* dvp_ = dv_t.data_ptr<T>();
  if (window > 0 && Windows(H, W, window).count() == 1) window = 0;  // one window: global attention
  if (window == 0) {
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
    Scratch sc;
    const int64_t hQs = sc.reserve<float>(nq_max, dp), hKr = sc.reserve<float>(Mp, dp),
                  hVr = sc.reserve<float>(Mp, dvp), hdO = sc.reserve<float>(nq_max, dvp),
                  hP = sc.reserve<float>(nq_max, Mp), hdP = sc.reserve<float>(nq_max, Mp),
                  hdQ = sc.reserve<float>(nq_max, dp), hdK = sc.reserve<float>(Mp, dp),
                  hdV = sc.reserve<float>(Mp, dvp), hAcc = sc.reserve<float>(kRB, dp + dvp),
                  hL = sc.reserve<float>(nq_max, 1);
    TORCH_CHECK_VALUE(!sc.too_big(), op, ": ", M, " keys per row with d=", d, ", dv=", dv, " need more than ",
                kMaxThreadScratch >> 30, " GiB of scratch per thread; such sizes are not supported");
    // Partials: per_bh slices of Mp * (dp + dvp) floats per head, at most
    // kMaxBwdPartials bytes in all (fewer chunks per head beyond that).
    const int64_t slice = Mp * (dp + dvp);  // no overflow: the scratch (Kr, Vr) holds as much
    int64_t per_bh = std::min(nqb, target);
    if (per_bh > 1) per_bh = std::min(per_bh, kMaxBwdPartials / static_cast<int64_t>(sizeof(float)) / slice / BH);
    per_bh = std::max<int64_t>(per_bh, 1);
    const int64_t ntask = BH * per_bh, nrb = (M + kRB - 1) / kRB;
    at::Tensor partial_t = per_bh > 1 ? shared_buffer<float>(ntask, slice, at::kFloat, op, "the dK/dV partials", false)
                                      : at::Tensor();
    float* partial = per_bh > 1 ? partial_t.data_ptr<float>() : nullptr;
    const int nt = sc.allocate();
#pragma omp parallel num_threads(nt)
    {
      float *Qs = sc.get<float>(hQs), *Kr = sc.get<float>(hKr), *Vr = sc.get<float>(hVr),
            *dOs = sc.get<float>(hdO), *P = sc.get<float>(hP), *dP = sc.get<float>(hdP), *dQ = sc.get<float>(hdQ),
            *L = sc.get<float>(hL);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < ntask; ++task) {
        const int64_t bh = task / per_bh, c = task % per_bh, b = bh / h, hh = bh % h;
        const int64_t blk0 = c * nqb / per_bh, blk1 = (c + 1) * nqb / per_bh;
        const Rows kr = blas_rows(K, dirK, b, hh, M, d, Kr, dp), vr = blas_rows(V, dirV, b, hh, M, dv, Vr, dvp);
        // The item's dK [Mp][dp] and dV [Mp][dvp]: its partial slice or the
        // thread's scratch, overwritten by its first block (every item has at
        // least one: per_bh <= nqb) and accumulated by the others. Only rows
        // < M and columns < d (dv) are read back.
        float* dK = partial ? partial + task * slice : sc.get<float>(hdK);
        float* dV = partial ? dK + Mp * dp : sc.get<float>(hdV);
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t i0 = blk * nq_max, nq = std::min(nq_max, N - i0);
          gather_rows(Q, b, hh, nullptr, i0, nq, d, scale, Qs, dp, false);
          gather_rows(dO, b, hh, nullptr, i0, nq, dv, 1.0f, dOs, dvp, false);
          gather_lse(b, hh, nullptr, i0, nq, L);
          tile_backward_blas(nq, M, Mp, d, dp, dv, dvp, scale, Qs, kr.p, kr.ld, vr.p, vr.ld, dOs, L, P, dP, dQ, dK, dV,
                             blk == blk0 ? 0.0f : 1.0f);
          put_rows(dqp + bh * N * d, dQ, dp, nullptr, i0, nq, d);
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
    return;
  }
  // Window mode: items (b, window) own the window's keys, all heads.
  const Windows geo(H, W, window);
  const int64_t nk_max = geo.max_tokens(), nq_max = std::min(kQB, nk_max), nkp_max = pad16(nk_max);
  const int64_t nW = geo.count(), ntask = B * nW;
  Scratch sc;
  const int64_t hQs = sc.reserve<float>(nq_max, dp), hKr = sc.reserve<float>(nkp_max, dp),
                hKt = sc.reserve<float>(d, nkp_max), hVt = sc.reserve<float>(dv, nkp_max),
                hdO = sc.reserve<float>(nq_max, dvp), hP = sc.reserve<float>(nq_max, nkp_max),
                hdP = sc.reserve<float>(nq_max, nkp_max), hTr = sc.reserve<float>(nkp_max, nq_max),
                hdQ = sc.reserve<float>(nq_max, dp), hdK = sc.reserve<float>(nkp_max, dp),
                hdV = sc.reserve<float>(nkp_max, dvp), hT = sc.reserve<int64_t>(nk_max, 1),
                hL = sc.reserve<float>(nq_max, 1);
  TORCH_CHECK_VALUE(!sc.too_big(), op, ": ", nk_max, " keys per row with d=", d, ", dv=", dv, " need more than ",
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
      const int64_t b = task / nW, nk = geo.tokens(task % nW, tok), nkp = pad16(nk);
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
          gather_lse(b, hh, tok + i0, 0, nq, L);
          tile_backward(nq, nk, nkp, d, dp, dv, dvp, scale, Qs, Kr, Kt, Vt, dOs, L, P, dP, Tr, dQ, dK, dV);
          put_rows(dqp + (b * h + hh) * N * d, dQ, dp, tok + i0, 0, nq, d);
        }
        put_rows(dkp + (b * h + hh) * M * d, dK, dp, tok, 0, nk, d);
        put_rows(dvp_ + (b * h + hh) * M * dv, dV, dvp, tok, 0, nk, dv);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse_in,
                                                             double scale, int64_t window, int64_t H, int64_t W) {
  const char* op = "attention_bwd";
  // The forward's out and lse (any strides; lse is read contiguous). The CPU
  // kernels take D from each score tile and read only lse; out is checked so
  // that the op's contract is the same on every device.
  check_cpu(op, {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse_in}});
  const auto shape = sgattn::contract::check_attention(op, q, k, v, scale, window, H, W, false);
  sgattn::contract::check_attention_grads(op, shape, q, dout, out, lse_in);
  const at::Tensor lse = lse_in.contiguous();
  // Contiguous outputs (at::empty of the sizes), whatever the inputs' strides.
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  if (q.size(0) == 0 || q.size(1) == 0) return {dq, dk, dv};  // empty gradients
  dispatch_floating(q.scalar_type(), false, op, [&](auto tag) {
    attention_bwd_cpu<decltype(tag)>(dout, q, k, v, lse, scale, window, H, W, dq, dk, dv);
  });
  return {dq, dk, dv};
}

// ---------------------------------------------------------------- aggregation

// Every index row [g, b, :] must be a permutation of 0..N-1 (an argsort):
// other values would read or write out of bounds, and the backward relies on
// each token having exactly one sorted position per ordering. O(G*B*N).
void check_permutations(const at::Tensor& idx, const char* op) {
  const int64_t G = idx.size(0), B = idx.size(1), N = idx.size(2), rows = G * B;
  if (rows == 0 || N == 0) return;
  const int64_t* p = idx.const_data_ptr<int64_t>();  // contiguous
  const int nt = static_cast<int>(std::clamp<int64_t>(kMaxTotalScratch / N, 1, std::max(1, omp_get_max_threads())));
  at::Tensor seen_t = at::zeros({nt, N}, at::TensorOptions().dtype(at::kByte));
  at::Tensor bad_t = at::zeros({rows}, at::TensorOptions().dtype(at::kByte));
  uint8_t* seen = seen_t.data_ptr<uint8_t>();
  uint8_t* bad = bad_t.data_ptr<uint8_t>();
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
  for (int64_t r = 0; r < rows; ++r) {
    if (!bad[r]) continue;
    const int64_t* row = p + r * N;
    const int64_t g = r / B, b = r % B;
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < N, op, ": index values must lie in [0, N) = [0, ", N, "), got index[", g,
                  ", ", b, ", ", i, "] = ", row[i]);
    }
    std::vector<uint8_t> s(N, 0);
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK_VALUE(!s[row[i]], op, ": index[", g, ", ", b, "] is not a permutation of 0..N-1 (value ", row[i],
                  " repeats at position ", i, "); each row must be the argsort of an importance vector");
      s[row[i]] = 1;
    }
  }
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
  Scratch sc;
  const int64_t hA = sc.reserve<A>(C, 1);
  TORCH_CHECK_VALUE(!sc.too_big(), "aggregate_fwd: C=", C, " channels are not supported");
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

template <typename T>
void aggregate_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& idx,
                       const at::Tensor& w, const ReallocPlan& plan, at::Tensor& dx, at::Tensor& dw,
                       at::Tensor& db) {
  using A = acc_t<T>;
  const char* op = "aggregate_bwd";
  const int64_t G = idx.size(0), B = x.size(0), N = x.size(1), C = x.size(2), M = plan.M;
  const int64_t P = plan.P;
  const T* gp = grad.const_data_ptr<T>();  // contiguous [G, B, M, C]
  const T* xp = x.const_data_ptr<T>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const T* wp = w.const_data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
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
  at::Tensor partial_t = shared_buffer<double>(ntask, R + P, at::kDouble, op, "the weight-gradient partials");
  double* partial = partial_t.data_ptr<double>();
  Scratch sc;
  const int64_t hD = sc.reserve<A>(N, std::min(CH, C));
  TORCH_CHECK_VALUE(!sc.too_big(), op, ": N=", N, " tokens are not supported");
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
          const int64_t off = pos - plan.start[p], m = plan.out[p] + off / plan.r[p];
          const int64_t jw = plan.woff[p] + off % plan.r[p], jc = coff[p] + off % plan.r[p];
          const A wj = static_cast<A>(wp[jw]);
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
          pw[jc] += dot;
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
  T* dwp = dw.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
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

at::Tensor aggregate_fwd(const at::Tensor& x_in, const at::Tensor& index, const at::Tensor& weights,
                         const at::Tensor& biases, c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_fwd";
  check_cpu(op, {{"x", &x_in}, {"index", &index}, {"weights", &weights}, {"biases", &biases}});
  const ReallocPlan plan = sgattn::contract::check_aggregate(op, x_in, index, weights, &biases, group_sizes, true);
  // Contiguous output [G, B, M, C].
  auto out = at::empty({index.size(0), x_in.size(0), plan.M, x_in.size(2)}, x_in.options());
  auto idx = index.contiguous();
  check_permutations(idx, op);
  if (out.numel() == 0) return out;
  auto x = x_in.contiguous(), w = weights.contiguous(), b = biases.contiguous();
  dispatch_floating(x.scalar_type(), true, op, [&](auto tag) {
    aggregate_fwd_cpu<decltype(tag)>(x, idx, w, b, plan, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_bwd(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                             const at::Tensor& index, const at::Tensor& weights,
                                                             c10::IntArrayRef group_sizes) {
  const char* op = "aggregate_bwd";
  check_cpu(op, {{"grad", &grad_in}, {"x", &x_in}, {"index", &index}, {"weights", &weights}});
  const ReallocPlan plan = sgattn::contract::check_aggregate(op, x_in, index, weights, nullptr, group_sizes, true);
  sgattn::contract::check_aggregate_grad(op, plan, x_in, index, grad_in);
  auto idx = index.contiguous();
  check_permutations(idx, op);
  // Contiguous outputs, whatever the inputs' strides.
  auto dx = at::empty(x_in.sizes(), x_in.options());
  auto dw = at::empty(weights.sizes(), weights.options());
  auto db = at::empty({plan.P}, x_in.options());
  auto x = x_in.contiguous(), w = weights.contiguous(), grad = grad_in.contiguous();
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
