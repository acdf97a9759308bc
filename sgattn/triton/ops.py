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
- ``sgattn::triton_mass_attention_fwd(q, k, v, scale, causal, key_padding_mask, query_weight, first_query)
  -> (out, lse, colsum)``: global attention with grouped-query heads, causal
  masking, key padding and per-query weighted column sums (``sgattn.mass``);
- ``sgattn::triton_mass_attention_bwd(dout, q, k, v, out, lse, scale, causal, key_padding_mask) -> (dq, dk, dv)``
- ``sgattn::triton_mass_from_lse(q, k, lse, scale, causal, key_padding_mask, query_weight, first_query) -> colsum``

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


def _grads_like(q, k, v):
    """The fake backward's dq, dk, dv: shaped, typed and placed as q, k, v."""
    return tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, window, H, W):
    _check_backward("triton_attention_bwd", dout, q, k, v, out, lse, scale, window, H, W)
    return _grads_like(q, k, v)


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


# ------------------------------------------------------------ attention mass
# Global attention generalised for ``sgattn.mass``: grouped-query heads (k, v
# with Hkv heads, Hq a multiple; query head h reads kv head h // (Hq // Hkv)),
# bottom-right causal masking (query i sees keys j <= i + M - N), a key padding
# mask (bool [B, M], True for padding), and per-query weights of the column
# sums (fp32 [N]; None: 1 each). A query that sees no key has out 0, lse -inf,
# no column mass and zero gradients. lse is the natural log here.

def _check_mass(op, q, k, v, scale, key_padding_mask, query_weight, first_query):
    """The mass ops' contract, then the kernels' limits. v None: no values (from lse)."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        _dims(op, name, t, 4)
    contract.check_dtypes(op, named, FLOATS)
    contract.check_devices(op, named)
    B, Hq, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != d:
        _fail(op, f"k must be [B, Hkv, M, d] = [{B}, Hkv, M, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v is not None and tuple(v.shape[:3]) != tuple(k.shape[:3]):
        _fail(op, f"v must be [B, Hkv, M, dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Hkv < 1 or Hq % Hkv:
        _fail(op, f"the query heads must be a multiple of the key/value heads, got Hq={Hq} and Hkv={Hkv}")
    if N < 1 or M < 1:
        _fail(op, f"need at least one query and one key, got N={N}, M={M}")
    dv = v.shape[3] if v is not None else d
    lo, hi = _plans.HEAD_DIM_RANGE
    for name, n in (("head dim d", d), ("value head dim dv", dv)):
        if not lo <= n <= hi:
            _fail(op, f"{name} = {n} is outside {lo}..{hi}")
    if N > INT32_MAX or M > INT32_MAX:
        _fail(op, f"token counts must fit int32, got N={N}, M={M}")
    contract.check_scale(op, scale)
    if key_padding_mask is not None:
        if (key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2
                or tuple(key_padding_mask.shape) != (B, M)):
            _fail(op, f"key_padding_mask must be bool [B, M] = [{B}, {M}], got {key_padding_mask.dtype} "
                      f"{tuple(key_padding_mask.shape)}")
        named.append(("key_padding_mask", key_padding_mask))
    if query_weight is not None:
        if query_weight.dtype != torch.float32 or query_weight.dim() != 1 or query_weight.shape[0] != N:
            _fail(op, f"query_weight must be float32 [N] = [{N}], got {query_weight.dtype} "
                      f"{tuple(query_weight.shape)}")
        named.append(("query_weight", query_weight))
    if not 0 <= first_query <= N:
        _fail(op, f"first_query must lie in [0, N] = [0, {N}], got {first_query}")
    _device_ok(op, named)
    plan = _plans.plan_for(q.dtype, d, dv)
    programs = _plans.grid_programs(plan, B, Hq, N, M, 0, None, mass=True)
    if programs > INT32_MAX:
        _fail(op, f"the launch needs {programs} programs, more than a grid's 2**31-1")
    return B, Hq, N, M, d, dv


def _check_mass_lse(op, q, lse):
    B, Hq, N = q.shape[:3]
    _dims(op, "lse", lse, 3)
    if tuple(lse.shape) != (B, Hq, N) or lse.dtype != torch.float32:
        _fail(op, f"lse must be float32 [B, Hq, N] = [{B}, {Hq}, {N}], got {lse.dtype} {tuple(lse.shape)}")
    _device_ok(op, (("q", q), ("lse", lse)))


@torch.library.custom_op("sgattn::triton_mass_attention_fwd", mutates_args=())
def mass_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
                       key_padding_mask: Optional[Tensor], query_weight: Optional[Tensor],
                       first_query: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(out [B, Hq, N, dv] in q's dtype, laid out as [B, N, Hq, dv]; lse [B, Hq, N]
    fp32; colsum [B, Hq, M] fp32: sum_i query_weight[i] * P[i, j]). ``first_query``:
    the caller's promise that the weights of the queries before it are 0 (their
    query tiles are skipped); 0 promises nothing."""
    _check_mass("triton_mass_attention_fwd", q, k, v, scale, key_padding_mask, query_weight, first_query)
    d, dv = q.shape[-1], v.shape[-1]
    args = (scale, causal, key_padding_mask, query_weight, first_query)
    if _aligned(d) == d and _aligned(dv) == dv:
        return _launch.mass_forward(q, k, v, *args)
    out, lse, colsum = _launch.mass_forward(_pad_last(q), _pad_last(k), _pad_last(v), *args)
    res = _launch.new_out(q, dv)  # the layout the fake declares
    res.copy_(out[..., :dv])
    return res, lse, colsum


