"""Public functional ops: input checks, then dispatch to a backend.

Shapes use B batch, h heads, N query tokens (row-major on an H x W grid),
M key tokens, d head dim, C channels. See each function's docstring.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from .backends import select

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _check_tensor(op, name, t, ndim):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_same(op, named):
    """Same dtype (a supported float type) and same device for all named tensors."""
    (first_name, first), *rest = named
    if first.dtype not in FLOAT_DTYPES:
        _fail(op, f"{first_name} has unsupported dtype {first.dtype}; use float16, bfloat16, float32 or float64")
    for name, t in rest:
        if t.dtype != first.dtype:
            _fail(op, f"dtype mismatch: {first_name} is {first.dtype} but {name} is {t.dtype}")
        if t.device != first.device:
            _fail(op, f"device mismatch: {first_name} is on {first.device} but {name} is on {t.device}")


def _check_hw(op, hw, n, what="N"):
    if hw is None or len(hw) != 2 or any(int(s) < 1 for s in hw):
        _fail(op, f"hw must be a pair (H, W) of positive ints, got {hw!r}")
    if hw[0] * hw[1] != n:
        _fail(op, f"H*W = {hw[0]}*{hw[1]} = {hw[0] * hw[1]} does not match {what} = {n}")


def _check_finite(op, name, t):
    # A data-dependent check: skipped while torch.compile traces (it would break the graph).
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        _fail(op, f"{name} contains NaN or infinite values; importance must be finite to be sorted")


def _check_attention(op, q, k, v, window, hw):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t, 4)
    _check_same(op, (("q", q), ("k", k), ("v", v)))
    B, h, N, d = q.shape
    if k.shape[:2] != (B, h) or k.shape[3] != d:
        _fail(op, f"k must be [B, h, M, d] = [{B}, {h}, M, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        _fail(op, f"v must be [B, h, M, dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if N == 0 or k.shape[2] == 0 or d == 0:
        _fail(op, f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if window is not None:
        if int(window) < 1:
            _fail(op, f"window must be a positive int, got {window!r}")
        if k.shape[2] != N:
            _fail(op, f"window mode needs as many keys as queries, got N={N}, M={k.shape[2]}")
        _check_hw(op, hw, N)


def attention_with_importance(q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0):
    """Attention output and the importance (mean received probability) of every key.

    q: [B, h, N, d]; k: [B, h, M, d]; v: [B, h, M, dv]; same dtype and device.
    Global mode (``window=None``): importance [B, M], the mean over heads and
    queries of softmax(q k^T * scale). Window mode (``window=w``, ``hw=(H, W)``,
    M == N == H*W): attention inside non-overlapping w x w windows, the grid
    zero-padded to multiples of w with padded tokens masked out; importance
    [B, N] per key, averaged over heads and the real queries of its window.
    ``scale`` defaults to d**-0.5. ``dropout_p`` > 0 drops probabilities.
    Returns (out [B, h, N, dv] in q's dtype, importance fp32 (fp64 for fp64 inputs)).
    Importance carries no gradient; out is differentiable in q, k, v.
    """
    op = "attention_with_importance"
    _check_attention(op, q, k, v, window, hw)
    backend = select(op, (q, k, v), window=window, dropout_p=dropout_p)
    return backend.attention(q, k, v, scale=scale, window=window, hw=hw, dropout_p=dropout_p)


def attention(q, k, v, *, scale=None, dropout_p=0.0):
    """Plain global attention softmax(q k^T * scale) v (no importance): [B, h, N, dv]."""
    op = "attention"
    _check_attention(op, q, k, v, None, None)
    backend = select(op, (q, k, v), dropout_p=dropout_p)
    return backend.attention(q, k, v, scale=scale, dropout_p=dropout_p, need_importance=False)[0]


def hybrid_scale_attention(q_global, k_global, v_global, q_local, k_local, v_local, *,
                           hw, reduced_hw, window=7, scale=None, dropout_p=0.0):
    """Hybrid-scale attention (SPEC 2a) with its importance map.

    q_global: [B, hg, N, d] attends to k_global, v_global: [B, hg, M, d], the
    spatially reduced map of ``reduced_hw`` = (Hr, Wr), M = Hr*Wr.
    q_local, k_local, v_local: [B, hl, N, d] attend inside ``window`` x
    ``window`` windows of the ``hw`` = (H, W) grid, N = H*W.
    Returns (out [B, hg + hl, N, d], global heads first; importance map
    [B, H, W] fp32 = local importance + nearest-upsampled global importance).
    """
    op = "hybrid_scale_attention"
    _check_attention(op, q_global, k_global, v_global, None, None)
    _check_attention(op, q_local, k_local, v_local, window, hw)
    _check_same(op, (("q_global", q_global), ("q_local", q_local)))
    if q_global.shape[0] != q_local.shape[0] or q_global.shape[2:] != q_local.shape[2:]:
        _fail(op, f"q_global {tuple(q_global.shape)} and q_local {tuple(q_local.shape)} "
                  "must share batch, tokens and head dim")
    _check_hw(op, reduced_hw, k_global.shape[2], what="the number of global keys M")
    backend = select(op, (q_global, k_global, v_global, q_local, k_local, v_local),
                     window=window, dropout_p=dropout_p)
    return backend.hybrid_scale_attention(
        q_global, k_global, v_global, q_local, k_local, v_local,
        hw=tuple(hw), reduced_hw=tuple(reduced_hw), window=window, scale=scale, dropout_p=dropout_p)


def _check_aggregation(op, x, weights, biases):
    _check_tensor(op, "x", x, 3)
    if x.dtype not in FLOAT_DTYPES:
        _fail(op, f"x has unsupported dtype {x.dtype}")
    if len(weights) not in (2, 3) or len(biases) != len(weights):
        _fail(op, f"need 2 or 3 parts with one weight and one bias each, got "
                  f"{len(weights)} weights and {len(biases)} biases")
    for p, (w, b) in enumerate(zip(weights, biases)):
        if w.numel() < 1 or b.numel() != 1:
            _fail(op, f"part {p}: weight must be non-empty and bias one element, got "
                      f"{tuple(w.shape)} and {tuple(b.shape)}")
        for name, t in (("weight", w), ("bias", b)):
            if t.device != x.device:
                _fail(op, f"device mismatch: x is on {x.device} but part {p}'s {name} is on {t.device}")
            if t.dtype != x.dtype:
                _fail(op, f"dtype mismatch: x is {x.dtype} but part {p}'s {name} is {t.dtype}")


def reallocate_tokens(x, importance, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
    """Importance-guided token reallocation (SPEC 2b), one ordering.

    x: [B, N, C]; importance: [B, N], in x's token order. Tokens are sorted
    by importance (stable, ascending); the sorted sequence is cut into parts
    (3 parts: N//4, 2*(N//4), rest; 2 parts: N//2, rest) and each part into
    groups of r_p = weights[p].numel() consecutive tokens, each group merged
    into ``sum_j weights[p][j] * token_j + biases[p]``; a short last group
    counts its missing members as zeros. Returns [B, M, C],
    M = sum_p ceil(n_p / r_p). Differentiable in x, weights and biases.
    """
    op = "reallocate_tokens"
    _check_aggregation(op, x, weights, biases)
    _check_tensor(op, "importance", importance, 2)
    if importance.shape != x.shape[:2]:
        _fail(op, f"importance must be [B, N] = {tuple(x.shape[:2])}, got {tuple(importance.shape)}")
    if importance.device != x.device:
        _fail(op, f"device mismatch: x is on {x.device} but importance is on {importance.device}")
    _check_finite(op, "importance", importance)
    index = reference.sort_index(importance)
    backend = select(op, (x,))
    return backend.aggregate_sorted(x, index, list(weights), list(biases))


def self_guided_attention(q, x, importance, kv1_weight, kv1_bias, kv2_weight, kv2_bias,
                          agg_weights: Sequence[torch.Tensor], agg_biases: Sequence[torch.Tensor], *,
                          hw, scale=None, dropout_p=0.0):
    """Self-guided attention (SPEC 2b).

    q: [B, h, N, d] queries (h even); x: [B, N, C] row-major tokens, C = h*d;
    importance: the (row-major [B, N], column-major [B, N]) pair a hybrid-scale
    block hands on, or one row-major [B, N] / [B, H, W] tensor standing for
    both. x is reallocated once per ordering (ordering 2 in column-major token
    order); ``kv1`` ([C, C] weight, [C] bias or None; K channels then V
    channels) projects ordering 1 to the K, V of heads [0, h/2), ``kv2``
    ordering 2 to heads [h/2, h); all queries attend globally.
    Returns out [B, h, N, d]. No gradient flows into importance.
    """
    op = "self_guided_attention"
    _check_tensor(op, "q", q, 4)
    _check_aggregation(op, x, agg_weights, agg_biases)
    _check_same(op, (("q", q), ("x", x)))
    B, h, N, d = q.shape
    if x.shape != (B, N, h * d):
        _fail(op, f"x must be [B, N, h*d] = [{B}, {N}, {h * d}] to match q {tuple(q.shape)}, got {tuple(x.shape)}")
    if h % 2:
        _fail(op, f"the number of heads must be even (two orderings, h/2 heads each), got {h}")
    _check_hw(op, hw, N)
    pair = (importance,) if isinstance(importance, torch.Tensor) else tuple(importance)
    if len(pair) not in (1, 2):
        _fail(op, "importance must be a tensor or a (row-major, column-major) pair")
    for i, imp in enumerate(pair):
        if not isinstance(imp, torch.Tensor):
            _fail(op, f"importance[{i}] must be a torch.Tensor, got {type(imp).__name__}")
        if imp.numel() != B * N or imp.shape[0] != B or imp.device != x.device:
            _fail(op, f"importance[{i}] must hold [B, N] = [{B}, {N}] values on {x.device}, "
                      f"got {tuple(imp.shape)} on {imp.device}")
        _check_finite(op, f"importance[{i}]", imp)
    pair = tuple(imp.reshape(B, N) for imp in pair)
    C = h * d
    for name, w, b in (("kv1", kv1_weight, kv1_bias), ("kv2", kv2_weight, kv2_bias)):
        if w.shape != (C, C) or (b is not None and b.shape != (C,)):
            _fail(op, f"{name} weight must be [{C}, {C}] and bias [{C}] or None, got "
                      f"{tuple(w.shape)} and {None if b is None else tuple(b.shape)}")
        _check_same(op, (("x", x), (f"{name}_weight", w)) + (((f"{name}_bias", b),) if b is not None else ()))
    backend = select(op, (q, x), dropout_p=dropout_p)
    return backend.self_guided_attention(
        q, x, pair if len(pair) == 2 else pair[0], kv1_weight, kv1_bias, kv2_weight, kv2_bias,
        list(agg_weights), list(agg_biases), hw=tuple(hw), scale=scale, dropout_p=dropout_p)
