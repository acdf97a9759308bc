"""torch.library custom ops (namespace ``sgattn``) over the Triton launchers,
with fake implementations (shapes, dtypes and strides of the real outputs)
for torch.compile and autograd registered with ``register_autograd``.

Ops:
- ``sgattn::triton_attention_fwd(q, k, v, scale, window, H, W, need_importance)
  -> (out, lse, importance partials)``; window 0 is global mode.
- ``sgattn::triton_attention_bwd(dout, q, k, v, out, lse, scale, window, H, W) -> (dq, dk, dv)``
- ``sgattn::triton_importance(part, weight, part_g, weight_g, H, W, Hr, Wr) -> [B, N]``
- ``sgattn::triton_aggregate_fwd(x, index, w_cat, b_cat, group_sizes) -> [G, B, M, C]``
- ``sgattn::triton_aggregate_bwd(dout, x, index, w_cat, group_sizes) -> (dx, dw, db)``

Every op validates its arguments itself, through the Python contract the
public ops use (``sgattn.contract``, the twin of the native bindings'), then
the Triton kernels' own limits, with no host synchronisation on CUDA
tensors; only under the interpreter (CPU tensors) is an aggregation index
checked to be a permutation. The kernels
never read or write out of bounds whatever the index holds (loads through it
are masked; the backward inverts it with a sort, not a scatter).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import composition, contract
from ..contract import check_dims as _dims
from ..contract import fail as _fail
from . import launch as _launch
from . import plans as _plans

INT32_MAX = 2 ** 31 - 1
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _device_ok(op, tensors):
    want = "cpu" if _launch.INTERPRET else "cuda"
    for name, t in tensors:
        if t.device.type != want and t.device.type != "meta":
            where = "the Triton interpreter runs CPU tensors" if _launch.INTERPRET else "Triton kernels run CUDA tensors"
            _fail(op, f"{name} is on {t.device}: {where}")
    contract.check_devices(op, tensors)


def _check_attention(op, q, k, v, scale, window, H, W, need_importance=False):
    """The contract, then the kernels' limits: head dims and window of the
    tile plans, int32 token counts, programs in one launch."""
    B, h, N, M, d, dv = contract.check_attention(op, q, k, v, window, H, W, need_importance, FLOATS)
    _device_ok(op, (("q", q), ("k", k), ("v", v)))
    contract.check_scale(op, scale)
    lo, hi = _plans.HEAD_DIM_RANGE
    for name, n in (("head dim d", d), ("value head dim dv", dv)):
        if not lo <= n <= hi:
            _fail(op, f"{name} = {n} is outside {lo}..{hi}")
    if window > _plans.MAX_WINDOW:
        _fail(op, f"window {window} is larger than {_plans.MAX_WINDOW}")
    if N > INT32_MAX or M > INT32_MAX:
        _fail(op, f"token counts must fit int32, got N={N}, M={M}")
    plan = _plans.plan_for(q.dtype, d, dv)
    programs = _plans.grid_programs(plan, B, h, N, M, window, (H, W))
    if programs > INT32_MAX:
        _fail(op, f"the launch needs {programs} programs, more than a grid's 2**31-1")


# ---------------------------------------------------------------- attention
# Head dims (SG-Former-B's 24, say) and reallocation channel counts that are
# not multiples of 16 are zero-padded to one before the kernels run: zero
# columns change no dot product and no weighted sum, and the kernels then
# always see 16-divisible sizes and strides, the specialisation the offline
# compile check covers (non-divisible sizes compile to masked scalar loads that
# spill). The padding costs a copy of the inputs for such sizes only.
HEAD_ALIGN = 16


def _aligned(n: int) -> int:
    return -(-n // HEAD_ALIGN) * HEAD_ALIGN


def _pad_last(t: Tensor) -> Tensor:
    n = t.shape[-1]
    return t if _aligned(n) == n else torch.nn.functional.pad(t, (0, _aligned(n) - n))


@torch.library.custom_op("sgattn::triton_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int, H: int, W: int,
                  need_importance: bool) -> Tuple[Tensor, Tensor, Tensor]:
    _check_attention("triton_attention_fwd", q, k, v, scale, window, H, W, need_importance)
    d, dv = q.shape[-1], v.shape[-1]
    if _aligned(d) == d and _aligned(dv) == dv:
        return _launch.attention_forward(q, k, v, scale, window, (H, W), need_importance)
    out, lse, part = _launch.attention_forward(_pad_last(q), _pad_last(k), _pad_last(v), scale, window, (H, W),
                                             need_importance)
    res = _launch.new_out(q, dv)  # the layout the fake declares
    res.copy_(out[..., :dv])
    return res, lse, part


@attention_fwd.register_fake
def _(q, k, v, scale, window, H, W, need_importance):
    _check_attention("triton_attention_fwd", q, k, v, scale, window, H, W, need_importance)
    B, h, N, d = q.shape
    M = k.shape[2]
    out = _launch.new_out(q, v.shape[3])
    lse = q.new_empty(_launch.lse_shape(B, h, N, window), dtype=torch.float32)
    rows = _plans.partial_rows(_plans.plan_for(q.dtype, d, v.shape[3]), h, N, M, window, need_importance)
    return out, lse, q.new_empty((B, rows, M), dtype=torch.float32)


def _check_backward(op, dout, q, k, v, out, lse, scale, window, H, W):
    _check_attention(op, q, k, v, scale, window, H, W)
    contract.check_attention_grads(op, q, v, dout, out, lse)
    _device_ok(op, (("q", q), ("dout", dout), ("out", out), ("lse", lse)))


@torch.library.custom_op("sgattn::triton_attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, window: int, H: int, W: int) -> Tuple[Tensor, Tensor, Tensor]:
    _check_backward("triton_attention_bwd", dout, q, k, v, out, lse, scale, window, H, W)
    d, dv = q.shape[-1], v.shape[-1]
    if _aligned(d) == d and _aligned(dv) == dv:
        return _launch.attention_backward(dout, q, k, v, out, lse, scale, window, (H, W))
    grads = _launch.attention_backward(*map(_pad_last, (dout, q, k, v, out)), lse, scale, window, (H, W))
    return tuple(g[..., :n].contiguous() for g, n in zip(grads, (d, d, dv)))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, window, H, W):
    _check_backward("triton_attention_bwd", dout, q, k, v, out, lse, scale, window, H, W)
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
def _check_importance(op, part, part_g, H, W, Hr, Wr):
    _dims(op, "part", part, 3)
    named = [("part", part)]
    if part.dtype != torch.float32:
        _fail(op, f"part must be float32, got {part.dtype}")
    if part_g is not None:
        _dims(op, "part_g", part_g, 3)
        named.append(("part_g", part_g))
        if part_g.dtype != torch.float32:
            _fail(op, f"part_g must be float32, got {part_g.dtype}")
        if part_g.shape[0] != part.shape[0]:
            _fail(op, f"part {tuple(part.shape)} and part_g {tuple(part_g.shape)} differ in batch")
        for name, a, b in (("H, W", H, W), ("Hr, Wr", Hr, Wr)):
            if a < 1 or b < 1 or a * b > INT32_MAX:
                _fail(op, f"{name} must be >= 1 with a product that fits int32, got {a}, {b}")
        if H * W != part.shape[2]:
            _fail(op, f"H*W = {H}*{W} = {H * W} does not match the {part.shape[2]} tokens of part")
        if Hr * Wr != part_g.shape[2]:
            _fail(op, f"Hr*Wr = {Hr}*{Wr} = {Hr * Wr} does not match the {part_g.shape[2]} tokens of part_g")
    _device_ok(op, named)
    if part.shape[0] * triton_cdiv(part.shape[2], _plans.IMPORTANCE_BLOCK) > INT32_MAX:
        _fail(op, "too many programs for one launch")


def triton_cdiv(a, b):
    return -(-a // b)


@torch.library.custom_op("sgattn::triton_importance", mutates_args=())
def importance(part: Tensor, weight: float, part_g: Optional[Tensor], weight_g: float,
               H: int, W: int, Hr: int, Wr: int) -> Tensor:
    _check_importance("triton_importance", part, part_g, H, W, Hr, Wr)
    return _launch.reduce_importance(part, weight, part_g, weight_g, (H, W), (Hr, Wr))


@importance.register_fake
def _(part, weight, part_g, weight_g, H, W, Hr, Wr):
    _check_importance("triton_importance", part, part_g, H, W, Hr, Wr)
    return part.new_empty((part.shape[0], part.shape[2]), dtype=torch.float32)


# ------------------------------------------------------------- reallocation
def _check_aggregate(op, x, index, w_cat, group_sizes, b_cat=None):
    contract.check_aggregate(op, x, index, w_cat, b_cat, group_sizes, FLOATS, names=("w_cat", "b_cat"))
    named = [("x", x), ("w_cat", w_cat)] + ([("b_cat", b_cat)] if b_cat is not None else [])
    _device_ok(op, named + [("index", index)])
    G, B, N = index.shape
    if G not in (1, 2):
        _fail(op, f"index must be [G, B, N] with G = 1 or 2 orderings, got {tuple(index.shape)}")
    contract.check_tokens(op, x)
    if N > INT32_MAX:
        _fail(op, f"N = {N} does not fit int32")
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        contract.check_permutations(op, index)  # it needs the values: only where that costs no device sync


@torch.library.custom_op("sgattn::triton_aggregate_fwd", mutates_args=())
def aggregate_fwd(x: Tensor, index: Tensor, w_cat: Tensor, b_cat: Tensor, group_sizes: List[int]) -> Tensor:
    _check_aggregate("triton_aggregate_fwd", x, index, w_cat, group_sizes, b_cat)
    C = x.shape[2]
    if _aligned(C) == C:
        return _launch.aggregate_forward(x, index, w_cat, b_cat, group_sizes)
    return _launch.aggregate_forward(_pad_last(x), index, w_cat, b_cat, group_sizes)[..., :C].contiguous()


@aggregate_fwd.register_fake
def _(x, index, w_cat, b_cat, group_sizes):
    G, B, N = index.shape
    return x.new_empty((G, B, composition.reallocated_length(N, group_sizes), x.shape[2]))


def _check_aggregate_bwd(op, dout, x, index, w_cat, group_sizes):
    _check_aggregate(op, x, index, w_cat, group_sizes)
    contract.check_aggregate_grad(op, x, index, dout, group_sizes, name="dout")
    _device_ok(op, (("x", x), ("dout", dout)))


@torch.library.custom_op("sgattn::triton_aggregate_bwd", mutates_args=())
def aggregate_bwd(dout: Tensor, x: Tensor, index: Tensor, w_cat: Tensor,
                  group_sizes: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    _check_aggregate_bwd("triton_aggregate_bwd", dout, x, index, w_cat, group_sizes)
    C = x.shape[2]
    if _aligned(C) == C:
        return _launch.aggregate_backward(dout, x, index, w_cat, group_sizes)
    dx, dw, db = _launch.aggregate_backward(_pad_last(dout), _pad_last(x), index, w_cat, group_sizes)
    return dx[..., :C].contiguous(), dw, db


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
