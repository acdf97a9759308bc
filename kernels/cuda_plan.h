// Argument structs and launch planner of the CUDA kernels, host-compilable (no
// device code) so that the g++-compiled bindings fill them in and the planner
// runs (and is tested) without a GPU.
#pragma once
#include <cstddef>
#include <cstdint>

#include "sgformer_geometry.h"

namespace sgattn {

enum class DType { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int kKeyTile = 64;      // keys per step of the online-softmax loop / key tile of the importance pass
constexpr int kQueryChunk = 64;   // queries per step of the importance pass
constexpr int kImpWarps = 4;      // warps of the importance kernel (16 keys each)
constexpr int kBwdQueryChunk = 32;  // queries per step of the dK/dV kernel
constexpr int kMaxHeadDim = 128;
constexpr int64_t kMaxBlocks = 0x7fffffff;  // grid.x limit: all work is linearised on grid.x
constexpr int64_t kMaxGroupSize = 1 << 20;  // reallocation group size bound (r_p)

// How a kernel stages a [rows, d] tile of one input tensor into shared memory (set per launch
// by choose_load_modes in kernels/attention.cuh; 0, the value-initialised default, is always safe).
constexpr int kLoadSync = 0;     // element loads and shared stores
constexpr int kLoadAsync4 = 1;   // fp32: 4-byte cp.async per element
constexpr int kLoadAsync16 = 2;  // fp16/bf16: 16-byte cp.async.cg (16-byte aligned base and outer strides, unit inner stride)

struct AttnParams {
  const void* q;  // [B, h, N, d] with strides q_stride (elements)
  const void* k;  // [B, h, M, d]
  const void* v;  // [B, h, M, d]
  void* out;      // [B, h, N, d] contiguous (forward)
  float* lse;     // [B, h, N] contiguous: natural-log log-sum-exp of the scaled scores (forward writes, backward reads)
  int64_t q_stride[4], k_stride[4], v_stride[4];
  int64_t B, h, N, M, d;
  float scale;
  int64_t window, H, W;  // window 0: global mode
  int q_load, k_load, v_load;  // kLoad* modes of q, k, v
};

// Extra arguments of the attention backward (dO strided like q; outputs contiguous).
struct AttnBwdArgs {
  const void* dout;        // [B, h, N, d] with strides do_stride
  int64_t do_stride[4];
  int do_load;             // kLoad* mode of dout
  const void* out;         // [B, h, N, d] with strides out_stride: the forward's output
  int64_t out_stride[4];
  float* delta;            // [B, h, N] fp32 scratch: rowsum(dO * O)
  float* kv_partial;       // plan.kv_partial_elems fp32 scratch (kv_splits > 1): per-split dK, dV
  void* dq;                // [B, h, N, d]
  void* dk;                // [B, h, M, d]
  void* dv;                // [B, h, M, d]
};

// Launch geometry; computed on the host by plan_attention (also sizes the partials).
// A "segment" is the set of queries that see the same keys: the whole sequence
// (global) or one window. All blocks are linearised on grid.x.
struct AttnPlan {
  int warps = 0, QT = 0;          // forward: 16 * warps queries per block
  int o_in_s = 0;                 // forward: one key tile per segment, fp16/bf16, head dim <= 64: no O buffer
  int64_t segments = 0;           // 1 (global) or number of windows
  int64_t seg_queries = 0;        // query (and window key) positions per segment
  int64_t seg_keys = 0;           // key positions per segment
  int64_t subtiles = 0;           // forward query tiles per segment
  int64_t ktiles = 0;             // key tiles per segment (importance pass)
  int64_t splits = 0;             // importance pass: query splits per key tile
  int64_t split_queries = 0;      // queries per split (multiple of kQueryChunk)
  int64_t fwd_blocks = 0, imp_blocks = 0;
  int64_t ncols = 0;              // importance columns: M (global) or N (window)
  int64_t partial_elems = 0;      // [B, h * splits, ncols]
  size_t smem = 0, imp_smem = 0;  // dynamic shared memory of the two kernels
  const char* error = nullptr;    // why the kernels cannot run these inputs
  // Backward (dK/dV key-major with 16 * kv_warps keys per block; dQ query-major with 16 * dq_warps queries).
  int kv_warps = 0, dq_warps = 0;
  int64_t kv_ktiles = 0, dq_subtiles = 0, kv_blocks = 0, dq_blocks = 0;
  int64_t kv_splits = 0, kv_split_queries = 0;  // dK/dV: query splits (fixed-order reduction when > 1)
  int64_t kv_partial_elems = 0;                 // 2 * kv_splits * B * h * M * d when kv_splits > 1
  size_t kv_smem = 0, dq_smem = 0;
  const char* bwd_error = nullptr;
};

inline size_t round128(size_t x) { return (x + 127) / 128 * 128; }
inline int padded_head_dim(int64_t d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }
inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
// Shared-memory row strides (elements): +8 halves keep WMMA rows 16-byte aligned, +1 float avoids bank conflicts.
inline int tile_ld(DType t, int DP) { return DP + (t == DType::F32 ? 1 : 8); }

// Dynamic shared memory of the forward kernel: Q tile, K/V tile, scores (P in place), O accumulator
// (none when o_in_s: O lands in the score rows), m and l.
inline size_t attention_fwd_smem(DType t, int DP, int QT, bool o_in_s = false) {
  const size_t es = dtype_size(t), ld = tile_ld(t, DP);
  return round128(QT * ld * es) + round128(kKeyTile * ld * es) + round128(size_t(QT) * (kKeyTile + 4) * 4) +
         (o_in_s ? 0 : round128(size_t(QT) * (DP + 4) * 4)) + 2 * round128(size_t(QT) * 4);
}
// O can live in the score rows (attention_fwd_kernel) when every segment has a single key tile and a
// row of DP fp32 values fits in a score row of kKeyTile + 4 floats (tensor-core path only).
inline bool attention_o_in_s(DType t, int DP, int64_t seg_keys) {
  return t != DType::F32 && DP <= kKeyTile + 4 && seg_keys <= kKeyTile;
}
// Importance pass: K tile, Q chunk, transposed scores, lse chunk, column sums.
inline size_t attention_imp_smem(DType t, int DP) {
  const size_t es = dtype_size(t), ld = tile_ld(t, DP);
  return round128(kKeyTile * ld * es) + round128(kQueryChunk * ld * es) +
         round128(size_t(kKeyTile) * (kQueryChunk + 4) * 4) + 2 * round128(kQueryChunk * 4);
}

// Backward, dK/dV: K, V tiles, Q, dO chunks, scores and dP (transposed), dK, dV accumulators, lse and D.
inline size_t attention_kv_smem(DType t, int DP, int KTb) {
  const size_t es = dtype_size(t), ld = tile_ld(t, DP);
  return 2 * round128(KTb * ld * es) + 2 * round128(kBwdQueryChunk * ld * es) +
         2 * round128(size_t(KTb) * (kBwdQueryChunk + 4) * 4) + 2 * round128(size_t(KTb) * (DP + 4) * 4) +
         2 * round128(kBwdQueryChunk * 4);
}
// Backward, dQ: Q, dO tiles, K, V tiles, scores and dP, dQ accumulator, lse and D.
inline size_t attention_dq_smem(DType t, int DP, int QTb) {
  const size_t es = dtype_size(t), ld = tile_ld(t, DP);
  return 2 * round128(QTb * ld * es) + 2 * round128(kKeyTile * ld * es) + 2 * round128(size_t(QTb) * (kKeyTile + 4) * 4) +
         round128(size_t(QTb) * (DP + 4) * 4) + 2 * round128(QTb * 4);
}

// Plans both attention kernels for the inputs (warps chosen to fit max_smem);
// plan.error says why not. Any key count: the forward loops over key tiles.
inline AttnPlan plan_attention(DType dtype, const AttnParams& p, size_t max_smem) {
  AttnPlan plan;
  if (p.d < 1 || p.d > kMaxHeadDim) { plan.error = "head dim must be in 1..128"; return plan; }
  if (p.N >= (int64_t(1) << 31) || p.M >= (int64_t(1) << 31)) { plan.error = "N or M does not fit in 32 bits"; return plan; }
  const int DP = padded_head_dim(p.d);
  if (p.window > 0 && p.window > 46340) { plan.error = "window*window overflows 32 bits"; return plan; }
  const bool o_in_s = attention_o_in_s(dtype, DP, p.window > 0 ? p.window * p.window : p.M);
  for (int warps = 4; warps >= 1; warps /= 2) {
    if (attention_fwd_smem(dtype, DP, 16 * warps, o_in_s) <= max_smem) { plan.warps = warps; break; }
  }
  if (plan.warps == 0) { plan.error = "not enough shared memory per block on this device for one 16-query tile"; return plan; }
  plan.imp_smem = attention_imp_smem(dtype, DP);
  if (plan.imp_smem > max_smem) { plan.error = "not enough shared memory per block on this device for the importance pass"; return plan; }
  plan.QT = 16 * plan.warps;
  plan.o_in_s = o_in_s ? 1 : 0;
  plan.smem = attention_fwd_smem(dtype, DP, plan.QT, o_in_s);
  if (p.window > 0) {
    if (p.window > 46340) { plan.error = "window*window overflows 32 bits"; return plan; }
    const WindowGeom geo(p.H, p.W, p.window);
    plan.segments = geo.num_windows();
    plan.seg_queries = plan.seg_keys = geo.size();
    plan.ncols = p.N;
    plan.splits = 1;
    plan.split_queries = (geo.size() + kQueryChunk - 1) / kQueryChunk * kQueryChunk;
  } else {
    plan.segments = 1;
    plan.seg_queries = p.N;
    plan.seg_keys = p.M;
    plan.ncols = p.M;
    // Queries per split: at least 256, at most 64 splits (bounded partials).
    const int64_t chunks = (p.N + kQueryChunk - 1) / kQueryChunk;
    int64_t per = (chunks + 63) / 64;
    if (per < 256 / kQueryChunk) per = 256 / kQueryChunk;
    plan.split_queries = per * kQueryChunk;
    plan.splits = (p.N + plan.split_queries - 1) / plan.split_queries;
    if (plan.splits < 1) plan.splits = 1;
  }
  plan.subtiles = (plan.seg_queries + plan.QT - 1) / plan.QT;
  plan.ktiles = (plan.seg_keys + kKeyTile - 1) / kKeyTile;
  const int64_t bh = p.B * p.h;
  // Overflow-safe products (each factor < 2^31).
  auto over = [](int64_t a, int64_t b) { return b != 0 && a > kMaxBlocks / b; };
  if (over(bh, plan.segments) || over(bh * plan.segments, plan.subtiles)) {
    plan.error = "too many query tiles for one launch (B*h*tiles > 2^31-1 blocks)"; return plan;
  }
  plan.fwd_blocks = bh * plan.segments * plan.subtiles;
  if (over(bh * plan.segments, plan.ktiles) || over(bh * plan.segments * plan.ktiles, plan.splits)) {
    plan.error = "too many key tiles for one importance launch (> 2^31-1 blocks)"; return plan;
  }
  plan.imp_blocks = bh * plan.segments * plan.ktiles * plan.splits;
  plan.partial_elems = bh * plan.splits * plan.ncols;
  if (p.B * plan.ncols > kMaxBlocks * 256) { plan.error = "importance too large for one launch"; return plan; }
  // Backward.
  for (int warps = 4; warps >= 1 && plan.kv_warps == 0; warps /= 2)
    if (attention_kv_smem(dtype, DP, 16 * warps) <= max_smem) plan.kv_warps = warps;
  for (int warps = 4; warps >= 1 && plan.dq_warps == 0; warps /= 2)
    if (attention_dq_smem(dtype, DP, 16 * warps) <= max_smem) plan.dq_warps = warps;
  if (plan.kv_warps == 0 || plan.dq_warps == 0) {
    plan.bwd_error = "not enough shared memory per block on this device for the backward kernels";
    return plan;
  }
  plan.kv_smem = attention_kv_smem(dtype, DP, 16 * plan.kv_warps);
  plan.dq_smem = attention_dq_smem(dtype, DP, 16 * plan.dq_warps);
  plan.kv_ktiles = (plan.seg_keys + 16 * plan.kv_warps - 1) / (16 * plan.kv_warps);
  plan.dq_subtiles = (plan.seg_queries + 16 * plan.dq_warps - 1) / (16 * plan.dq_warps);
  if (over(bh * plan.segments, plan.kv_ktiles) || over(bh * plan.segments, plan.dq_subtiles) ||
      bh * p.N / 8 >= kMaxBlocks) {
    plan.bwd_error = "too many tiles for one backward launch (> 2^31-1 blocks)";
    return plan;
  }
  // dK/dV query splits (global mode, long query rows): at least 512 queries each, at most 32 splits.
  plan.kv_splits = 1;
  plan.kv_split_queries = (plan.seg_queries + kBwdQueryChunk - 1) / kBwdQueryChunk * kBwdQueryChunk;
  if (p.window == 0 && p.N > 1024) {
    const int64_t chunks = (p.N + kBwdQueryChunk - 1) / kBwdQueryChunk;
    int64_t per = (chunks + 31) / 32;
    if (per < 512 / kBwdQueryChunk) per = 512 / kBwdQueryChunk;
    plan.kv_split_queries = per * kBwdQueryChunk;
    plan.kv_splits = (p.N + plan.kv_split_queries - 1) / plan.kv_split_queries;
  }
  if (over(bh * plan.segments * plan.kv_ktiles, plan.kv_splits) || bh * p.M * p.d / 256 >= kMaxBlocks) {
    plan.bwd_error = "too many tiles for one backward launch (> 2^31-1 blocks)";
    return plan;
  }
  plan.kv_partial_elems = plan.kv_splits > 1 ? 2 * plan.kv_splits * bh * p.M * p.d : 0;
  plan.kv_blocks = bh * plan.segments * plan.kv_ktiles * plan.kv_splits;
  plan.dq_blocks = bh * plan.segments * plan.dq_subtiles;
  return plan;
}

struct ReallocArgs {
  const void* x;         // [B, N, C] contiguous
  const int64_t* index;  // [G, B, N] contiguous: row of x at each sorted position
  const void* weights;   // all parts' weights concatenated (plan.woff)
  const void* biases;    // [P]
  void* out;             // [G, B, M, C] contiguous
  ReallocPlan plan;
  int64_t G, B, N, C;
};

}  // namespace sgattn
