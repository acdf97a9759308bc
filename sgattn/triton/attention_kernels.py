"""Triton kernels of the attention family: global and window attention with
importance (forward) and their backward. Their tiles come from ``plans.py``;
``launch.py`` builds and runs their launches.

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
Importance partials are reduced in a fixed order by ``importance_kernels.py``:
no float atomics anywhere, so results are run-to-run deterministic.

Offsets: batch/head offsets are int64 and token indices are widened to int64
before multiplying by strides, so tensors past 2**31 elements index correctly.
The last dimension of every tensor must be contiguous (the launchers make it so).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Integer arguments that only bound loops and masks: not specialised on their
# value (== 1, divisible by 16), so that the compiled variants are the plans
# (``sgattn.triton.compile_check``), not every shape.
_NOSPEC = ["H", "N", "M", "QT", "KT", "GH", "GW", "NWX", "WIN", "TILES"]


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in _NOSPEC if n in names])


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    # UPCAST: the interpreter's bf16 tl.dot multiplies raw bit patterns.
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
