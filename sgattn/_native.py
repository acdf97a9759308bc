"""Python side of sgattn's native ops (``torch.ops.sgattn.*``, see ``_schemas``).

Defines the ops' schemas (once, for every dispatch key), loads the extensions
built by setup.py (``sgattn._C`` implements the ops for CPU, ``sgattn._C_cuda``
for CUDA; either loads without the other), registers fake (meta) kernels for
``torch.compile`` and the autograd formulas.

Attention backward (op ``attention_bwd``): the forward saves q, k, v, its
output and the fp32 row log-sum-exp; the backward recomputes the scores one
query block at a time (whole key rows, never the full N x M matrix; window
mode per window), takes P = exp(s - lse) in one pass and applies the standard
softmax-attention gradient, with no rerun of the forward. D = rowsum(dO * O)
comes from the saved output on CUDA (C++: csrc/cuda_ops.cpp, kernels/);
the CPU kernels (kernels/cpu/, bound in csrc/cpu_ops.cpp) hold whole score rows and
take D = rowsum(P * dP), which cancels exactly where the reference's does.

Layout contract: every native op (attention_fwd, attention_bwd, aggregate_fwd,
aggregate_bwd, on every device) returns contiguous tensors whatever its
inputs' strides, and the fake kernels below return exactly those layouts
(``new_empty`` of the shape, never ``empty_like`` of a possibly permuted
input), as torch.compile checks at run time.
"""
from __future__ import annotations

import importlib

import torch

from . import composition
from ._schemas import ALL_SCHEMAS, NAMESPACE, qualified

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the source tree "
              "(needs torch and a C++ compiler at install time; see setup.py)")

_loaded: dict[str, str | None] = {}
_python_side_registered = False
_library: torch.library.Library | None = None  # holds the schema definitions (kept alive)


def _define_schemas():
    """Defines the ops once; each extension adds its dispatch key's kernels
    (in any order: the dispatcher keeps kernels registered before the schema)."""
    global _library
    if _library is None:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        for schema in ALL_SCHEMAS.values():
            lib.define(schema)
        _library = lib


def load_extension(module: str) -> str | None:
    """Import a native extension once; None on success, else why it is missing."""
    if module not in _loaded:
        try:
            _define_schemas()
            importlib.import_module(module)
            _register_python_side()
            _loaded[module] = None
        except ImportError as exc:
            _loaded[module] = f"extension {module} is not built ({exc}); {BUILD_HINT}"
        except Exception as exc:  # e.g. an ABI mismatch with the installed torch
            _loaded[module] = f"extension {module} failed to load ({type(exc).__name__}: {exc}); rebuild it: {BUILD_HINT}"
    return _loaded[module]


def op(name: str):
    """The registered op ``sgattn::name``; loads the CPU extension (or, in a build
    without it, the CUDA one) on first use."""
    assert name in ALL_SCHEMAS, name
    why = load_extension("sgattn._C")
    if why is not None and load_extension("sgattn._C_cuda") is not None:
        raise RuntimeError(why)
    return getattr(getattr(torch.ops, NAMESPACE), name)


