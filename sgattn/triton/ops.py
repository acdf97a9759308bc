"""torch.library custom ops (namespace ``sgattn``) over the Triton launchers,
with fake implementations (shapes/dtypes only) for torch.compile and
autograd registered with ``register_autograd``.

Ops:
- ``sgattn::triton_attention_fwd(q, k, v, scale, window, H, W, need_importance)
  -> (out, lse, importance partials)``; window 0 is global mode.
- ``sgattn::triton_attention_bwd(dout, q, k, v, out, lse, scale, window, H, W) -> (dq, dk, dv)``
- ``sgattn::triton_importance(part, weight, part_g, weight_g, H, W, Hr, Wr) -> [B, N]``
- ``sgattn::triton_aggregate_fwd(x, index, w_cat, b_cat, group_sizes) -> [G, B, M, C]``
- ``sgattn::triton_aggregate_bwd(dout, x, index, w_cat, group_sizes) -> (dx, dw, db)``
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import attention as _attn
from . import importance as _imp
from . import reallocation as _realloc


# ---------------------------------------------------------------- attention
@torch.library.custom_op("sgattn::triton_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int, H: int, W: int,
                  need_importance: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _attn.attention_forward(q, k, v, scale, window, (H, W), need_importance)


@attention_fwd.register_fake
def _(q, k, v, scale, window, H, W, need_importance):
    B, h, N, _ = q.shape
    M = k.shape[2]
    out = _attn.new_out(q, v.shape[3])
    lse = q.new_empty((0,) if window else (B, h, N), dtype=torch.float32)
    rows = _attn.partial_rows(h, N, M, window, need_importance)
    return out, lse, q.new_empty((B, rows, M), dtype=torch.float32)


@torch.library.custom_op("sgattn::triton_attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, window: int, H: int, W: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _attn.attention_backward(dout, q, k, v, out, lse, scale, window, (H, W))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, window, H, W):
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype),
            torch.empty(k.shape, device=k.device, dtype=k.dtype),
            torch.empty(v.shape, device=v.device, dtype=v.dtype))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, window, H, W, _ = inputs
    out, lse, part = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (scale, window, H, W)
    ctx.mark_non_differentiable(lse, part)  # importance is computed from detached probabilities


def _attention_backward(ctx, dout, _dlse, _dpart):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


# --------------------------------------------------------------- importance
@torch.library.custom_op("sgattn::triton_importance", mutates_args=())
def importance(part: Tensor, weight: float, part_g: Optional[Tensor], weight_g: float,
               H: int, W: int, Hr: int, Wr: int) -> Tensor:
    return _imp.reduce_importance(part, weight, part_g, weight_g, (H, W), (Hr, Wr))


@importance.register_fake
def _(part, weight, part_g, weight_g, H, W, Hr, Wr):
    return part.new_empty((part.shape[0], part.shape[2]), dtype=torch.float32)


# ------------------------------------------------------------- reallocation
@torch.library.custom_op("sgattn::triton_aggregate_fwd", mutates_args=())
def aggregate_fwd(x: Tensor, index: Tensor, w_cat: Tensor, b_cat: Tensor, group_sizes: List[int]) -> Tensor:
    return _realloc.aggregate_forward(x, index, w_cat, b_cat, group_sizes)


@aggregate_fwd.register_fake
def _(x, index, w_cat, b_cat, group_sizes):
    G, B, N = index.shape
    M = sum(-(-n // r) for n, r in zip(_parts(N, len(group_sizes)), group_sizes))
    return x.new_empty((G, B, M, x.shape[2]))


def _parts(N, P):
    # reference.reallocation_parts with SymInt-friendly arithmetic
    if P == 3:
        quarter = N // 4
        return [quarter, 2 * quarter, N - 3 * quarter]
    return [N // 2, N - N // 2]


@torch.library.custom_op("sgattn::triton_aggregate_bwd", mutates_args=())
def aggregate_bwd(dout: Tensor, x: Tensor, index: Tensor, w_cat: Tensor,
                  group_sizes: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    return _realloc.aggregate_backward(dout, x, index, w_cat, group_sizes)


@aggregate_bwd.register_fake
def _(dout, x, index, w_cat, group_sizes):
    return (torch.empty(x.shape, device=x.device, dtype=x.dtype), w_cat.new_empty(w_cat.shape),
            w_cat.new_empty((len(group_sizes),)))


def _aggregate_setup(ctx, inputs, output):
    x, index, w_cat, _, group_sizes = inputs
    ctx.save_for_backward(x, index, w_cat)
    ctx.group_sizes = group_sizes


def _aggregate_backward(ctx, dout):
    x, index, w_cat = ctx.saved_tensors
    dx, dw, db = aggregate_bwd(dout, x, index, w_cat, ctx.group_sizes)
    return dx, None, dw, db, None


aggregate_fwd.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)
