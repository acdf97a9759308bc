"""Triton kernels of the token-reallocation family (self-guided attention:
gather the importance-sorted tokens, merge each group); ``launch.py`` runs
them with the blocks and part scalars of ``plans.py``.

Forward ``_aggregate_fwd``: 1-D grid over (G*B, M, C tiles); one program makes one
merged token (all parts and both orderings in one launch): it gathers the r_p
sorted source rows of its group in blocks of BLOCK_R, weights them, sums in
fp32 and adds the part's bias. Members past the end of a short last group are
masked (they count as zeros).

Backward ``_aggregate_bwd``: 1-D grid over (B, N tiles); one program owns a block of
source tokens. Each token sits in exactly one group per ordering (the index
is a permutation), found through the inverse permutation, so
dx[n] = sum_g w[slot_g(n)] * dout[g, row_g(n)] is written once, summing the
orderings in a fixed order: no atomics. The same pass writes
t[g, b, pos] = <dout[g, row], x[n]> per sorted position, from which
d weight and d bias are fixed-order PyTorch reductions.

Indices are only ever argsort output (a permutation per row), but the kernels
stay in bounds whatever they hold: gathers through an index are masked to
[0, N), and the inverse permutation is computed with a sort, not a scatter.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _part_params(j, O1, O2, S1, S2, N, R0, R1, R2):
    """Part of merged token j: (part, first sorted position of part, part end,
    group size r, index of j inside its part). Two-part plans set O2 = M and
    S2 = N, so that nothing falls in a third part."""
    in2 = j >= O1
    in3 = j >= O2
    part = tl.where(in3, 2, tl.where(in2, 1, 0))
    start = tl.where(in3, S2, tl.where(in2, S1, 0))
    end = tl.where(in3, N, tl.where(in2, S2, S1))
    r = tl.where(in3, R2, tl.where(in2, R1, R0))
    jj = j - tl.where(in3, O2, tl.where(in2, O1, 0))
    return part, start, end, r, jj


_NOSPEC = ["B", "N", "C", "MT", "CT", "NT", "O1", "O2", "S1", "S2", "R0", "R1", "R2"]


@triton.jit(do_not_specialize=_NOSPEC)
def _aggregate_fwd(X, IDX, W, BIAS, OUT, sxb, sxn,
                   B, N, C, MT, CT, O1, O2, S1, S2, R0, R1, R2,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # = (gb * MT + j) * CT + channel tile
    ct = pid % CT
    j = (pid // CT) % MT
    gb = (pid // CT // MT).to(tl.int64)
    b = gb % B
    offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    part, start, end, r, jj = _part_params(j, O1, O2, S1, S2, N, R0, R1, R2)
    w_off = tl.where(part == 2, R0 + R1, tl.where(part == 1, R0, 0))
    first = start + jj * r
    acc = tl.zeros([BLOCK_C], tl.float32)
    for i0 in range(0, r, BLOCK_R):
        ii = i0 + tl.arange(0, BLOCK_R)
        pos = first + ii
        ok = (ii < r) & (pos < end)
        src = tl.load(IDX + gb * N + pos, mask=ok, other=0)
        ok = ok & (src >= 0) & (src < N)  # never gather out of bounds
        w = tl.load(W + w_off + ii, mask=ok, other=0.0).to(tl.float32)
        xt = tl.load(X + b * sxb + src[:, None] * sxn + offs_c[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * w[:, None], 0)
    acc += tl.load(BIAS + part).to(tl.float32)
    tl.store(OUT + (gb * MT + j) * C + offs_c, acc.to(OUT.dtype.element_ty), mask=c_ok)


@triton.jit
def _member(INV, W, gb, N, offs_t, t_ok, O1, O2, S1, S2, R0, R1, R2):
    """For source tokens offs_t in ordering gb: (sorted position, merged row, weight)."""
    pos = tl.load(INV + gb * N + offs_t, mask=t_ok, other=0)
    in2 = pos >= S1
    in3 = pos >= S2
    start = tl.where(in3, S2, tl.where(in2, S1, 0))
    r = tl.where(in3, R2, tl.where(in2, R1, R0))
    first_row = tl.where(in3, O2, tl.where(in2, O1, 0))
    w_off = tl.where(in3, R0 + R1, tl.where(in2, R0, 0))
    rel = pos - start
    row = first_row + rel // r
    w = tl.load(W + w_off + rel % r, mask=t_ok, other=0.0).to(tl.float32)
    return pos, row, w


@triton.jit(do_not_specialize=_NOSPEC)
def _aggregate_bwd(X, INV, W, DOUT, DX, T, sxb, sxn, sog, sob, son,
                   B, N, C, MT, NT, O1, O2, S1, S2, R0, R1, R2,
                   TWO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # = b * NT + token tile
    b = (pid // NT).to(tl.int64)
    offs_t = (pid % NT) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < N
    tok = offs_t.to(tl.int64)
    pos0, row0, w0 = _member(INV, W, b, N, offs_t, t_ok, O1, O2, S1, S2, R0, R1, R2)
    t0 = tl.zeros([BLOCK_T], tl.float32)
    if TWO:
        pos1, row1, w1 = _member(INV, W, B + b, N, offs_t, t_ok, O1, O2, S1, S2, R0, R1, R2)
        t1 = tl.zeros([BLOCK_T], tl.float32)
    d0_base = DOUT + b * sob + row0.to(tl.int64)[:, None] * son
    if TWO:
        d1_base = DOUT + sog + b * sob + row1.to(tl.int64)[:, None] * son
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m2 = t_ok[:, None] & (offs_c[None, :] < C)
        xt = tl.load(X + b * sxb + tok[:, None] * sxn + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        d0 = tl.load(d0_base + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
        dx = w0[:, None] * d0
        t0 += tl.sum(d0 * xt, 1)
        if TWO:
            d1 = tl.load(d1_base + offs_c[None, :], mask=m2, other=0.0).to(tl.float32)
            dx += w1[:, None] * d1
            t1 += tl.sum(d1 * xt, 1)
        tl.store(DX + (b * N + tok[:, None]) * C + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=m2)
    tl.store(T + b * N + pos0, t0, mask=t_ok)
    if TWO:
        tl.store(T + (B + b) * N + pos1, t1, mask=t_ok)
