"""Launch specs and launchers of the Triton kernels: tensors in, tensors out
(no autograd; see ``sgattn/triton/ops.py``).

A launch spec is (kernel, grid, args, constexprs, num_warps): the launchers
run them, and ``compile_check`` compiles the same specs for sm_80/sm_90.
"""
from __future__ import annotations

import contextlib
import os

import triton

from .attention_kernels import _attn_bwd_q, _attn_fwd, _attn_key_major, _window_attn
from .importance_kernels import _importance_reduce
from .plans import (IMPORTANCE_BLOCK, PLANS, REALLOCATION_BWD_BLOCKS, global_config, head_block, kind_of,
                    mass_config, partial_rows, plan_for, reallocation_blocks, reallocation_plan, window_config,
                    window_grid)
from .reallocation_kernels import _aggregate_bwd, _aggregate_fwd

# Kernels are interpreted when TRITON_INTERPRET=1 was set before they were defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _flags(kind):
    return {"UPCAST": INTERPRET and kind == "bf16", "PREC": "tf32" if kind in ("fp16", "bf16") else kind}


def _ds_flag(kind):
    return kind in ("fp16", "bf16")


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


def _mask_flags(causal, pad, G):
    return dict(CAUSAL=bool(causal), HAS_PAD=pad is not None, GQA=G > 1)


def forward_launches(q, k, v, out, lse, part, scale, window, hw, need_importance, *, mass=False, causal=False,
                     pad=None, weight=None, first=0):
    """Launch specs of the forward. ``mass`` (global mode only): attention
    mass's forward: k, v may have fewer heads than q (grouped-query, query head
    h reads kv head h // G), ``causal`` (bottom-right), ``pad`` (uint8 [B, M],
    nonzero for padding keys), and ``part`` is the per-query-head column sums
    [B, h, M] weighted by ``weight`` ([N] fp32 or None; the weights before query
    ``first`` are 0), from the key-major pass; rows always take the key-tile
    loop (no single-tile variants of the mass flags)."""
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    G = h // k.shape[1] if k.shape[1] else 1
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
    single, block_n = (False, plan.block_n) if mass else global_config(plan, M)
    mc = mass_config(plan, bool(causal) or pad is not None or G > 1)
    qt = triton.cdiv(N, mc["fwd_block_m"])
    out_l = [(_attn_fwd, qt * B * h,
              [q, k, v, out, lse, part, q if pad is None else pad, *strides, h, N, M, D, DV, qt, G, scale_log2],
              dict(BLOCK_M=mc["fwd_block_m"], BLOCK_N=block_n, BLOCK_D=plan.bd, SINGLE_TILE=single,
                   NEED_IMP=need_importance and single, **_mask_flags(causal, pad, G), **fl),
              8 if block_n >= 256 else mc["fwd_warps"])]
    if need_importance and not single:
        # Long key rows (and the mass): recompute P key-major from the stored lse (O(N) memory).
        out_l += colsum_launches(q, k, lse, part, scale, causal=causal, pad=pad, weight=weight, first=first, dv=DV)
    return out_l


def colsum_launches(q, k, lse, part, scale, *, causal=False, pad=None, weight=None, first=0, dv=None):
    """The key-major column-sum pass: part [B, h, M] = per query head, sum over
    queries of weight * P, P = exp2(S - lse) recomputed from the row
    log-sum-exp (log2 units), O(N) memory. One program per (b, query head, key
    tile), with the tiles of the plan of head dims (d, ``dv``; default d)."""
    B, h, N, D = q.shape
    M = k.shape[2]
    G = h // k.shape[1] if k.shape[1] else 1
    kind = kind_of(q.dtype)
    plan = PLANS[(kind, head_block(D, D if dv is None else dv))]
    kt = triton.cdiv(M, plan.bwd)
    strides = (*q.stride()[:3], *k.stride()[:3], *k.stride()[:3])
    return [(_attn_key_major, kt * B * h,
             [q, k, k, q, lse, lse, q, q, part, q if pad is None else pad, q if weight is None else weight,
              *strides, 0, 0, 0, h, N, M, D, D, kt, G, 1, int(first), scale, scale * LOG2E],
             dict(BLOCK_M=plan.bwd, BLOCK_N=plan.bwd, BLOCK_D=plan.bd, GRADS=False, NEED_IMP=True,
                  HAS_WEIGHT=weight is not None, SPLIT_DS=False, **_mask_flags(causal, pad, G), **_flags(kind)),
             plan.km_warps)]


