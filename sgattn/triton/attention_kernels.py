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
                     per-head column sums [B, h, M] (NEED_IMP) for long rows.
- ``_attn_bwd_q``    one program per query tile: delta = rowsum(dO*O) (stored
                     for ``_attn_key_major``) and dQ.
The three global kernels also run attention mass (``sgattn.mass``), switched
by constexpr flags that leave SG-Former's code unchanged when off: GQA (k, v
with fewer heads: query head h reads kv head h // G; the dK/dV pass runs one
program per kv head and sums its G query heads in order), CAUSAL (bottom-right:
query i sees keys j <= i + M - N; key tiles past a query tile's last visible
key, and query tiles before a key tile's first viewer, are skipped), HAS_PAD
(a uint8 [B, M] key padding mask) and HAS_WEIGHT (column sums of w_i * P_ij,
query weights w [N]; query tiles before FIRST, whose weights are 0, skipped).
With CAUSAL or HAS_PAD a query may see no key: out 0, lse -inf, P = 0 (every
-inf - -inf is guarded, so no NaN).
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
_NOSPEC = ["H", "N", "M", "QT", "KT", "G", "QG", "FIRST", "GH", "GW", "NWX", "WIN", "TILES"]


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


@triton.jit
def _load_rows(base, rows, stride, offs_d, ok, width):
    """Rows ``rows`` (int64) of a tile at ``base`` (row stride ``stride``, unit
    column stride) as [len(rows), BLOCK_D]: zero where ``ok`` is False and in
    the columns at and past ``width``."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :],
                   mask=ok[:, None] & (offs_d[None, :] < width), other=0.0)


@triton.jit
def _tile_rows(start, BLOCK: tl.constexpr, N):
    """The BLOCK indices of a tile from ``start``, which are real (< N), and
    the same as int64 (for offsets past 2**31 elements)."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < N, offs.to(tl.int64)


@triton.jit
def _probs(q, k, lse, ok, scale_log2, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """P = exp2(q k^T * scale_log2 - lse) from the row log-sum-exp (log2 units),
    0 where ``ok`` is False (masked entries, padded rows, rows of lse -inf)."""
    p = tl.math.exp2(_dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2 - lse[:, None])
    return tl.where(ok, p, 0.0)


@triton.jit
def _program_tile(TILES, H, QG, G, GQA: tl.constexpr):
    """This program's tile of a global kernel (1-D grid, program = (b * H + h)
    * TILES + tile; H program heads, each visiting QG query heads from h * QG):
    (tile, b * H + h, b, h, the kv head (h * QG) // G)."""
    pid = tl.program_id(0)
    tile = pid % TILES
    bh = (pid // TILES).to(tl.int64)
    b = bh // H
    h = bh % H
    if GQA:
        kh = h * QG // G
    else:
        kh = h
    return tile, bh, b, h, kh


@triton.jit
def _visible(offs_m, offs_n, col_ok, N, M, PAD_B, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr):
    """[BLOCK_M, BLOCK_N] (or [1, BLOCK_N]): which keys each query sees. Real keys
    (col_ok); CAUSAL (bottom-right): key j <= query i + M - N; HAS_PAD: the
    key's padding flag (uint8, one per key of this batch row at PAD_B) is 0."""
    ok = col_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (M - N))
    if HAS_PAD:
        pad = tl.load(PAD_B + offs_n, mask=col_ok, other=1)
        ok = ok & (pad == 0)[None, :]
    return ok


@_jit
def _attn_fwd(Q, K, V, O, LSE, PART, PAD,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, M, D, DV, QT, G, scale_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              SINGLE_TILE: tl.constexpr, NEED_IMP: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, GQA: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr):
    # 1-D grid: program = bh * QT + query tile (no axis limit but 2**31 - 1;
    # a head's tiles are neighbours, which share its K/V in L2). H counts
    # query heads; GQA: query head h reads kv head h // G. CAUSAL / HAS_PAD: a
    # query may see no key at all: its row keeps a zero output and lse -inf.
    pid_m, bh, b, h, kh = _program_tile(QT, H, 1, G, GQA)
    offs_m, row_ok, rows = _tile_rows(pid_m * BLOCK_M, BLOCK_M, N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, row_ok, D)
    k_base = K + b * skb + kh * skh
    v_base = V + b * svb + kh * svh
    pad_b = PAD + b * M
    if SINGLE_TILE:
        # The whole key row is one tile: exact probabilities, no rescaling.
        offs_n = tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        cols = offs_n.to(tl.int64)
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None],
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        # (the masked forms take the key-tile loop: every row here sees a key)
        tl.static_assert(not (CAUSAL or HAS_PAD), "causal / padded rows take the key-tile loop")
        s = _dot_d(q, kt, UPCAST, PREC) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.math.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        v = _load_rows(v_base, cols, svn, offs_d, col_ok, DV)
        acc = _dot(p.to(v.dtype), v, UPCAST, PREC)
        if NEED_IMP:
            probs = tl.where(row_ok[:, None], p / l_i[:, None], 0.0)
            part = PART + ((b * H + h) * QT + pid_m) * M
            tl.store(part + offs_n, tl.sum(probs, 0), mask=col_ok)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = M
        if CAUSAL:  # key tiles past this query tile's last visible key are skipped
            hi = tl.minimum(M, (pid_m + 1) * BLOCK_M + (M - N))
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < M
            cols = offs_n.to(tl.int64)
            kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None],
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            s = _dot_d(q, kt, UPCAST, PREC) * scale_log2
            if CAUSAL or HAS_PAD:
                s = tl.where(_visible(offs_m, offs_n, col_ok, N, M, pad_b, CAUSAL, HAS_PAD), s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # no key seen yet: a finite reference (alpha = exp2(-inf) = 0, p = 0), not -inf - -inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                s = tl.where(col_ok[None, :], s, float("-inf"))
                # Every tile holds at least one real key, so m_new is finite.
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_rows(v_base, cols, svn, offs_d, col_ok, DV)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
            m_i = m_new
    if CAUSAL or HAS_PAD:  # a row that saw no key (l = 0): out 0; its lse -inf + log2(0) = -inf
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    else:
        out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < DV))
    tl.store(LSE + bh * N + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _probs_dp(q, do, lse, k_base, v_base, pad_b, offs_m, row_ok, offs_d, start, skn, svn,
              N, M, D, DV, scale_log2, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr):
    """A query tile of the global backward against the key tile at ``start``:
    its keys, P (from the row lse; 0 where masked) and dP = dO V^T."""
    offs_n = start + tl.arange(0, BLOCK_N)
    col_ok = offs_n < M
    cols = offs_n.to(tl.int64)
    k = _load_rows(k_base, cols, skn, offs_d, col_ok, D)
    v = _load_rows(v_base, cols, svn, offs_d, col_ok, DV)
    p = _probs(q, k, lse, row_ok[:, None] & _visible(offs_m, offs_n, col_ok, N, M, pad_b, CAUSAL, HAS_PAD),
               scale_log2, UPCAST, PREC)
    return k, p, _dot_d(do, tl.trans(v), UPCAST, PREC)


@_jit
def _attn_bwd_q(Q, K, V, O, DO, LSE, DELTA, DQ, PAD,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
                H, N, M, D, DV, QT, G, scale, scale_log2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, GQA: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    # H counts query heads; GQA: query head h reads kv head h // G. A row with
    # lse -inf (it sees no key) has every entry masked: p = 0, dq = 0.
    pid_m, bh, b, h, kh = _program_tile(QT, H, 1, G, GQA)
    offs_m, row_ok, rows = _tile_rows(pid_m * BLOCK_M, BLOCK_M, N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, row_ok, D)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, offs_d, row_ok, DV)
    o = _load_rows(O + b * sob + h * soh, rows, son, offs_d, row_ok, DV)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + kh * skh
    v_base = V + b * svb + kh * svh
    pad_b = PAD + b * M
    hi = M
    if CAUSAL:  # key tiles past this query tile's last visible key are skipped
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M + (M - N))
    # delta_i = sum_j P_ij dP_ij; stored for the key-major pass. rowsum(dO * O)
    # equals it, but O rounded to fp16/bf16 makes dP - delta lose everything
    # when it cancels (saturated softmax, large dO): there (SPLIT_DS) it is
    # summed from P and dP in fp32, one more pass over the keys.
    if SPLIT_DS:
        delta = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, hi, BLOCK_N):
            _, p, dp = _probs_dp(q, do, lse, k_base, v_base, pad_b, offs_m, row_ok, offs_d, start, skn, svn,
                                 N, M, D, DV, scale_log2, BLOCK_N, CAUSAL, HAS_PAD, UPCAST, PREC)
            delta += tl.sum(p * dp, 1)
    else:
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        k, p, dp = _probs_dp(q, do, lse, k_base, v_base, pad_b, offs_m, row_ok, offs_d, start, skn, svn,
                             N, M, D, DV, scale_log2, BLOCK_N, CAUSAL, HAS_PAD, UPCAST, PREC)
        ds = p * (dp - delta[:, None])
        dq += _ds_dot(ds, k, UPCAST, PREC, SPLIT_DS)
    tl.store(DQ + bh * N * D + rows[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _key_major_tile(Q, DO, LSE, DELTA, W, k, v, dk, dv, imp, offs_n, key_ok, offs_d, row0, start,
                    sqn, sdn, N, M, D, DV, scale_log2,
                    BLOCK_M: tl.constexpr, GRADS: tl.constexpr, NEED_IMP: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    """One query tile (rows start.. of the query head at Q / DO, its LSE/DELTA
    rows at ``row0``) against a key tile: adds to dk, dv (GRADS) and to the
    (query-weighted, HAS_WEIGHT) column sums imp (NEED_IMP). key_ok: the key
    tile's real keys (with padding in the loop: its unpadded ones); CAUSAL
    masks too (a row with lse -inf sees no key: every entry is masked)."""
    offs_m, row_ok, rows = _tile_rows(start, BLOCK_M, N)
    q = _load_rows(Q, rows, sqn, offs_d, row_ok, D)
    lse = tl.load(LSE + row0 * N + offs_m, mask=row_ok, other=0.0)
    p = _probs(q, k, lse, row_ok[:, None] & _visible(offs_m, offs_n, key_ok, N, M, Q, CAUSAL, False),
               scale_log2, UPCAST, PREC)
    if NEED_IMP:
        if HAS_WEIGHT:
            w = tl.load(W + offs_m, mask=row_ok, other=0.0)
            imp += tl.sum(p * w[:, None], 0)
        else:
            imp += tl.sum(p, 0)
    if GRADS:
        do = _load_rows(DO, rows, sdn, offs_d, row_ok, DV)
        delta = tl.load(DELTA + row0 * N + offs_m, mask=row_ok, other=0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PREC)
        dp = _dot_d(do, tl.trans(v), UPCAST, PREC)
        ds = p * (dp - delta[:, None])
        dk += _ds_dot(tl.trans(ds), q, UPCAST, PREC, SPLIT_DS)
    return dk, dv, imp


@_jit
def _attn_key_major(Q, K, V, DO, LSE, DELTA, DK, DVp, PART, PAD, W,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                    H, N, M, D, DV, KT, G, QG, FIRST, scale, scale_log2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    GRADS: tl.constexpr, NEED_IMP: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, GQA: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT_DS: tl.constexpr):
    # One program per (b, program head, key tile); H counts program heads. A
    # program head visits the QG query heads ph * QG + g (H * QG query heads in
    # all) and reads kv head (ph * QG) // G: the dK/dV pass (GRADS) runs one
    # program per kv head (QG = G; dK/dV [B, H, M, *] summed over its query
    # heads in the order g = 0..G-1, one flat loop over (g, query tile)), the
    # column-sum pass (NEED_IMP) one per query head (QG = 1; PART [B, H, M]).
    # Without GQA, QG = G = 1. Query tiles before the key tile's first viewer
    # (CAUSAL) or before FIRST (HAS_WEIGHT: the weights before FIRST are 0) are
    # skipped. The padding of the key tile is read once (key_ok).
    tl.static_assert(not (NEED_IMP and GRADS and GQA), "per-head column sums need one query head a program")
    pid_n, bh, b, ph, kh = _program_tile(KT, H, QG, G, GQA)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < M
    cols = offs_n.to(tl.int64)
    kmask = col_ok[:, None] & (offs_d[None, :] < D)
    vmask = col_ok[:, None] & (offs_d[None, :] < DV)
    k = _load_rows(K + b * skb + kh * skh, cols, skn, offs_d, col_ok, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    imp = tl.zeros([BLOCK_N], tl.float32)
    if GRADS:
        v = _load_rows(V + b * svb + kh * svh, cols, svn, offs_d, col_ok, DV)
    else:
        v = k  # (unused)
    # Key padding: a key's column of P enters only its own dk, dv, imp rows, so
    # it is applied to them at the end (no mask live through the loop), except
    # with SPLIT_DS, which scales each dS tile by its largest entry: there the
    # padded columns (whose P may overflow) are masked in the loop.
    if HAS_PAD and SPLIT_DS:
        key_ok = col_ok & (tl.load(PAD + b * M + offs_n, mask=col_ok, other=1) == 0)
    else:
        key_ok = col_ok
    lo = 0
    if CAUSAL:  # key j is first seen by query j - (M - N)
        lo = tl.maximum(pid_n * BLOCK_N - (M - N), 0) // BLOCK_M * BLOCK_M
    if HAS_WEIGHT:
        lo = tl.maximum(lo, FIRST // BLOCK_M * BLOCK_M)
    if GQA:
        # one flat loop over (query head g, query tile): the head's base pointers
        # and rows advance when its tiles are done
        tiles = tl.maximum(N - lo + BLOCK_M - 1, 0) // BLOCK_M  # query tiles of one head from lo
        q_h = Q + b * sqb + (ph * QG) * sqh
        do_h = DO + b * sdb + (ph * QG) * sdh
        row0 = b * H * QG + ph * QG
        start = lo
        for t in range(0, QG * tiles):
            dk, dv, imp = _key_major_tile(q_h, do_h, LSE, DELTA, W, k, v, dk, dv, imp, offs_n, key_ok, offs_d, row0,
                                          start, sqn, sdn, N, M, D, DV, scale_log2,
                                          BLOCK_M, GRADS, NEED_IMP, CAUSAL, HAS_WEIGHT, UPCAST, PREC, SPLIT_DS)
            nxt = start + BLOCK_M >= N  # this head's tiles done: the next query head
            start = tl.where(nxt, lo, start + BLOCK_M)
            q_h += tl.where(nxt, sqh, 0)
            do_h += tl.where(nxt, sdh, 0)
            row0 += nxt.to(tl.int64)
    else:
        for start in range(lo, N, BLOCK_M):
            dk, dv, imp = _key_major_tile(Q + b * sqb + ph * sqh, DO + b * sdb + ph * sdh, LSE, DELTA, W, k, v,
                                          dk, dv, imp, offs_n, key_ok, offs_d, bh, start,
                                          sqn, sdn, N, M, D, DV, scale_log2,
                                          BLOCK_M, GRADS, NEED_IMP, CAUSAL, HAS_WEIGHT, UPCAST, PREC, SPLIT_DS)
    if HAS_PAD and not SPLIT_DS:
        pad_ok = tl.load(PAD + b * M + offs_n, mask=col_ok, other=1) == 0
        imp = tl.where(pad_ok, imp, 0.0)
        dk = tl.where(pad_ok[:, None], dk, 0.0)
        dv = tl.where(pad_ok[:, None], dv, 0.0)
    if NEED_IMP:  # (QG = 1 with GQA: the one query head ph)
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
        q = _load_rows(q_base, tok_s, sqn, offs_d, real_s, D)
        # real queries of the window (importance is a mean over them)
        n_real = (tl.minimum(WIN, GH - wy * WIN) * tl.minimum(WIN, GW - wx * WIN)).to(tl.float32)
        if BLOCK_C == BLOCK_L:
            tok_c, real_c = _window_tokens(tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
            k = _load_rows(k_base, tok_c, skn, offs_d, real_c, D)
            v = _load_rows(v_base, tok_c, svn, offs_d, real_c, DV)
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
                k = _load_rows(k_base, tok_c, skn, offs_d, real_c, D)
                s = _dot_d(q, tl.trans(k), UPCAST, PREC) * scale_log2
                s = tl.where(real_c[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
                m = m_new
            l = tl.where(l > 0, l, 1.0)  # padded query rows (never stored)
            acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
            for c0 in range(0, BLOCK_L, BLOCK_C):
                tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
                k = _load_rows(k_base, tok_c, skn, offs_d, real_c, D)
                v = _load_rows(v_base, tok_c, svn, offs_d, real_c, DV)
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
        q = _load_rows(q_base, tok_s, sqn, offs_d, real_s, D)
        k = _load_rows(k_base, tok_s, skn, offs_d, real_s, D)
        v = _load_rows(v_base, tok_s, svn, offs_d, real_s, DV)
        do = _load_rows(do_base, tok_s, sdn, offs_d, real_s, DV)
        lse = tl.load(lse_base + tok_s, mask=real_s, other=0.0)
        p = _probs(q, k, lse, real_s[:, None] & real_s[None, :], scale_log2, UPCAST, PREC)
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
        q = _load_rows(q_base, tok_s, sqn, offs_d, real_s, D)
        do = _load_rows(do_base, tok_s, sdn, offs_d, real_s, DV)
        o = _load_rows(o_base, tok_s, son, offs_d, real_s, DV)
        lse = tl.load(lse_base + tok_s, mask=real_s, other=0.0)
        if SPLIT_DS:  # delta from P and dP in fp32 (see _attn_bwd_q); stored for MODE 3
            delta = tl.zeros([BLOCK_S], tl.float32)
            for c0 in range(0, BLOCK_L, BLOCK_C):
                tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
                k = _load_rows(k_base, tok_c, skn, offs_d, real_c, D)
                v = _load_rows(v_base, tok_c, svn, offs_d, real_c, DV)
                p = _probs(q, k, lse, real_s[:, None] & real_c[None, :], scale_log2, UPCAST, PREC)
                delta += tl.sum(p * _dot_d(do, tl.trans(v), UPCAST, PREC), 1)
            tl.store(PART + bh * N + tok_s, delta, mask=real_s)
        else:
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        dq = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for c0 in range(0, BLOCK_L, BLOCK_C):
            tok_c, real_c = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
            k = _load_rows(k_base, tok_c, skn, offs_d, real_c, D)
            v = _load_rows(v_base, tok_c, svn, offs_d, real_c, DV)
            p = _probs(q, k, lse, real_s[:, None] & real_c[None, :], scale_log2, UPCAST, PREC)
            dp = _dot_d(do, tl.trans(v), UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dq += _ds_dot(ds, k, UPCAST, PREC, SPLIT_DS)
        tl.store(dq_base + tok_s[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=dmask_s)
    else:
        # keys of this sub-block; the window's queries visited chunk by chunk
        ks = _load_rows(k_base, tok_s, skn, offs_d, real_s, D)
        vs = _load_rows(v_base, tok_s, svn, offs_d, real_s, DV)
        dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for c0 in range(0, BLOCK_L, BLOCK_C):
            tok_q, real_q = _window_tokens(c0 + tl.arange(0, BLOCK_C), wy, wx, GH, GW, WIN)
            q = _load_rows(q_base, tok_q, sqn, offs_d, real_q, D)
            do = _load_rows(do_base, tok_q, sdn, offs_d, real_q, DV)
            o = _load_rows(o_base, tok_q, son, offs_d, real_q, DV)
            lse = tl.load(lse_base + tok_q, mask=real_q, other=0.0)
            if SPLIT_DS:  # written by MODE 2
                delta = tl.load(PART + bh * N + tok_q, mask=real_q, other=0.0)
            else:
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            p = _probs(q, ks, lse, real_q[:, None] & real_s[None, :], scale_log2, UPCAST, PREC)
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PREC)
            dp = _dot_d(do, tl.trans(vs), UPCAST, PREC)
            ds = p * (dp - delta[:, None])
            dk += _ds_dot(tl.trans(ds), q, UPCAST, PREC, SPLIT_DS)
        tl.store(dk_base + tok_s[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=dmask_s)
        tl.store(dv_base + tok_s[:, None] * DV + offs_d[None, :], dv.to(DVp.dtype.element_ty),
                 mask=dvmask_s)
