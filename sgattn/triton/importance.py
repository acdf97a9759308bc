"""Triton kernel of the importance family: reduce the per-tile / per-head
importance partials in a fixed order and, for hybrid-scale attention, add the
nearest-upsampled global importance to the local one, all in one small launch.

out[b, n] = wa * sum_r A[b, r, n]  (+ wg * sum_r G[b, r, src[n]] when HAS_G)

``src[n]`` is the reduced-grid token that ``F.interpolate(mode='nearest')``
copies to grid token n; it is computed once per (grid, reduced grid) with
PyTorch itself so that the kernel agrees with it bit for bit.
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


BLOCK = 256
_SRC_CACHE: dict = {}


def nearest_source(hw, reduced_hw, device):
    """[H*W] int64: the reduced token each grid token takes under nearest upsampling."""
    import torch
    import torch.nn.functional as F
    key = (tuple(hw), tuple(reduced_hw), str(device))
    src = _SRC_CACHE.get(key)
    if src is None:
        Hr, Wr = reduced_hw
        ids = torch.arange(Hr * Wr, dtype=torch.float64, device=device).reshape(1, 1, Hr, Wr)
        src = F.interpolate(ids, size=tuple(hw), mode="nearest").reshape(-1).to(torch.int64)
        _SRC_CACHE[key] = src
    return src


def reduce_importance(part, weight: float, part_g=None, weight_g: float = 0.0, hw=None, reduced_hw=None):
    """[B, R, N] partials -> [B, N] fp32 (plus upsampled [B, RG, Mg] partials)."""
    import torch
    B, R, N = part.shape
    out = torch.empty(B, N, device=part.device, dtype=torch.float32)
    has_g = part_g is not None
    src = nearest_source(hw, reduced_hw, part.device) if has_g else part
    g = part_g if has_g else part
    if B * N == 0:
        return out
    nt = triton.cdiv(N, BLOCK)
    part = part.contiguous()
    g = g.contiguous()
    from .attention import device_guard
    with device_guard(part):
        _importance_reduce[(nt * B,)](
            part, g, src, out, R, g.shape[1] if has_g else 0, N, g.shape[2] if has_g else 0, nt,
            float(weight), float(weight_g), BLOCK=BLOCK, HAS_G=has_g)
    return out