def attention(q, k, v, *, scale=None, window=None, hw=None, need_importance=True):
    """Backend-independent call of ``attention_fwd`` (the dispatcher key picks CPU or CUDA)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # window and the grid may be SymInts (torch.compile, dynamic shapes): no int(), which would specialise
    H, W = tuple(hw) if window else (0, 0)
    out, _, imp = op("attention_fwd")(q, k, v, float(scale), window or 0, H, W, bool(need_importance))
    return out, (imp if need_importance else None)


def aggregate_sorted(x, index, weights, biases):
    """The reallocation (``sgattn.reference.aggregate_sorted``) through ``aggregate_fwd`` (gradients via ``aggregate_bwd``)."""
    grouped = index.dim() == 3
    idx = index if grouped else index[None]
    w = torch.cat([t.reshape(-1) for t in weights])
    b = torch.cat([t.reshape(-1) for t in biases])
    out = op("aggregate_fwd")(x, idx, w, b, [t.numel() for t in weights])
    return out if grouped else out[0]


# --------------------------------------------------- fake kernels and autograd

def _attention_fake(q, k, v, scale, window, H, W, need_importance):
    B, h, N, _ = q.shape
    out = q.new_empty(B, h, N, v.shape[3])
    lse = q.new_empty(B, h, N, dtype=torch.float32)
    shape = (B, N if window else k.shape[2]) if need_importance else (0,)
    return out, lse, q.new_empty(shape, dtype=torch.float32)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, window, H, W, _ = inputs
    out, lse, imp = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.window, ctx.hw = scale, window, (H, W)
    ctx.mark_non_differentiable(lse, imp)


def _attention_grad(ctx, dout, _dlse, _dimp):
    q, k, v, out, lse = ctx.saved_tensors
    H, W = ctx.hw
    dq, dk, dv = op("attention_bwd")(dout, q, k, v, out, lse, ctx.scale, ctx.window, H, W)
    return dq, dk, dv, None, None, None, None, None


def _attention_bwd_grad(ctx, *grads):
    raise NotImplementedError("sgattn: double backward through the native attention is not implemented")


def _attention_bwd_fake(dout, q, k, v, out, lse, scale, window, H, W):
    # new_empty, not empty_like: the kernels return contiguous tensors whatever
    # the inputs' strides (empty_like would keep a permuted q's layout).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _aggregate_fake(x, index, weights, biases, group_sizes):
    G, B, N = index.shape
    return x.new_empty(G, B, composition.reallocated_length(N, group_sizes), x.shape[2])


def _aggregate_bwd_fake(grad, x, index, weights, group_sizes):
    return x.new_empty(x.shape), weights.new_empty(weights.shape), weights.new_empty(len(group_sizes))


def _aggregate_setup(ctx, inputs, output):
    x, index, weights, _, group_sizes = inputs
    ctx.save_for_backward(x, index, weights)
    ctx.group_sizes = list(group_sizes)


def _aggregate_grad(ctx, grad):
    x, index, weights = ctx.saved_tensors
    dx, dw, db = op("aggregate_bwd")(grad, x, index, weights, ctx.group_sizes)
    return dx, None, dw, db, None


def mass_attention(q, k, v, *, scale, causal, key_padding_mask, query_weight):
    """(out, lse, colsum [B, Hq, M]) of ``mass_attention_fwd``; out differentiable (``mass_attention_bwd``)."""
    return op("mass_attention_fwd")(q, k, v, float(scale), bool(causal), key_padding_mask, query_weight)


def mass_from_lse(q, k, lse, *, scale, causal, key_padding_mask, query_weight):
    """colsum [B, Hq, M] of ``mass_from_lse`` (no gradient)."""
    return op("mass_from_lse")(q, k, lse, float(scale), bool(causal), key_padding_mask, query_weight)


def _mass_attention_fake(q, k, v, scale, causal, key_padding_mask, query_weight):
    B, H, N, _ = q.shape
    return (q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32),
            q.new_empty(B, H, k.shape[2], dtype=torch.float32))


def _mass_attention_bwd_fake(dout, q, k, v, out, lse, scale, causal, key_padding_mask):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _mass_from_lse_fake(q, k, lse, scale, causal, key_padding_mask, query_weight):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[2], dtype=torch.float32)


def _mass_attention_setup(ctx, inputs, output):
    q, k, v, scale, causal, key_padding_mask, _ = inputs
    out, lse, colsum = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse, colsum)


def _mass_attention_grad(ctx, dout, _dlse, _dcolsum):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = op("mass_attention_bwd")(dout, q, k, v, out, lse, ctx.scale, ctx.causal, key_padding_mask)
    return dq, dk, dv, None, None, None, None


def _register_python_side():
    global _python_side_registered
    if _python_side_registered:
        return
    torch.library.register_fake(qualified("attention_fwd"))(_attention_fake)
    torch.library.register_fake(qualified("attention_bwd"))(_attention_bwd_fake)
    torch.library.register_fake(qualified("aggregate_fwd"))(_aggregate_fake)
    torch.library.register_fake(qualified("aggregate_bwd"))(_aggregate_bwd_fake)
    torch.library.register_autograd(qualified("attention_fwd"), _attention_grad, setup_context=_attention_setup)
    torch.library.register_autograd(qualified("attention_bwd"), _attention_bwd_grad)
    torch.library.register_autograd(qualified("aggregate_fwd"), _aggregate_grad, setup_context=_aggregate_setup)
    torch.library.register_fake(qualified("mass_attention_fwd"))(_mass_attention_fake)
    torch.library.register_fake(qualified("mass_attention_bwd"))(_mass_attention_bwd_fake)
    torch.library.register_fake(qualified("mass_from_lse"))(_mass_from_lse_fake)
    torch.library.register_autograd(qualified("mass_attention_fwd"), _mass_attention_grad,
                                    setup_context=_mass_attention_setup)
    torch.library.register_autograd(qualified("mass_attention_bwd"), _attention_bwd_grad)
    _python_side_registered = True
