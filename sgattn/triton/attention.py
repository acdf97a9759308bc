"""Triton kernels of the attention family: global and window attention with
importance (forward) and their backward.

Launch structure (every grid is 1-D: program = (b * h + head) * tiles + tile,
so a launch only needs tiles * B * h <= 2**31 - 1 programs, and a head's tiles
run next to each other and share its K/V in L2):
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
- ``_window_attn``   one program per (window, query sub-block): forward (out,
                     lse, importance partials [B, h*sub-blocks, N]), or dQ, or
                     dK/dV of a sub-block, or the whole backward of a small window.
Importance partials are reduced in a fixed order by ``importance.py``: no
float atomics anywhere, so results are run-to-run deterministic.

Tiles (``plan``) depend on the compute kind: fp16/bf16 ("fp16", "bf16"), or
fp32 with tf32 tensor cores ("tf32") or exact fp32 FMA ("ieee"): torch's fp32
matmul setting (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision``) is read at every call, so fp32 inputs
use tf32 exactly when PyTorch's own matmuls may. ``sgattn.triton.compile_check``
compiles every plan for sm_80 and sm_90 and fails on spills or shared memory
over the limit.

Offsets: batch/head offsets are int64 and token indices are widened to int64
before multiplying by strides, so tensors past 2**31 elements index correctly.
The last dimension of every tensor must be contiguous (the launchers make it so).
"""
from __future__ import annotations

import contextlib
import os

import triton
import triton.language as tl

