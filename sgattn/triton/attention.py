"""Triton kernels of the attention family: global and window attention with
importance (forward) and their backward.

Launch structure (all grids are (tiles, B*h) unless noted):
- ``_attn_fwd``      global forward, one program per query tile; online softmax
                     over key tiles; stores out and the row log-sum-exp (log2
                     units). When the whole key row fits one tile (SINGLE_TILE,
                     SG-Former's 49..150 keys) it also writes the column sums of
                     the tile's exact probabilities to partials [B, h*q_tiles, M].
- ``_attn_key_major`` one program per key tile, loops over query tiles and
                     recomputes P = exp2(S - lse): dK/dV (GRADS) and/or the
                     per-head column sums [B, h, M] (IMPORTANCE) for long rows.
- ``_attn_bwd_q``    one program per query tile: delta = rowsum(dO*O) (stored
                     for ``_attn_key_major``) and dQ.
- ``_window_attn``   grid (windows x sub-blocks, B*h); w <= 8 (SG-Former's 7):
                     one program per window does the forward + importance
                     partials [B, h, N], or the whole window's dQ, dK, dV.
                     Larger windows are cut into 32-position sub-blocks.
Importance partials are reduced in a fixed order by ``importance.py``: no
float atomics anywhere, so results are run-to-run deterministic.

Offsets: batch/head offsets are int64 and token indices are widened to int64
before multiplying by strides, so tensors past 2**31 elements index correctly.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter is chosen when kernels are defined (ENV.md); remember it.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # UPCAST: the interpreter's bf16 tl.dot multiplies raw bits (ENV.md).
    # IEEE: fp32 inputs must not silently drop to tf32.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, PART,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
              sob, soh, son, sod,
              H, N, M, D, DV, QT, scale_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, SINGLE_TILE: tl.constexpr, NEED_IMP: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if SINGLE_TILE:
        # The whole key row is one tile: exact probabilities, no rescaling.
        offs_n = tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        cols = offs_n.to(tl.int64)
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, kt, UPCAST, IEEE) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = _dot(p.to(v.dtype), v, UPCAST, IEEE)
        if NEED_IMP:
            probs = tl.where(row_ok[:, None], p / l_i[:, None], 0.0)
            part = PART + b * (H * QT * M) + (h * QT + pid_m) * M
            tl.store(part + offs_n, tl.sum(probs, 0), mask=col_ok)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, M, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < M
            cols = offs_n.to(tl.int64)
            kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            s = _dot(q, kt, UPCAST, IEEE) * scale_log2
            s = tl.where(col_ok[None, :], s, float("-inf"))
            # Every tile holds at least one real key, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_q(Q, K, V, O, DO, LSE, DELTA, DQ,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, son, sod, sdb, sdh, sdn, sdd,
                H, N, M, D, DV, scale, scale_log2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    dmask = row_ok[:, None] & (offs_d[None, :] < D)
    dvmask = row_ok[:, None] & (offs_dv[None, :] < DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=dmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_dv[None, :] * sdd, mask=dvmask, other=0.0)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_dv[None, :] * sod, mask=dvmask, other=0.0)
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O); stored for the key-major pass.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        cols = offs_n.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_dv[None, :] * svd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
    tl.store(DQ + bh * N * D + rows[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=dmask)


@triton.jit
def _attn_key_major(Q, K, V, DO, LSE, DELTA, DK, DVp, PART,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    sdb, sdh, sdn, sdd,
                    H, N, M, D, DV, scale, scale_log2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, GRADS: tl.constexpr, NEED_IMP: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < M
    cols = offs_n.to(tl.int64)
    kmask = col_ok[:, None] & (offs_d[None, :] < D)
    vmask = col_ok[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_dv[None, :] * svd, mask=vmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    imp = tl.zeros([BLOCK_N], tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rows = offs_m.to(tl.int64)
        q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        if NEED_IMP:
            imp += tl.sum(p, 0)
        if GRADS:
            do = tl.load(do_base + rows[:, None] * sdn + offs_dv[None, :] * sdd,
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
            dp = _dot(do, tl.trans(v), UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)
    if NEED_IMP:
        tl.store(PART + bh * M + offs_n, imp, mask=col_ok)
    if GRADS:
        tl.store(DK + bh * M * D + cols[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=kmask)
        tl.store(DVp + bh * M * DV + cols[:, None] * DV + offs_dv[None, :], dv.to(DVp.dtype.element_ty),
                 mask=vmask)


@triton.jit
def _window_tokens(pos, wy, wx, GH, GW, WIN: tl.constexpr):
    """Grid token of each window position, and whether it is real: padded
    positions (beyond the grid) are neither queries nor keys."""
    y = wy * WIN + pos // WIN
    x = wx * WIN + pos % WIN
    real = (pos < WIN * WIN) & (y < GH) & (x < GW)
    return tl.where(real, y * GW + x, 0).to(tl.int64), real


@triton.jit
def _window_attn(Q, K, V, O, PART, DO, DQ, DK, DVp,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sob, soh, son, sod, sdb, sdh, sdn, sdd,
                 H, N, GH, GW, NWX, D, DV, scale, scale_log2,
                 WIN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, MODE: tl.constexpr, NEED_IMP: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # A window's BLOCK_L positions are cut into SPLIT sub-blocks of BLOCK_S so
    # that no tile exceeds BLOCK_S x BLOCK_L (a 256 x 256 tile for w = 16
    # would spill and take ptxas minutes). One program per (window, sub-block):
    # MODE 0  forward of the sub-block's queries against the whole window
    #         (+ importance partials, one row per (head, sub-block));
    # MODE 1  backward of a whole window in one program (SPLIT == 1, w <= 8);
    # MODE 2  backward dQ of the sub-block's queries;
    # MODE 3  backward dK, dV of the sub-block's keys (loops over query sub-blocks).
    SPLIT: tl.constexpr = BLOCK_L // BLOCK_S
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    wid = pid // SPLIT
    sub = pid % SPLIT
    wy = wid // NWX
    wx = wid % NWX
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    do_base = DO + b * sdb + h * sdh
    # the whole window (keys for MODE 0-2)
    tok_l, real_l = _window_tokens(tl.arange(0, BLOCK_L), wy, wx, GH, GW, WIN)
    # this program's sub-block
    tok_s, real_s = _window_tokens(sub * BLOCK_S + tl.arange(0, BLOCK_S), wy, wx, GH, GW, WIN)
    dmask_l = real_l[:, None] & (offs_d[None, :] < D)
    dmask_s = real_s[:, None] & (offs_d[None, :] < D)
    dvmask_l = real_l[:, None] & (offs_dv[None, :] < DV)
    dvmask_s = real_s[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(k_base + tok_l[:, None] * skn + offs_d[None, :] * skd, mask=dmask_l, other=0.0)
    if MODE != 3:
        q = tl.load(q_base + tok_s[:, None] * sqn + offs_d[None, :] * sqd, mask=dmask_s, other=0.0)
        v = tl.load(v_base + tok_l[:, None] * svn + offs_dv[None, :] * svd, mask=dvmask_l, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * scale_log2
        s = tl.where(real_l[None, :], s, float("-inf"))
        # Each window holds at least one real token, so every row has a finite max.
        m = tl.max(s, 1)
        p = tl.math.exp2(s - m[:, None])
        p = p / tl.sum(p, 1)[:, None]
        if MODE == 0:
            out = _dot(p.to(v.dtype), v, UPCAST, IEEE)
            tl.store(o_base + tok_s[:, None] * son + offs_dv[None, :] * sod,
                     out.to(O.dtype.element_ty), mask=dvmask_s)
            if NEED_IMP:
                # Column sums over the sub-block's real queries, divided by the
                # window's real query count: the partials of a window add up to its mean.
                n_real = tl.sum(real_l.to(tl.float32), 0)
                col = tl.sum(tl.where(real_s[:, None], p, 0.0), 0) / n_real
                tl.store(PART + (bh * SPLIT + sub) * N + tok_l, col, mask=real_l)
        else:
            do = tl.load(do_base + tok_s[:, None] * sdn + offs_dv[None, :] * sdd, mask=dvmask_s, other=0.0)
            dp = _dot(do, tl.trans(v), UPCAST, IEEE)
            delta = tl.sum(p * dp, 1)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, UPCAST, IEEE) * scale
            tl.store(DQ + bh * N * D + tok_s[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=dmask_s)
            if MODE == 1:  # the sub-block is the whole window: keys' gradients too
                dv = _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
                dk = _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE) * scale
                tl.store(DK + bh * N * D + tok_l[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                         mask=dmask_l)
                tl.store(DVp + bh * N * DV + tok_l[:, None] * DV + offs_dv[None, :], dv.to(DVp.dtype.element_ty),
                         mask=dvmask_l)
    else:
        # keys of this sub-block; queries visited sub-block by sub-block
        ks = tl.load(k_base + tok_s[:, None] * skn + offs_d[None, :] * skd, mask=dmask_s, other=0.0)
        vs = tl.load(v_base + tok_s[:, None] * svn + offs_dv[None, :] * svd, mask=dvmask_s, other=0.0)
        dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
        for j in range(0, SPLIT):
            tok_q, real_q = _window_tokens(j * BLOCK_S + tl.arange(0, BLOCK_S), wy, wx, GH, GW, WIN)
            q = tl.load(q_base + tok_q[:, None] * sqn + offs_d[None, :] * sqd,
                        mask=real_q[:, None] & (offs_d[None, :] < D), other=0.0)
            qmask_v = real_q[:, None] & (offs_dv[None, :] < DV)
            do = tl.load(do_base + tok_q[:, None] * sdn + offs_dv[None, :] * sdd, mask=qmask_v, other=0.0)
            o = tl.load(o_base + tok_q[:, None] * son + offs_dv[None, :] * sod, mask=qmask_v, other=0.0)
            # row statistics over the whole window, probabilities of this key sub-block
            s_all = _dot(q, tl.trans(k), UPCAST, IEEE) * scale_log2
            s_all = tl.where(real_l[None, :], s_all, float("-inf"))
            m = tl.max(s_all, 1)
            l = tl.sum(tl.math.exp2(s_all - m[:, None]), 1)
            s = _dot(q, tl.trans(ks), UPCAST, IEEE) * scale_log2
            p = tl.math.exp2(s - m[:, None]) / l[:, None]
            p = tl.where(real_q[:, None] & real_s[None, :], p, 0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
            dp = _dot(do, tl.trans(vs), UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)
        tl.store(DK + bh * N * D + tok_s[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=dmask_s)
        tl.store(DVp + bh * N * DV + tok_s[:, None] * DV + offs_dv[None, :], dv.to(DVp.dtype.element_ty),
                 mask=dvmask_s)


# ---------------------------------------------------------------------------
# Launchers: tensors in, tensors out (no autograd; see sgattn/triton/ops.py).

# Key rows up to this length are done in one tile, with the importance in the
# forward kernel's epilogue; longer rows take the key-major importance pass.
SINGLE_TILE_MAX = 256
BLOCK = 64


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _flags(dtype):
    import torch
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}


def global_config(M: int, need_importance: bool):
    """(single_tile, BLOCK_N) of the global forward for M keys."""
    single = M <= SINGLE_TILE_MAX
    return single, (_pow2(M) if single else BLOCK)


def window_blocks(window: int):
    """(BLOCK_L, BLOCK_S) of a w x w window: the padded window and its sub-blocks."""
    L = _pow2(window * window)
    return L, (L if L <= 64 else 32)


def partial_rows(h: int, N: int, M: int, window, need_importance: bool) -> int:
    """Rows of the importance partials [B, rows, M] the forward writes."""
    if not need_importance:
        return 0
    if window:
        L, S = window_blocks(window)
        return h * (L // S)
    single, _ = global_config(M, need_importance)
    return h * triton.cdiv(N, BLOCK) if single else h


def window_grid(hw, window):
    H, W = hw
    return triton.cdiv(H, window), triton.cdiv(W, window)


def new_out(q, dv):
    """Output [B, h, N, dv] laid out as [B, N, h, dv], so that merging heads
    back to [B, N, h*dv] (what every module does next) is a free view."""
    B, h, N, _ = q.shape
    import torch
    return torch.empty(B, N, h, dv, device=q.device, dtype=q.dtype).transpose(1, 2)


def attention_forward(q, k, v, scale: float, window: int, hw, need_importance: bool):
    """Returns (out [B,h,N,dv], lse [B,h,N] fp32 (log2 units; empty in window
    mode), partials [B, R, M] fp32 (empty when not needed))."""
    import torch
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    out = new_out(q, DV)
    R = partial_rows(h, N, M, window, need_importance)
    part = torch.empty(B, R, M, device=q.device, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    scale_log2 = scale * LOG2E
    if window:
        lse = torch.empty(0, device=q.device, dtype=torch.float32)
        nwy, nwx = window_grid(hw, window)
        L, S = window_blocks(window)
        _window_attn[(nwy * nwx * (L // S), B * h)](
            q, k, v, out, part, q, q, q, q, *strides, 0, 0, 0, 0,
            h, N, hw[0], hw[1], nwx, D, DV, scale, scale_log2,
            WIN=window, BLOCK_L=L, BLOCK_S=S, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), MODE=0,
            NEED_IMP=need_importance, num_warps=4, **_flags(q.dtype))
        return out, lse, part
    lse = torch.empty(B, h, N, device=q.device, dtype=torch.float32)
    single, block_n = global_config(M, need_importance)
    qt = triton.cdiv(N, BLOCK)
    _attn_fwd[(qt, B * h)](
        q, k, v, out, lse, part, *strides, h, N, M, D, DV, qt, scale_log2,
        BLOCK_M=BLOCK, BLOCK_N=block_n, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), SINGLE_TILE=single,
        NEED_IMP=need_importance and single, num_warps=8 if block_n >= 256 else 4, **_flags(q.dtype))
    if need_importance and not single:
        # Long key rows: recompute P key-major from the stored lse (O(N) memory).
        _attn_key_major[(triton.cdiv(M, BLOCK), B * h)](
            q, k, v, q, lse, lse, q, q, part, *strides[:12], 0, 0, 0, 0,
            h, N, M, D, DV, scale, scale_log2,
            BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), GRADS=False,
            NEED_IMP=True, num_warps=4, **_flags(q.dtype))
    return out, lse, part


def attention_backward(do, q, k, v, out, lse, scale: float, window: int, hw):
    """(dq, dk, dv), contiguous [B, h, *, *] in the inputs' dtype."""
    import torch
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    dq = torch.empty(B, h, N, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, h, M, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, h, M, DV, device=q.device, dtype=v.dtype)
    qkv = (*q.stride(), *k.stride(), *v.stride())
    scale_log2 = scale * LOG2E
    bd, bdv = _pow2(D), _pow2(DV)
    if window:
        nwy, nwx = window_grid(hw, window)
        L, S = window_blocks(window)
        # one program per window when it fits one tile, else a dQ and a dK/dV launch
        for mode in ((1,) if L == S else (2, 3)):
            _window_attn[(nwy * nwx * (L // S), B * h)](
                q, k, v, out, q, do, dq, dk, dv, *qkv, *out.stride(), *do.stride(),
                h, N, hw[0], hw[1], nwx, D, DV, scale, scale_log2,
                WIN=window, BLOCK_L=L, BLOCK_S=S, BLOCK_D=bd, BLOCK_DV=bdv, MODE=mode, NEED_IMP=False,
                num_warps=4, **_flags(q.dtype))
        return dq, dk, dv
    # Smaller tiles for wide heads keep the backward's tiles within shared memory.
    blk = BLOCK if max(D, DV) <= 64 else 32
    delta = torch.empty(B, h, N, device=q.device, dtype=torch.float32)
    _attn_bwd_q[(triton.cdiv(N, blk), B * h)](
        q, k, v, out, do, lse, delta, dq, *qkv, *out.stride(), *do.stride(),
        h, N, M, D, DV, scale, scale_log2,
        BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=4, **_flags(q.dtype))
    _attn_key_major[(triton.cdiv(M, blk), B * h)](
        q, k, v, do, lse, delta, dk, dv, q, *qkv, *do.stride(),
        h, N, M, D, DV, scale, scale_log2,
        BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=bd, BLOCK_DV=bdv, GRADS=True, NEED_IMP=False,
        num_warps=4, **_flags(q.dtype))
    return dq, dk, dv