@mass_attention_fwd.register_fake
def _(q, k, v, scale, causal, key_padding_mask, query_weight, first_query):
    B, Hq, N, M, _, dv = _check_mass("triton_mass_attention_fwd", q, k, v, scale, key_padding_mask, query_weight,
                                     first_query)
    return (_launch.new_out(q, dv), q.new_empty((B, Hq, N), dtype=torch.float32),
            q.new_empty((B, Hq, M), dtype=torch.float32))


def _check_mass_backward(op, dout, q, k, v, out, lse, scale, key_padding_mask):
    _check_mass(op, q, k, v, scale, key_padding_mask, None, 0)
    B, Hq, N = q.shape[:3]
    want = (B, Hq, N, v.shape[3])
    for name, t in (("dout", dout), ("out", out)):
        _dims(op, name, t, 4)
        if tuple(t.shape) != want:
            _fail(op, f"{name} must be [B, Hq, N, dv] = {list(want)}, got {tuple(t.shape)}")
    contract.check_dtypes(op, (("q", q), ("dout", dout), ("out", out)), (q.dtype,))
    _check_mass_lse(op, q, lse)
    _device_ok(op, (("q", q), ("dout", dout), ("out", out)))


@torch.library.custom_op("sgattn::triton_mass_attention_bwd", mutates_args=())
def mass_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                       causal: bool, key_padding_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, shaped as q, k, v; dk, dv of a kv head summed
    over its query heads in a fixed order."""
    _check_mass_backward("triton_mass_attention_bwd", dout, q, k, v, out, lse, scale, key_padding_mask)
    d, dv = q.shape[-1], v.shape[-1]
    if _aligned(d) == d and _aligned(dv) == dv:
        return _launch.mass_backward(dout, q, k, v, out, lse, scale, causal, key_padding_mask)
    grads = _launch.mass_backward(*map(_pad_last, (dout, q, k, v, out)), lse, scale, causal, key_padding_mask)
    return tuple(g[..., :n].contiguous() for g, n in zip(grads, (d, d, dv)))


@mass_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, causal, key_padding_mask):
    _check_mass_backward("triton_mass_attention_bwd", dout, q, k, v, out, lse, scale, key_padding_mask)
    return _grads_like(q, k, v)


def _mass_setup(ctx, inputs, output):
    q, k, v, scale, causal, key_padding_mask, _, _ = inputs
    out, lse, colsum = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.args = (scale, causal)
    ctx.mark_non_differentiable(lse, colsum)


def _mass_backward(ctx, dout, _dlse, _dcolsum):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = mass_attention_bwd(dout, q, k, v, out, lse, *ctx.args, key_padding_mask)
    return dq, dk, dv, None, None, None, None, None


mass_attention_fwd.register_autograd(_mass_backward, setup_context=_mass_setup)


@torch.library.custom_op("sgattn::triton_mass_from_lse", mutates_args=())
def mass_from_lse(q: Tensor, k: Tensor, lse: Tensor, scale: float, causal: bool,
                  key_padding_mask: Optional[Tensor], query_weight: Optional[Tensor], first_query: int) -> Tensor:
    """colsum [B, Hq, M] fp32 as ``triton_mass_attention_fwd``'s, with P = exp(scale
    q k^T - lse) from a given row log-sum-exp lse [B, Hq, N] (natural log)."""
    _check_mass("triton_mass_from_lse", q, k, None, scale, key_padding_mask, query_weight, first_query)
    _check_mass_lse("triton_mass_from_lse", q, lse)
    args = (scale, causal, key_padding_mask, query_weight, first_query)
    if _aligned(q.shape[-1]) == q.shape[-1]:
        return _launch.mass_colsum(q, k, lse, *args)
    return _launch.mass_colsum(_pad_last(q), _pad_last(k), lse, *args)


@mass_from_lse.register_fake
def _(q, k, lse, scale, causal, key_padding_mask, query_weight, first_query):
    B, Hq, _, M, _, _ = _check_mass("triton_mass_from_lse", q, k, None, scale, key_padding_mask, query_weight,
                                    first_query)
    _check_mass_lse("triton_mass_from_lse", q, lse)
    return q.new_empty((B, Hq, M), dtype=torch.float32)