# The interpreter is chosen when kernels are defined (ENV.md); remember it.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
# Integer arguments that only bound loops and masks: not specialised on their
# value (== 1, divisible by 16), so that the compiled variants are the plans
# (``sgattn.triton.compile_check``), not every shape.
_NOSPEC = ["H", "N", "M", "QT", "KT", "GH", "GW", "NWX", "WIN", "TILES"]


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in _NOSPEC if n in names])


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # UPCAST: the interpreter's bf16 tl.dot multiplies raw bits (ENV.md).
    # PREC: input precision of fp32 operands ("ieee", "tf32", "tf32x3"), chosen
    # on the host from torch's fp32 matmul setting; ignored for fp16/bf16.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_d(a, bt, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a [X, BLOCK_D] times bt [BLOCK_D, Y]: the dots that reduce over the head
    dim. An exact fp32 (FMA) dot holds a whole reduction row per thread, which
    does not fit registers for BLOCK_D = 128: do it as two 64-wide halves."""
    if PREC == "ieee" and a.shape[1] > 64:
        X: tl.constexpr = a.shape[0]
        HD: tl.constexpr = a.shape[1] // 2
        Y: tl.constexpr = bt.shape[1]
        a0, a1 = tl.split(tl.permute(tl.reshape(a, [X, 2, HD]), [0, 2, 1]))
        b0, b1 = tl.split(tl.permute(tl.reshape(bt, [2, HD, Y]), [1, 2, 0]))
        return _dot(a0, b0, UPCAST, PREC) + _dot(a1, b1, UPCAST, PREC)
    else:
        return _dot(a, bt, UPCAST, PREC)


@triton.jit
def _ds_dot(ds, b, UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    """ds [X, Y] fp32 times b [Y, Z] (fp16/bf16/fp32), fp32 result.

    ds = P * (dP - delta) may exceed fp16's range (large dO) while the true
    gradient is small, and with a saturated softmax its rounding to 8 or 11
    bits loses the accuracy of dq/dk. SPLIT_DS (fp16/bf16 inputs): scale the
    tile by a power of two that puts its largest entry at 2**14, split it into
    a high and a low half-precision part (ds*c = hi + lo up to 2**-22 relative,
    bf16: 2**-16) and do two tensor-core dots; b (an input tensor) is exact.
    The exponent is clamped to [-126, 126] so c and 1/c stay finite normal
    fp32 numbers: a tile of tiny probabilities (amax < 2**-112, the last
    partial key tile of a saturated row) would make c inf and 0 * c NaN; it is
    then scaled by 2**126 only, which keeps its (negligible) contribution.
    """
    if SPLIT_DS:
        amax = tl.max(tl.max(tl.abs(ds), 1), 0)
        e = tl.where(amax > 0, 14.0 - tl.ceil(tl.math.log2(amax)), 0.0)
        c = tl.math.exp2(tl.minimum(tl.maximum(e, -126.0), 126.0))
        x = ds * c
        hi = x.to(b.dtype)
        lo = (x - hi.to(tl.float32)).to(b.dtype)
        return (_dot(hi, b, UPCAST, PREC) + _dot(lo, b, UPCAST, PREC)) * (1.0 / c)
    else:
        return _dot(ds.to(b.dtype), b, UPCAST, PREC)


@_jit
def _attn_fwd(Q, K, V, O, LSE, PART,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, M, D, DV, QT, scale_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              SINGLE_TILE: tl.constexpr, NEED_IMP: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr):
    # 1-D grid: program = bh * QT + query tile (no axis limit but 2**31 - 1;
    # a head's tiles are neighbours, which share its K/V in L2).
    pid = tl.program_id(0)
    pid_m = pid % QT
    bh = (pid // QT).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if SINGLE_TILE:
        # The whole key row is one tile: exact probabilities, no rescaling.
        offs_n = tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        cols = offs_n.to(tl.int64)
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None],
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = _dot_d(q, kt, UPCAST, PREC) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < DV), other=0.0)
        acc = _dot(p.to(v.dtype), v, UPCAST, PREC)
        if NEED_IMP:
            probs = tl.where(row_ok[:, None], p / l_i[:, None], 0.0)
            part = PART + ((b * H + h) * QT + pid_m) * M
            tl.store(part + offs_n, tl.sum(probs, 0), mask=col_ok)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, M, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < M
            cols = offs_n.to(tl.int64)
            kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None],
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            s = _dot_d(q, kt, UPCAST, PREC) * scale_log2
            s = tl.where(col_ok[None, :], s, float("-inf"))
            # Every tile holds at least one real key, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :],
                        mask=col_ok[:, None] & (offs_d[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
            m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < DV))
    tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@_jit
def _attn_bwd_q(Q, K, V, O, DO, LSE, DELTA, DQ,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
                H, N, M, D, DV, QT, scale, scale_log2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % QT
    bh = (pid // QT).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    dmask = row_ok[:, None] & (offs_d[None, :] < D)
    dvmask = row_ok[:, None] & (offs_d[None, :] < DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=dmask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=dvmask, other=0.0)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], mask=dvmask, other=0.0)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    # delta_i = sum_j P_ij dP_ij; stored for the key-major pass. rowsum(dO * O)
    # equals it, but O rounded to fp16/bf16 makes dP - delta lose everything
    # when it cancels (saturated softmax, large dO): there (SPLIT_DS) it is
    # summed from P and dP in fp32, one more pass over the keys.
    if SPLIT_DS:
        delta = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, M, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < M
            cols = offs_n.to(tl.int64)
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :],
                        mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :],
                        mask=col_ok[:, None] & (offs_d[None, :] < DV), other=0.0)
            s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
            delta += tl.sum(p * _dot_d(do, tl.trans(v), UPCAST, PREC), 1)
    else:
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        cols = offs_n.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < DV), other=0.0)
        s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = _dot_d(do, tl.trans(v), UPCAST, PREC)
        ds = p * (dp - delta[:, None])
        dq += _ds_dot(ds, k, UPCAST, PREC, SPLIT_DS)
    tl.store(DQ + bh * N * D + rows[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=dmask)


@_jit
def _attn_key_major(Q, K, V, DO, LSE, DELTA, DK, DVp, PART,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                    H, N, M, D, DV, KT, scale, scale_log2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    GRADS: tl.constexpr, NEED_IMP: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = pid % KT
    bh = (pid // KT).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < M
    cols = offs_n.to(tl.int64)
    kmask = col_ok[:, None] & (offs_d[None, :] < D)
    vmask = col_ok[:, None] & (offs_d[None, :] < DV)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    imp = tl.zeros([BLOCK_N], tl.float32)
    if GRADS:
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=vmask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        rows = offs_m.to(tl.int64)
        q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
        s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        if NEED_IMP:
            imp += tl.sum(p, 0)
        if GRADS:
            do = tl.load(do_base + rows[:, None] * sdn + offs_d[None, :],
                         mask=row_ok[:, None] & (offs_d[None, :] < DV), other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PREC)
            dp = _dot_d(do, tl.trans(v), UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dk += _ds_dot(tl.trans(ds), q, UPCAST, PREC, SPLIT_DS)
    if NEED_IMP:
        tl.store(PART + bh * M + offs_n, imp, mask=col_ok)
    if GRADS:
        tl.store(DK + bh * M * D + cols[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=kmask)
        tl.store(DVp + bh * M * DV + cols[:, None] * DV + offs_d[None, :], dv.to(DVp.dtype.element_ty),
                 mask=vmask)


@triton.jit
def _window_tokens(pos, wy, wx, GH, GW, WIN):
    """Grid token of each window position, and whether it is real: padded
    positions (beyond the grid) are neither queries nor keys."""
    y = wy * WIN + pos // WIN
    x = wx * WIN + pos % WIN
    real = (pos < WIN * WIN) & (y < GH) & (x < GW)
    return tl.where(real, y * GW + x, 0).to(tl.int64), real


@_jit
def _window_attn(Q, K, V, O, LSE, PART, DO, DQ, DK, DVp,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
                 H, N, GH, GW, NWX, WIN, TILES, D, DV, scale, scale_log2,
                 BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 MODE: tl.constexpr, NEED_IMP: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    # A window's BLOCK_L (>= WIN*WIN) positions are cut into SPLIT sub-blocks of
    # BLOCK_S queries; keys are visited in chunks of BLOCK_C, so that no tile
    # exceeds BLOCK_S x BLOCK_C. One program per (window, sub-block), 1-D grid
    # (program = bh * TILES + window * SPLIT + sub-block):
    # MODE 0  forward of the sub-block's queries against the whole window:
    #         out, lse (log2 units) and importance partials (one row per (head,
    #         sub-block)); one pass when the window is one chunk, else a
    #         statistics pass and an output pass over the key chunks;
    # MODE 1  backward of a whole window in one program (BLOCK_S == BLOCK_C == BLOCK_L);
    # MODE 2  backward dQ of the sub-block's queries (probabilities from lse;
    #         fp16/bf16: also delta = rowsum(P dP) into PART, for MODE 3);
    # MODE 3  backward dK, dV of the sub-block's keys (loops over query chunks).
    SPLIT: tl.constexpr = BLOCK_L // BLOCK_S
    pid = tl.program_id(0)
    bh = (pid // TILES).to(tl.int64)
    t = pid % TILES
    b = bh // H
    h = bh % H
    wid = t // SPLIT
    sub = t % SPLIT
    wy = wid // NWX
    wx = wid % NWX
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    do_base = DO + b * sdb + h * sdh
    dq_base = DQ + bh * N * D
    dk_base = DK + bh * N * D
    dv_base = DVp + bh * N * DV
    lse_base = LSE + bh * N
    # this program's sub-block
    tok_s, real_s = _window_tokens(sub * BLOCK_S + tl.arange(0, BLOCK_S), wy, wx, GH, GW, WIN)
    dmask_s = real_s[:, None] & (offs_d[None, :] < D)
    dvmask_s = real_s[:, None] & (offs_d[None, :] < DV)
    if MODE == 0:
        q = tl.load(q_base + tok_s[:, None] * sqn + offs_d[None, :], mask=dmask_s, other=0.0)
        # real queries of the window (importance is a mean over them)
        n_real = (tl.minimum(WIN, GH - wy * WIN) * tl.minimum(WIN, GW - wx * WIN)).to(tl.float32)
        if BLOCK_C == BLOCK_L:
            tok_c, real_c = _window_tokens(tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
            k = tl.load(k_base + tok_c[:, None] * skn + offs_d[None, :],
                        mask=real_c[:, None] & (offs_d[None, :] < D), other=0.0)
            v = tl.load(v_base + tok_c[:, None] * svn + offs_d[None, :],
                        mask=real_c[:, None] & (offs_d[None, :] < DV), other=0.0)
            s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
            s = tl.where(real_c[None, :], s, float("-inf"))
            # Each window holds at least one real token, so every row has a finite max.
            m = tl.max(s, 1)
            p = tl.math.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            p = p / l[:, None]
            acc = _dot(p.to(v.dtype), v, UPCAST, PREC)
            if NEED_IMP:
                # Column sums over the sub-block's real queries, divided by the
                # window's real query count: the partials of a window add up to its mean.
                col = tl.sum(tl.where(real_s[:, None], p, 0.0), 0) / n_real
                tl.store(PART + (bh * SPLIT + sub) * N + tok_c, col, mask=real_c)
        else:
            # statistics pass (a finite floor instead of -inf: a chunk may hold only padding)
            m = tl.full([BLOCK_S], -1.0e30, tl.float32)
            l = tl.zeros([BLOCK_S], tl.float32)
            for c0 in range(0, BLOCK_L, BLOCK_C):
                tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
                k = tl.load(k_base + tok_c[:, None] * skn + offs_d[None, :],
                            mask=real_c[:, None] & (offs_d[None, :] < D), other=0.0)
                s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
                s = tl.where(real_c[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
                m = m_new
            l = tl.where(l > 0, l, 1.0)  # padded query rows (never stored)
            acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
            for c0 in range(0, BLOCK_L, BLOCK_C):
                tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
                k = tl.load(k_base + tok_c[:, None] * skn + offs_d[None, :],
                            mask=real_c[:, None] & (offs_d[None, :] < D), other=0.0)
                v = tl.load(v_base + tok_c[:, None] * svn + offs_d[None, :],
                            mask=real_c[:, None] & (offs_d[None, :] < DV), other=0.0)
                s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
                p = tl.math.exp2(s - m[:, None]) / l[:, None]
                p = tl.where(real_s[:, None] & real_c[None, :], p, 0.0)
                acc += _dot(p.to(v.dtype), v, UPCAST, PREC)
                if NEED_IMP:
                    col = tl.sum(p, 0) / n_real
                    tl.store(PART + (bh * SPLIT + sub) * N + tok_c, col, mask=real_c)
        tl.store(o_base + tok_s[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty), mask=dvmask_s)
        tl.store(lse_base + tok_s, m + tl.math.log2(l), mask=real_s)
    elif MODE == 1:
        # whole window: queries = keys = the sub-block
        q = tl.load(q_base + tok_s[:, None] * sqn + offs_d[None, :], mask=dmask_s, other=0.0)
        k = tl.load(k_base + tok_s[:, None] * skn + offs_d[None, :], mask=dmask_s, other=0.0)
        v = tl.load(v_base + tok_s[:, None] * svn + offs_d[None, :], mask=dvmask_s, other=0.0)
        do = tl.load(do_base + tok_s[:, None] * sdn + offs_d[None, :], mask=dvmask_s, other=0.0)
        lse = tl.load(lse_base + tok_s, mask=real_s, other=0.0)
        s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(real_s[:, None] & real_s[None, :], p, 0.0)
        dp = _dot_d(do, tl.trans(v), UPCAST, PREC)
        delta = tl.sum(p * dp, 1)  # in fp32 from P and dP (see _attn_bwd_q)
        ds = p * (dp - delta[:, None])
        dq = _ds_dot(ds, k, UPCAST, PREC, SPLIT_DS) * scale
        tl.store(dq_base + tok_s[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=dmask_s)
        dv = _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PREC)
        dk = _ds_dot(tl.trans(ds), q, UPCAST, PREC, SPLIT_DS) * scale
        tl.store(dk_base + tok_s[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=dmask_s)
        tl.store(dv_base + tok_s[:, None] * DV + offs_d[None, :], dv.to(DVp.dtype.element_ty), mask=dvmask_s)
    elif MODE == 2:
        q = tl.load(q_base + tok_s[:, None] * sqn + offs_d[None, :], mask=dmask_s, other=0.0)
        do = tl.load(do_base + tok_s[:, None] * sdn + offs_d[None, :], mask=dvmask_s, other=0.0)
        o = tl.load(o_base + tok_s[:, None] * son + offs_d[None, :], mask=dvmask_s, other=0.0)
        lse = tl.load(lse_base + tok_s, mask=real_s, other=0.0)
        if SPLIT_DS:  # delta from P and dP in fp32 (see _attn_bwd_q); stored for MODE 3
            delta = tl.zeros([BLOCK_S], tl.float32)
            for c0 in range(0, BLOCK_L, BLOCK_C):
                tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
                k = tl.load(k_base + tok_c[:, None] * skn + offs_d[None, :],
                            mask=real_c[:, None] & (offs_d[None, :] < D), other=0.0)
                v = tl.load(v_base + tok_c[:, None] * svn + offs_d[None, :],
                            mask=real_c[:, None] & (offs_d[None, :] < DV), other=0.0)
                s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
                p = tl.math.exp2(s - lse[:, None])
                p = tl.where(real_s[:, None] & real_c[None, :], p, 0.0)
                delta += tl.sum(p * _dot_d(do, tl.trans(v), UPCAST, PREC), 1)
            tl.store(PART + bh * N + tok_s, delta, mask=real_s)
        else:
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        dq = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for c0 in range(0, BLOCK_L, BLOCK_C):
            tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
            k = tl.load(k_base + tok_c[:, None] * skn + offs_d[None, :],
                        mask=real_c[:, None] & (offs_d[None, :] < D), other=0.0)
            v = tl.load(v_base + tok_c[:, None] * svn + offs_d[None, :],
                        mask=real_c[:, None] & (offs_d[None, :] < DV), other=0.0)
            s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(real_s[:, None] & real_c[None, :], p, 0.0)
            dp = _dot_d(do, tl.trans(v), UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dq += _ds_dot(ds, k, UPCAST, PREC, SPLIT_DS)
        tl.store(dq_base + tok_s[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=dmask_s)
    else:
        # keys of this sub-block; the window's queries visited chunk by chunk
        ks = tl.load(k_base + tok_s[:, None] * skn + offs_d[None, :], mask=dmask_s, other=0.0)
        vs = tl.load(v_base + tok_s[:, None] * svn + offs_d[None, :], mask=dvmask_s, other=0.0)
        dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for c0 in range(0, BLOCK_L, BLOCK_C):
            tok_q, real_q = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
            q = tl.load(q_base + tok_q[:, None] * sqn + offs_d[None, :],
                        mask=real_q[:, None] & (offs_d[None, :] < D), other=0.0)
            qmask_v = real_q[:, None] & (offs_d[None, :] < DV)
            do = tl.load(do_base + tok_q[:, None] * sdn + offs_d[None, :], mask=qmask_v, other=0.0)
            o = tl.load(o_base + tok_q[:, None] * son + offs_d[None, :], mask=qmask_v, other=0.0)
            lse = tl.load(lse_base + tok_q, mask=real_q, other=0.0)
            if SPLIT_DS:  # written by MODE 2
                delta = tl.load(PART + bh * N + tok_q, mask=real_q, other=0.0)
            else:
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            s = _dot_d(q, tl.trans(ks), UPCAST, PREC) * scale_log2
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(real_q[:, None] & real_s[None, :], p, 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PREC)
            dp = _dot_d(do, tl.trans(vs), UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dk += _ds_dot(tl.trans(ds), q, UPCAST, PREC, SPLIT_DS)
        tl.store(dk_base + tok_s[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=dmask_s)
        tl.store(dv_base + tok_s[:, None] * DV + offs_d[None, :], dv.to(DVp.dtype.element_ty),
                 mask=dvmask_s)


# ---------------------------------------------------------------------------
# Plans: tile sizes per compute kind and padded head dim (all powers of two).
# Checked by compile_check: no register spills, no stack, shared memory within
# sm_80's 163 KiB and sm_90's 227 KiB for every plan.

KINDS = ("fp16", "bf16", "tf32", "ieee")
HEAD_BLOCKS = (32, 64, 128)       # padded head dims (d and dv share one)
WINDOW_BLOCKS = (64, 128, 256)    # padded window sizes: w <= 8, <= 11, <= 16
MAX_WINDOW = 16
HEAD_DIM_RANGE = (16, 128)


class Plan:
    """Tiles of one (kind, BLOCK_D): fwd (BLOCK_M queries x BLOCK_N keys, one
    tile up to ``single_max`` keys), bwd (``bwd`` x ``bwd``), windows (sub-blocks
    of ``win_s`` queries, key chunks of ``win_c``; a whole window in one
    backward program up to ``win_whole`` positions). ``warps``: num_warps of
    the kernels; ``km_warps``: of ``_attn_key_major`` (default ``warps``);
    ``win_fc``: key chunks of the window forward (default ``win_c``, which is
    then the backward's only)."""

    def __init__(self, kind, bd, block_m, block_n, single_max, bwd, win_s, win_c, win_whole, warps=4,
                 km_warps=None, win_fc=None):
        self.kind, self.bd = kind, bd
        self.block_m, self.block_n, self.single_max = block_m, block_n, single_max
        self.bwd, self.win_s, self.win_c, self.win_whole, self.warps = bwd, win_s, win_c, win_whole, warps
        self.km_warps = warps if km_warps is None else km_warps
        self.win_fc = win_c if win_fc is None else win_fc

    def single_blocks(self):
        return [n for n in (64, 128, 256) if n <= self.single_max]


def _make_plan(kind, bd):
    if kind in ("fp16", "bf16"):
        if bd <= 32:
            return Plan(kind, bd, 64, 64, 128, 64, 64, 64, 64)  # 256-key tiles spill on sm_80
        if bd <= 64:  # 64-wide backward tiles spill on sm_80 (split ds, exact delta)
            return Plan(kind, bd, 64, 64, 128, 32, 32, 32, 0)
        return Plan(kind, bd, 64, 64, 64, 32, 32, 32, 0)
    if kind == "tf32":
        if bd <= 32:  # window forward key chunks of 32 (64: windows of 12..16 spilled 8 B on sm_80)
            return Plan(kind, bd, 64, 64, 128, 64, 32, 64, 0, win_fc=32)
        if bd <= 64:
            return Plan(kind, bd, 64, 32, 64, 32, 32, 32, 0)
        return Plan(kind, bd, 32, 32, 64, 32, 16, 16, 0)
    # ieee: fp32 FMA dots keep both operands in registers (a whole head-dim
    # row per thread): small tiles.
    if bd <= 32:  # backward window key chunks of 16 (32: window bwd mode 3 spilled 8 B on sm_80);
        # the window forward keeps 32-key chunks
        return Plan(kind, bd, 32, 32, 64, 32, 16, 16, 0, win_fc=32)
    if bd <= 64:  # 8 warps (4: window bwd mode 2 spilled 4 B on sm_90)
        return Plan(kind, bd, 16, 32, 64, 16, 16, 16, 0, warps=8)
    # d > 64: no single-tile rows (importance from the key-major pass), 8 warps;
    # the key-major pass 4 (8: dK/dV spilled 4 B on sm_90)
    return Plan(kind, bd, 16, 32, 0, 16, 16, 16, 0, warps=8, km_warps=4)


PLANS = {(kind, bd): _make_plan(kind, bd) for kind in KINDS for bd in HEAD_BLOCKS}


def fp32_precision() -> str:
    """"tf32" when torch lets fp32 matmuls use TF32 (``allow_tf32``, or
    ``set_float32_matmul_precision`` "high"/"medium", or the fp32_precision
    API set to "tf32"), else "ieee". Read on the host at every call."""
    import torch
    try:
        prec = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and new precision APIs mixed: ask the new one
        prec = "high" if getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32" else "highest"
    return "ieee" if prec == "highest" else "tf32"


def kind_of(dtype) -> str:
    import torch
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    return fp32_precision()


def head_block(d: int, dv: int) -> int:
    return max(HEAD_BLOCKS[0], triton.next_power_of_2(max(int(d), int(dv))))


def window_block(window: int) -> int:
    return max(WINDOW_BLOCKS[0], triton.next_power_of_2(int(window) ** 2))


def plan_for(dtype, d: int, dv: int) -> Plan:
    return PLANS[(kind_of(dtype), head_block(d, dv))]


def kinds_of(dtype):
    """Every kind a dtype may run as (fp32: tf32 or ieee, by torch's setting at
    call time). Used where the setting must not be read (under torch.compile's
    tracing of dispatch, a graph break): the worst case over them."""
    import torch
    return ("tf32", "ieee") if dtype == torch.float32 else (kind_of(dtype),)


def _flags(kind):
    return {"UPCAST": INTERPRET and kind == "bf16", "PREC": "tf32" if kind in ("fp16", "bf16") else kind}


def _ds_flag(kind):
    return kind in ("fp16", "bf16")


def global_config(plan: Plan, M: int):
    """(single_tile, BLOCK_N) of the global forward for M keys."""
    if M <= plan.single_max:
        return True, max(64, triton.next_power_of_2(int(M)))
    return False, plan.block_n


def window_config(plan: Plan, window: int):
    """(BLOCK_L, BLOCK_S, BLOCK_C, backward modes) of a w x w window."""
    L = window_block(window)
    S, C = min(L, plan.win_s), min(L, plan.win_c)
    modes = (1,) if (S == L and C == L and L <= plan.win_whole) else (2, 3)
    return L, S, C, modes


def partial_rows(plan: Plan, h: int, N: int, M: int, window, need_importance: bool) -> int:
    """Rows of the importance partials [B, rows, M] the forward writes."""
    if not need_importance:
        return 0
    if window:
        L, S, _, _ = window_config(plan, window)
        return h * (L // S)
    single, _ = global_config(plan, M)
    return h * triton.cdiv(N, plan.block_m) if single else h


def window_grid(hw, window):
    H, W = hw
    return triton.cdiv(H, window), triton.cdiv(W, window)


def lse_shape(B, h, N, window):
    return (B, h, N)


def new_out(q, dv):
    """Output [B, h, N, dv] laid out as [B, N, h, dv], so that merging heads
    back to [B, N, h*dv] (what every module does next) is a free view."""
    B, h, N, _ = q.shape
    import torch
    return torch.empty(B, N, h, dv, device=q.device, dtype=q.dtype).transpose(1, 2)


def device_guard(t):
    """Launch on the tensor's GPU (and its current stream), not the current device."""
    import torch
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _rows(t):
    """t with a contiguous last dimension (kernels take no last-dim stride)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def grid_programs(plan: Plan, B, h, N, M, window, hw, backward=True) -> int:
    """The largest 1-D grid the forward (and backward) launches for this input."""
    if window:
        L, S, _, _ = window_config(plan, window)
        nwy, nwx = window_grid(hw, window) if hw else (N, 1)
        return nwy * nwx * (L // S) * B * h
    tiles = [triton.cdiv(N, plan.block_m), triton.cdiv(M, plan.block_n)]
    if backward:
        tiles += [triton.cdiv(N, plan.bwd), triton.cdiv(M, plan.bwd)]
    return max(tiles) * B * h


# ---------------------------------------------------------------------------
# Launch specs: (kernel, grid, args, constexprs, num_warps). The launchers run
# them; compile_check compiles the same specs for sm_80/sm_90.

def forward_launches(q, k, v, out, lse, part, scale, window, hw, need_importance):
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    kind = kind_of(q.dtype)
    plan = PLANS[(kind, head_block(D, DV))]
    fl = _flags(kind)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    scale_log2 = scale * LOG2E
    if window:
        nwy, nwx = window_grid(hw, window)
        L, S, _, _ = window_config(plan, window)
        C = min(L, plan.win_fc)
        tiles = nwy * nwx * (L // S)
        return [(_window_attn, tiles * B * h,
                 [q, k, v, out, lse, part, q, q, q, q, *strides, 0, 0, 0,
                  h, N, hw[0], hw[1], nwx, window, tiles, D, DV, scale, scale_log2],
                 dict(BLOCK_L=L, BLOCK_S=S, BLOCK_C=C, BLOCK_D=plan.bd, MODE=0, NEED_IMP=need_importance,
                      SPLIT_DS=False, **fl), plan.warps)]
    single, block_n = global_config(plan, M)
    qt = triton.cdiv(N, plan.block_m)
    out_l = [(_attn_fwd, qt * B * h,
              [q, k, v, out, lse, part, *strides, h, N, M, D, DV, qt, scale_log2],
              dict(BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_D=plan.bd, SINGLE_TILE=single,
                   NEED_IMP=need_importance and single, **fl), 8 if block_n >= 256 else plan.warps)]
    if need_importance and not single:
        # Long key rows: recompute P key-major from the stored lse (O(N) memory).
        kt = triton.cdiv(M, plan.bwd)
        out_l.append((_attn_key_major, kt * B * h,
                      [q, k, v, q, lse, lse, q, q, part, *strides[:9], 0, 0, 0,
                       h, N, M, D, DV, kt, scale, scale_log2],
                      dict(BLOCK_M=plan.bwd, BLOCK_N=plan.bwd, BLOCK_D=plan.bd, GRADS=False, NEED_IMP=True,
                           SPLIT_DS=False, **fl), plan.km_warps))
    return out_l


def backward_launches(do, q, k, v, out, lse, dq, dk, dv, delta, scale, window, hw):
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    kind = kind_of(q.dtype)
    plan = PLANS[(kind, head_block(D, DV))]
    fl = dict(_flags(kind), SPLIT_DS=_ds_flag(kind))
    qkv = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    scale_log2 = scale * LOG2E
    if window:
        nwy, nwx = window_grid(hw, window)
        L, S, C, modes = window_config(plan, window)
        tiles = nwy * nwx * (L // S)
        return [(_window_attn, tiles * B * h,
                 [q, k, v, out, lse, delta, do, dq, dk, dv, *qkv, *out.stride()[:3], *do.stride()[:3],
                  h, N, hw[0], hw[1], nwx, window, tiles, D, DV, scale, scale_log2],
                 dict(BLOCK_L=L, BLOCK_S=S, BLOCK_C=C, BLOCK_D=plan.bd, MODE=mode, NEED_IMP=False, **fl),
                 plan.warps) for mode in modes]
    blk = plan.bwd
    qt, kt = triton.cdiv(N, blk), triton.cdiv(M, blk)
    return [(_attn_bwd_q, qt * B * h,
             [q, k, v, out, do, lse, delta, dq, *qkv, *out.stride()[:3], *do.stride()[:3],
              h, N, M, D, DV, qt, scale, scale_log2],
             dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=plan.bd, **fl), plan.warps),
            (_attn_key_major, kt * B * h,
             [q, k, v, do, lse, delta, dk, dv, q, *qkv, *do.stride()[:3],
              h, N, M, D, DV, kt, scale, scale_log2],
             dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=plan.bd, GRADS=True, NEED_IMP=False, **fl), plan.km_warps)]


def _run(launches, t):
    with device_guard(t):
        for kernel, grid, args, constexprs, warps in launches:
            if grid > 0:
                kernel[(grid,)](*args, num_warps=warps, **constexprs)


# ---------------------------------------------------------------------------
# Launchers: tensors in, tensors out (no autograd; see sgattn/triton/ops.py).

def attention_forward(q, k, v, scale: float, window: int, hw, need_importance: bool):
    """Returns (out [B,h,N,dv], lse [B,h,N] fp32 (log2 units), partials
    [B, R, M] fp32 (empty when not needed))."""
    import torch
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    plan = plan_for(q.dtype, D, DV)
    out = new_out(q, DV)
    R = partial_rows(plan, h, N, M, window, need_importance)
    part = torch.empty(B, R, M, device=q.device, dtype=torch.float32)
    lse = torch.empty(lse_shape(B, h, N, window), device=q.device, dtype=torch.float32)
    if B * h == 0:
        return out, lse, part  # nothing to compute: no zero-size launch
    _run(forward_launches(q, k, v, out, lse, part, scale, window, hw, need_importance), q)
    return out, lse, part


def attention_backward(do, q, k, v, out, lse, scale: float, window: int, hw):
    """(dq, dk, dv), contiguous [B, h, *, *] in the inputs' dtype."""
    import torch
    do, q, k, v, out = _rows(do), _rows(q), _rows(k), _rows(v), _rows(out)
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    dq = torch.empty(B, h, N, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, h, M, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, h, M, DV, device=q.device, dtype=v.dtype)
    if B * h == 0:
        return dq, dk, dv
    delta = torch.empty(B, h, N, device=q.device, dtype=torch.float32)
    _run(backward_launches(do, q, k, v, out, lse, dq, dk, dv, delta, scale, window, hw), q)
    return dq, dk, dv


# Shared memory per block (bytes) the kernels of a plan need at most, the
# maximum over sm_80 and sm_90 as compile_check measures it (the compile test
# fails when a measurement exceeds its entry). ``unsupported`` compares it with
# the GPU's opt-in limit.
# Provisional entries (sm_90 measurements of the largest plans, rounded up;
# the full compile check refines them): the gate fails when one is exceeded.
SHARED_BYTES = {
    ("fp16", 32): 64 * 1024, ("fp16", 64): 96 * 1024, ("fp16", 128): 128 * 1024,
    ("bf16", 32): 64 * 1024, ("bf16", 64): 96 * 1024, ("bf16", 128): 128 * 1024,
    ("tf32", 32): 96 * 1024, ("tf32", 64): 128 * 1024, ("tf32", 128): 160 * 1024,
    ("ieee", 32): 96 * 1024, ("ieee", 64): 128 * 1024, ("ieee", 128): 160 * 1024,
}
SHARED_BYTES_AGGREGATE = 32 * 1024


def shared_bytes_needed(dtypes, head_dims) -> int:
    """The most shared memory the launches for these inputs may need."""
    need = SHARED_BYTES_AGGREGATE
    dims = [int(d) for d in head_dims] or [HEAD_BLOCKS[0]]
    for dt in set(dtypes):
        for kind in kinds_of(dt):
            for d in dims:
                need = max(need, SHARED_BYTES[(kind, head_block(d, d))])
    return need
