"""Triton kernel of the importance family: reduce the per-tile / per-head
importance partials in a fixed order and, for hybrid-scale attention, add the
nearest-upsampled global importance to the local one, all in one small launch.

out[b, n] = wa * sum_r A[b, r, n]  (+ wg * sum_r G[b, r, src[n]] when HAS_G)

``src[n]`` is the reduced-grid token that ``F.interpolate(mode='nearest')``
copies to grid token n; it is computed once per (grid, reduced grid) with
PyTorch itself so that the kernel agrees with it bit for bit:
``launch.nearest_source`` computes it, ``launch.reduce_importance`` launches the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["RA", "RG", "N", "MG", "NT"])
def _importance_reduce(A, G, SRC, OUT, RA, RG, N, MG, NT, wa, wg,
                       BLOCK: tl.constexpr, HAS_G: tl.constexpr):
    # 1-D grid: program = b * NT + token tile
    pid = tl.program_id(0) % NT
    b = (tl.program_id(0) // NT).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    a_ptr = A + b * RA * N + offs
    for r in range(0, RA):  # fixed order: deterministic
        acc += tl.load(a_ptr, mask=ok, other=0.0)
        a_ptr += N
    acc = acc * wa
    if HAS_G:
        src = tl.load(SRC + offs, mask=ok, other=0)
        gok = ok & (src >= 0) & (src < MG)  # never read out of bounds
        g = tl.zeros([BLOCK], tl.float32)
        g_ptr = G + b * RG * MG + src
        for r in range(0, RG):
            g += tl.load(g_ptr, mask=gok, other=0.0)
            g_ptr += MG
        acc += g * wg
    tl.store(OUT + b * N + offs, acc, mask=ok)