def backward_launches(do, q, k, v, out, lse, dq, dk, dv, delta, scale, window, hw, *, causal=False, pad=None):
    """Launch specs of the backward. Global mode takes the mass options of
    ``forward_launches``: dk, dv [B, Hkv, M, *] are summed over each kv
    head's query heads, in a fixed order (one program per kv head and key tile)."""
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    hkv = k.shape[1]
    G = h // hkv if hkv else 1
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
    masks = _mask_flags(causal, pad, G)
    mc = mass_config(plan, bool(causal) or pad is not None or G > 1)
    padp = q if pad is None else pad
    blk, kblk = plan.bwd, mc["grads_block_n"]
    qt, kt = triton.cdiv(N, blk), triton.cdiv(M, kblk)
    return [(_attn_bwd_q, qt * B * h,
             [q, k, v, out, do, lse, delta, dq, padp, *qkv, *out.stride()[:3], *do.stride()[:3],
              h, N, M, D, DV, qt, G, scale, scale_log2],
             dict(BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=plan.bd, **masks, **fl), mc["bwd_q_warps"]),
            (_attn_key_major, kt * B * hkv,
             [q, k, v, do, lse, delta, dk, dv, q, padp, q, *qkv, *do.stride()[:3],
              hkv, N, M, D, DV, kt, G, G, 0, scale, scale_log2],
             dict(BLOCK_M=blk, BLOCK_N=kblk, BLOCK_D=plan.bd, GRADS=True, NEED_IMP=False, HAS_WEIGHT=False,
                  **masks, **fl), mc["grads_warps"])]


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


def _pad_u8(key_padding_mask):
    """The key padding mask as uint8 [B, M] (a free view of the bool tensor)."""
    import torch
    return None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)


def mass_forward(q, k, v, scale: float, causal: bool, key_padding_mask, query_weight, first: int = 0):
    """Attention with the mass options: (out [B, Hq, N, dv], lse [B, Hq, N] fp32
    natural log (-inf for a query that sees no key), colsum [B, Hq, M] fp32).
    The kernels keep lse in log2 units; it is converted once at the end."""
    import torch
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    out = new_out(q, DV)
    lse = torch.empty(B, h, N, device=q.device, dtype=torch.float32)
    colsum = torch.empty(B, h, M, device=q.device, dtype=torch.float32)
    if B * h == 0:
        return out, lse, colsum
    weight = None if query_weight is None else query_weight.contiguous()
    _run(forward_launches(q, k, v, out, lse, colsum, scale, 0, None, True, mass=True, causal=causal,
                          pad=_pad_u8(key_padding_mask), weight=weight, first=first), q)
    return out, lse.mul_(LN2), colsum


def mass_colsum(q, k, lse, scale: float, causal: bool, key_padding_mask, query_weight, first: int = 0):
    """colsum [B, Hq, M] fp32 from a row log-sum-exp [B, Hq, N] (natural log)."""
    import torch
    q, k = _rows(q), _rows(k)
    B, h, N, _ = q.shape
    colsum = torch.empty(B, h, k.shape[2], device=q.device, dtype=torch.float32)
    if B * h == 0:
        return colsum
    weight = None if query_weight is None else query_weight.contiguous()
    lse2 = (lse * LOG2E).contiguous()
    _run(colsum_launches(q, k, lse2, colsum, scale, causal=causal, pad=_pad_u8(key_padding_mask), weight=weight,
                         first=first), q)
    return colsum


