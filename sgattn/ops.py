"""Public functional ops: input checks (once per call: the tensor arguments
through ``sgattn.contract``, the contract the registered ops share), then
dispatch to a backend.

Shapes use B batch, h heads, N query tokens (row-major on an H x W grid),
M key tokens, d head dim, C channels. See each function's docstring.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Sequence

import torch

from . import composition, contract
from .backends import select
from .contract import fail as _fail

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- autocast
# The ops follow torch.autocast as F.scaled_dot_product_attention does: inside
# an autocast region for the inputs' device, every fp16/bf16/fp32 tensor input
# (not the importance, which is sorted and stays as given) is cast to the
# autocast dtype, and the op runs with autocast off, so its own fp32
# accumulation is not cast down again. Importance is returned in fp32.

def _autocast_dtype(t: torch.Tensor):
    """The dtype autocast gives this op's inputs on t's device, or None."""
    device_type = t.device.type
    # is_autocast_enabled raises for device types autocast does not know (meta)
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(dtype, value):
    """``value`` (a tensor, a list/tuple of tensors, or anything else) with its
    fp16/bf16/fp32 tensors cast to ``dtype``; fp64 and the rest unchanged."""
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(dtype, v) for v in value)
    if isinstance(value, torch.Tensor) and value.dtype in FLOAT_DTYPES[:3]:
        return value.to(dtype)
    return value


def _follow_autocast(first: torch.Tensor, inputs: tuple):
    """(inputs, context to run the op in): inside an autocast region for
    first's device, the inputs cast to its dtype and a context with autocast
    off; else the inputs unchanged and a context that does nothing."""
    dtype = _autocast_dtype(first)
    if dtype is None:
        return inputs, contextlib.nullcontext()
    return _cast(dtype, inputs), torch.autocast(first.device.type, enabled=False)


# -------------------------------------------------------------- validation
# The tensor arguments follow the contract the registered ops share
# (``sgattn.contract``); here are the public ops' own options.

def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def _check_int(op, name, value, minimum=1):
    if not _is_int(value) or value < minimum:
        _fail(op, f"{name} must be an int >= {minimum}, got {value!r}")


def _check_options(op, scale, dropout_p):
    # abs(scale) < inf, not math.isfinite: under torch.compile(dynamic=True) a module's
    # scale is a SymFloat, which math.isfinite cannot trace (a graph break)
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
                              or not abs(scale) < math.inf):
        _fail(op, f"scale must be finite (a number, or None), got {scale!r}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p <= 1.0:
        _fail(op, f"dropout_p must be a probability in [0, 1], got {dropout_p!r}")


def _check_same(op, named):
    """Same dtype (a supported float type) and same device for all named tensors."""
    contract.check_dtypes(op, named, FLOAT_DTYPES)
    contract.check_devices(op, named)


def _check_pair(op, name, hw, positive=True):
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(_is_int(s) and (not positive or s >= 1) for s in hw)):
        _fail(op, f"{name} must be a pair (H, W) of {'positive ' if positive else ''}ints, got {hw!r}")


def _check_hw(op, hw, n, what="N", name="hw"):
    _check_pair(op, name, hw)
    contract.check_grid_size(op, *hw, n, what)


def _check_importance_values(op, name, t):
    """Importance must be finite to be sorted. Eager CPU tensors are checked
    here (no device to wait for); on an accelerator, and while torch.compile
    traces, the check is an asynchronous device-side assert: no host sync, so
    it neither stalls the GPU nor breaks CUDA-graph capture."""
    if not t.is_floating_point():
        _fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")
    finite = torch.isfinite(t).all()
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(finite):
            _fail(op, f"{name} contains NaN or infinite values; importance must be finite to be sorted")
    else:
        torch._assert_async(finite, f"sgattn.{op}: {name} contains NaN or infinite values")


def _check_attention(op, q, k, v, window, hw, need_importance=True):
    """The registered attention's contract on the public options: ``window``
    None (global) or an int >= 1 with ``hw`` the (H, W) grid."""
    H = W = 0
    if window is not None:
        _check_int(op, "window", window)
        _check_pair(op, "hw", hw, positive=False)  # the contract names a grid below 1
        H, W = hw
    contract.check_attention(op, q, k, v, window or 0, H, W, need_importance, FLOAT_DTYPES)
    if q.shape[1] == 0:  # the public ops take no empty head dimension (with or without a batch)
        _fail(op, f"zero heads: q {tuple(q.shape)}")


def attention_with_importance(q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0):
    """Attention output and the importance (mean received probability) of every key.

    q: [B, h, N, d]; k: [B, h, M, d]; v: [B, h, M, dv]; same dtype and device.
    Global mode (``window=None``): importance [B, M], the mean over heads and
    queries of softmax(q k^T * scale). Window mode (``window=w``, ``hw=(H, W)``,
    M == N == H*W): attention inside non-overlapping w x w windows, the grid
    zero-padded to multiples of w with padded tokens masked out (a window
    larger than the grid covers it whole); importance [B, N] per key, averaged
    over heads and the real queries of its window.
    ``scale`` defaults to d**-0.5. ``dropout_p`` > 0 drops probabilities.
    Under ``torch.autocast`` the inputs are cast to the autocast dtype first.
    Returns (out [B, h, N, dv] in q's dtype, importance fp32 (fp64 for fp64 inputs)).
    Importance carries no gradient; out is differentiable in q, k, v.
    """
    op = "attention_with_importance"
    _check_attention(op, q, k, v, window, hw)
    _check_options(op, scale, dropout_p)
    (q, k, v), autocast_off = _follow_autocast(q, (q, k, v))
    with autocast_off:
        window = composition.clip_window(window, hw)
        backend = select(op, (q, k, v), window=window, hw=hw, dropout_p=dropout_p)
        return backend.attention(q, k, v, scale=scale, window=window, hw=hw, dropout_p=dropout_p)


def attention(q, k, v, *, scale=None, dropout_p=0.0):
    """Plain global attention softmax(q k^T * scale) v (no importance): [B, h, N, dv]."""
    op = "attention"
    _check_attention(op, q, k, v, None, None, need_importance=False)
    _check_options(op, scale, dropout_p)
    (q, k, v), autocast_off = _follow_autocast(q, (q, k, v))
    with autocast_off:
        backend = select(op, (q, k, v), dropout_p=dropout_p)
        return backend.attention(q, k, v, scale=scale, dropout_p=dropout_p, need_importance=False)[0]


def hybrid_scale_attention(q_global, k_global, v_global, q_local, k_local, v_local, *,
                           hw, reduced_hw, window=7, scale=None, dropout_p=0.0):
    """Hybrid-scale attention of SG-Former with its importance map.

    q_global: [B, hg, N, d] attends to k_global, v_global: [B, hg, M, d], the
    spatially reduced map of ``reduced_hw`` = (Hr, Wr), M = Hr*Wr.
    q_local, k_local, v_local: [B, hl, N, d] attend inside ``window`` x
    ``window`` windows of the ``hw`` = (H, W) grid, N = H*W.
    Returns (out [B, hg + hl, N, d], global heads first; importance map
    [B, H, W] fp32 = local importance + nearest-upsampled global importance).
    Under ``torch.autocast`` the inputs are cast to the autocast dtype first.
    """
    op = "hybrid_scale_attention"
    _check_attention(op, q_global, k_global, v_global, None, None)
    _check_attention(op, q_local, k_local, v_local, window, hw)
    _check_options(op, scale, dropout_p)
    _check_same(op, (("q_global", q_global), ("q_local", q_local)))
    if q_global.shape[0] != q_local.shape[0] or q_global.shape[2:] != q_local.shape[2:]:
        _fail(op, f"q_global {tuple(q_global.shape)} and q_local {tuple(q_local.shape)} "
                  "must share batch, tokens and head dim")
    _check_hw(op, reduced_hw, k_global.shape[2], what="the number of global keys M", name="reduced_hw")
    tensors, autocast_off = _follow_autocast(q_global, (q_global, k_global, v_global, q_local, k_local, v_local))
    with autocast_off:
        window = composition.clip_window(window, hw)
        backend = select(op, tensors, window=window, hw=tuple(hw), dropout_p=dropout_p)
        return backend.hybrid_scale_attention(
            *tensors, hw=tuple(hw), reduced_hw=tuple(reduced_hw), window=window, scale=scale, dropout_p=dropout_p)


def _check_aggregation(op, x, weights, biases):
    contract.check_dims(op, "x", x, 3)
    contract.check_dtypes(op, (("x", x),), FLOAT_DTYPES)
    contract.check_tokens(op, x)
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        _fail(op, "weights and biases must be lists of tensors")
    if len(weights) not in (2, 3) or len(biases) != len(weights):
        _fail(op, f"need 2 or 3 parts with one weight and one bias each, got "
                  f"{len(weights)} weights and {len(biases)} biases")
    for p, (w, b) in enumerate(zip(weights, biases)):
        for name, t in (("weight", w), ("bias", b)):
            if not isinstance(t, torch.Tensor):
                _fail(op, f"part {p}'s {name} must be a torch.Tensor, got {type(t).__name__}")
        if w.numel() < 1 or b.numel() != 1:
            _fail(op, f"part {p}: weight must be non-empty and bias one element, got "
                      f"{tuple(w.shape)} and {tuple(b.shape)}")
        for name, t in (("weight", w), ("bias", b)):
            if t.device != x.device:
                _fail(op, f"device mismatch: x is on {x.device} but part {p}'s {name} is on {t.device}")
            if t.dtype != x.dtype:
                _fail(op, f"dtype mismatch: x is {x.dtype} but part {p}'s {name} is {t.dtype}")


def reallocate_tokens(x, importance, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
    """Importance-guided token reallocation of SG-Former, one ordering.

    x: [B, N, C]; importance: [B, N], in x's token order. Tokens are sorted
    by importance (stable, ascending); the sorted sequence is cut into parts
    (3 parts: N//4, 2*(N//4), rest; 2 parts: N//2, rest) and each part into
    groups of r_p = weights[p].numel() consecutive tokens, each group merged
    into ``sum_j weights[p][j] * token_j + biases[p]``; a short last group
    counts its missing members as zeros. Returns [B, M, C],
    M = sum_p ceil(n_p / r_p). Differentiable in x, weights and biases.
    Under ``torch.autocast`` x and the parameters are cast to the autocast dtype.
    """
    op = "reallocate_tokens"
    contract.check_dims(op, "x", x, 3)
    # cast first: the checks below see the dtypes the op runs in
    (x, weights, biases), autocast_off = _follow_autocast(x, (x, weights, biases))
    with autocast_off:
        _check_aggregation(op, x, weights, biases)
        contract.check_dims(op, "importance", importance, 2)
        if importance.shape != x.shape[:2]:
            _fail(op, f"importance must be [B, N] = {tuple(x.shape[:2])}, got {tuple(importance.shape)}")
        contract.check_devices(op, (("x", x), ("importance", importance)))
        _check_importance_values(op, "importance", importance)
        index = composition.sort_index(importance)
        backend = select(op, (x,))
        return backend.aggregate_sorted(x, index, list(weights), list(biases))


def _check_self_guided_importance(op, importance, B, N, hw, device):
    """The importance argument as a tuple of one or two tensors, checked."""
    pair = (importance,) if isinstance(importance, torch.Tensor) else importance
    if not isinstance(pair, (tuple, list)) or len(pair) not in (1, 2):
        _fail(op, "importance must be a tensor or a (row-major, column-major) pair of tensors")
    # one tensor may also be the [B, H, W] map; a pair holds two [B, N] flattenings
    shapes = [(B, N), (B, *hw)] if len(pair) == 1 else [(B, N)]
    for i, imp in enumerate(pair):
        if not isinstance(imp, torch.Tensor):
            _fail(op, f"importance[{i}] must be a torch.Tensor, got {type(imp).__name__}")
        if tuple(imp.shape) not in shapes or imp.device != device:
            want = " or ".join(str(list(s)) for s in shapes)
            _fail(op, f"importance[{i}] must be {want} on {device}, got {list(imp.shape)} on {imp.device}")
        _check_importance_values(op, f"importance[{i}]", imp)
    return tuple(imp.reshape(B, N) for imp in pair)


def self_guided_attention(q, x, importance, kv1_weight, kv1_bias, kv2_weight, kv2_bias,
                          agg_weights: Sequence[torch.Tensor], agg_biases: Sequence[torch.Tensor], *,
                          hw, scale=None, dropout_p=0.0):
    """Self-guided attention of SG-Former.

    q: [B, h, N, d] queries (h even); x: [B, N, C] row-major tokens, C = h*d;
    importance: the (row-major [B, N], column-major [B, N]) pair a hybrid-scale
    block hands on, or one row-major [B, N] / [B, H, W] tensor standing for
    both. x is reallocated once per ordering (as ``reallocate_tokens``;
    ordering 2 in column-major token order); ``kv1`` ([C, C] weight, [C] bias
    or None; K channels then V channels) projects ordering 1 to the K, V of
    heads [0, h/2), ``kv2`` ordering 2 to heads [h/2, h); all queries attend
    globally. Returns out [B, h, N, d]. No gradient flows into importance.
    Under ``torch.autocast`` every input but the importance is cast to the
    autocast dtype (SG-Former's LayerNorm hands on fp32 tokens there).
    """
    op = "self_guided_attention"
    contract.check_dims(op, "q", q, 4)
    # cast first: the checks below see the dtypes the op runs in
    (q, x, kv1_weight, kv1_bias, kv2_weight, kv2_bias, agg_weights, agg_biases), autocast_off = _follow_autocast(
        q, (q, x, kv1_weight, kv1_bias, kv2_weight, kv2_bias, agg_weights, agg_biases))
    with autocast_off:
        _check_aggregation(op, x, agg_weights, agg_biases)
        _check_options(op, scale, dropout_p)
        _check_same(op, (("q", q), ("x", x)))
        B, h, N, d = q.shape
        if h == 0 or d == 0:
            _fail(op, f"zero heads or head dim: q {tuple(q.shape)}")
        if x.shape != (B, N, h * d):
            _fail(op, f"x must be [B, N, h*d] = [{B}, {N}, {h * d}] to match q {tuple(q.shape)}, got {tuple(x.shape)}")
        if h % 2:
            _fail(op, f"the number of heads must be even (two orderings, h/2 heads each), got {h}")
        _check_hw(op, hw, N)
        pair = _check_self_guided_importance(op, importance, B, N, tuple(hw), x.device)
        C = h * d
        for name, w, b in (("kv1", kv1_weight, kv1_bias), ("kv2", kv2_weight, kv2_bias)):
            if not isinstance(w, torch.Tensor) or not (b is None or isinstance(b, torch.Tensor)):
                _fail(op, f"{name} weight must be a tensor and bias a tensor or None")
            if w.shape != (C, C) or (b is not None and b.shape != (C,)):
                _fail(op, f"{name} weight must be [{C}, {C}] and bias [{C}] or None, got "
                          f"{tuple(w.shape)} and {None if b is None else tuple(b.shape)}")
            _check_same(op, (("x", x), (f"{name}_weight", w)) + (((f"{name}_bias", b),) if b is not None else ()))
        backend = select(op, (q, x), dropout_p=dropout_p)
        return backend.self_guided_attention(
            q, x, pair if len(pair) == 2 else pair[0], kv1_weight, kv1_bias, kv2_weight, kv2_bias,
            list(agg_weights), list(agg_biases), hw=tuple(hw), scale=scale, dropout_p=dropout_p)