def mass_backward(do, q, k, v, out, lse, scale: float, causal: bool, key_padding_mask):
    """(dq [B, Hq, N, d], dk [B, Hkv, M, d], dv [B, Hkv, M, dv]) contiguous, in the
    inputs' dtype, from the forward's out and lse (natural log)."""
    import torch
    do, q, k, v, out = _rows(do), _rows(q), _rows(k), _rows(v), _rows(out)
    B, h, N, D = q.shape
    M, DV = k.shape[2], v.shape[3]
    dq = torch.empty(B, h, N, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape[0], k.shape[1], M, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape[0], v.shape[1], M, DV, device=q.device, dtype=v.dtype)
    if B * h == 0:
        return dq, dk, dv
    delta = torch.empty(B, h, N, device=q.device, dtype=torch.float32)
    lse2 = (lse * LOG2E).contiguous()
    _run(backward_launches(do, q, k, v, out, lse2, dq, dk, dv, delta, scale, 0, None, causal=causal,
                           pad=_pad_u8(key_padding_mask)), q)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Importance reduction and token reallocation.

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
    nt = triton.cdiv(N, IMPORTANCE_BLOCK)
    part = part.contiguous()
    g = g.contiguous()
    with device_guard(part):
        _importance_reduce[(nt * B,)](
            part, g, src, out, R, g.shape[1] if has_g else 0, N, g.shape[2] if has_g else 0, nt,
            float(weight), float(weight_g), BLOCK=IMPORTANCE_BLOCK, HAS_G=has_g)
    return out


def _aggregate_sizes(x, index, group_sizes):
    """(G orderings, B, N, C, merged length, kernel plan scalars, part sizes, groups per part)."""
    G, B, N = index.shape
    p, parts, groups = reallocation_plan(N, group_sizes)
    return G, B, N, x.shape[2], sum(groups), p, parts, groups


def aggregate_forward(x, index, w_cat, b_cat, group_sizes):
    """x [B, N, C], index [G, B, N] int64, w_cat [sum r_p], b_cat [P] -> [G, B, M, C]."""
    import torch
    G, B, N, C, MT, p, _, _ = _aggregate_sizes(x, index, group_sizes)
    out = torch.empty(G, B, MT, C, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    x = _rows(x)
    idx = index.contiguous()
    BLOCK_C, BLOCK_R = reallocation_blocks(C, group_sizes)
    ct = triton.cdiv(C, BLOCK_C)
    with device_guard(x):
        _aggregate_fwd[(G * B * MT * ct,)](
            x, idx, w_cat.contiguous(), b_cat.contiguous(), out, x.stride(0), x.stride(1), B, N, C, MT, ct, **p,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return out


def aggregate_backward(dout, x, index, w_cat, group_sizes):
    """(dx [B, N, C], d w_cat, d b_cat) in the parameters' dtype."""
    import torch
    G, B, N, C, MT, p, parts, groups = _aggregate_sizes(x, index, group_sizes)
    if tuple(dout.shape) != (G, B, MT, C):
        raise ValueError(f"aggregate backward: dout must be {(G, B, MT, C)}, got {tuple(dout.shape)}")
    # inverse permutation: sorted position of every source token, per ordering
    # (argsort of a permutation is its inverse; unlike a scatter it cannot
    # write out of bounds, whatever the index holds)
    inv = torch.argsort(index, dim=2)
    dx = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    t = torch.empty(G, B, N, device=x.device, dtype=torch.float32)
    x, dout = _rows(x), _rows(dout)
    ds = dout.stride()
    BLOCK_T, BLOCK_C = REALLOCATION_BWD_BLOCKS[0], min(REALLOCATION_BWD_BLOCKS[1], triton.next_power_of_2(C))
    nt = triton.cdiv(N, BLOCK_T)
    if B > 0:
        with device_guard(x):
            _aggregate_bwd[(nt * B,)](
                x, inv, w_cat.contiguous(), dout, dx, t, x.stride(0), x.stride(1), ds[0], ds[1], ds[2],
                B, N, C, MT, nt, **p, TWO=G == 2, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    dws, dbs = [], []
    # d weight / d bias sum G*B*groups*C terms: accumulate them in fp64 (the
    # terms are small tensors), so the sum adds no error of its own.
    rows = dout.double().sum(dim=3)  # [G, B, MT]
    start = row = 0
    for n_p, g_p, r in zip(parts, groups, group_sizes):
        tp = t[:, :, start:start + n_p].double()
        if g_p * r != n_p:
            tp = torch.nn.functional.pad(tp, (0, g_p * r - n_p))
        dws.append(tp.reshape(G * B * g_p, r).sum(dim=0))
        dbs.append(rows[:, :, row:row + g_p].sum().reshape(1))
        start += n_p
        row += g_p
    return dx, torch.cat(dws).to(w_cat.dtype), torch.cat(dbs).to(w_cat.dtype)
