"""Python side of sgattn's native ops (``torch.ops.sgattn.*``, see ``_ops_names``).

Loads the extensions built by setup.py (``sgattn._C`` defines the schemas and
the CPU kernels, ``sgattn._C_cuda`` adds CUDA kernels), registers fake (meta)
kernels for ``torch.compile`` and the autograd formulas.

Attention backward (op ``attention_bwd``): the forward saves only q, k and v;
the backward recomputes the probabilities one query block at a time (whole key
rows, never the full N x M matrix; window mode per window) and applies the
standard softmax-attention gradient. CPU: C++ (csrc/cpu_ops.cpp); CUDA: C++
(csrc/cuda_ops.cpp, kernels/). ``attention_backward`` below is the same
recomputation in torch ops (device-independent, not registered). Recomputing
the softmax of each row (rather than exp(s - lse) from the saved fp32
log-sum-exp, which shifts a whole row by the lse rounding) keeps the gradients
as accurate as the reference's.

Layout contract: every native op (attention_fwd, attention_bwd, aggregate_fwd,
aggregate_bwd, on every device) returns contiguous tensors whatever its
inputs' strides, and the fake kernels below return exactly those layouts
(``new_empty`` of the shape, never ``empty_like`` of a possibly permuted
input), as torch.compile checks at run time.
"""
from __future__ import annotations

import importlib

import torch

from . import reference
from ._ops_names import NAMESPACE, SCHEMAS, qualified

BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the source tree "
              "(needs torch and a C++ compiler at install time; see setup.py)")

_loaded: dict[str, str | None] = {}
_python_side_registered = False


def load_extension(module: str) -> str | None:
    """Import a native extension once; None on success, else why it is missing."""
    if module not in _loaded:
        try:
            if module != "sgattn._C":
                importlib.import_module("sgattn._C")  # defines the schemas the CUDA kernels implement
            importlib.import_module(module)
            _register_python_side()
            _loaded[module] = None
        except ImportError as exc:
            _loaded[module] = f"extension {module} is not built ({exc}); {BUILD_HINT}"
        except Exception as exc:  # e.g. an ABI mismatch with the installed torch
            _loaded[module] = f"extension {module} failed to load ({type(exc).__name__}: {exc}); rebuild it: {BUILD_HINT}"
    return _loaded[module]


def op(name: str):
    """The registered op ``sgattn::name``; loads the CPU extension (which defines it) on first use."""
    assert name in SCHEMAS, name
    why = load_extension("sgattn._C")
    if why is not None:
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
    """``reference.aggregate_sorted`` through ``aggregate_fwd`` (gradients via ``aggregate_bwd``)."""
    grouped = index.dim() == 3
    idx = index if grouped else index[None]
    w = torch.cat([t.reshape(-1) for t in weights])
    b = torch.cat([t.reshape(-1) for t in biases])
    out = op("aggregate_fwd")(x, idx, w, b, [t.numel() for t in weights])
    return out if grouped else out[0]


# ------------------------------------------------------------------ backward

def attention_backward(dout, q, k, v, scale, window, hw):
    """dq, dk, dv of softmax attention by recomputation (see module doc)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if window:
        return _window_backward(dout, q, k, v, scale, window, hw, ct)
    qc, kc, vc, do = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    B, h, N, _ = q.shape
    M = k.shape[2]
    chunk = max(1, reference.MAX_BLOCK_ELEMENTS // max(1, B * h * M))
    dq = torch.empty_like(qc)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    for s in range(0, N, chunk):
        sl = slice(s, s + chunk)
        p = torch.softmax(torch.matmul(qc[:, :, sl], kc.transpose(-1, -2)) * scale, dim=-1)
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, sl])
        dp = torch.matmul(do[:, :, sl], vc.transpose(-1, -2))
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq[:, :, sl] = torch.matmul(ds, kc) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, sl]) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _window_backward(dout, q, k, v, scale, window, hw, ct):
    part = lambda t: reference.window_partition(t, window, hw)  # noqa: E731
    qw, kw, vw, dow = (part(t.to(ct)) for t in (q, k, v, dout))
    real = part(torch.ones(1, 1, q.shape[2], 1, dtype=ct, device=q.device))[0, 0, :, :, 0]  # [nW, L]
    s = torch.matmul(qw, kw.transpose(-1, -2)) * scale
    s = s.masked_fill(real[:, None, :] == 0, float("-inf"))  # padded keys
    p = torch.softmax(s, dim=-1) * real[:, :, None]  # padded queries contribute nothing
    dvw = torch.matmul(p.transpose(-1, -2), dow)
    dp = torch.matmul(dow, vw.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dqw = torch.matmul(ds, kw) * scale
    dkw = torch.matmul(ds.transpose(-1, -2), qw) * scale
    rev = lambda t, like: reference.window_reverse(t, window, hw).to(like.dtype)  # noqa: E731
    return rev(dqw, q), rev(dkw, k), rev(dvw, v)


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
    ctx.save_for_backward(q, k, v)
    ctx.scale, ctx.window, ctx.hw = scale, window, (H, W)
    ctx.mark_non_differentiable(lse, imp)


def _attention_grad(ctx, dout, _dlse, _dimp):
    q, k, v = ctx.saved_tensors
    H, W = ctx.hw
    dq, dk, dv = op("attention_bwd")(dout, q, k, v, ctx.scale, ctx.window, H, W)
    return dq, dk, dv, None, None, None, None, None


def _attention_bwd_grad(ctx, *grads):
    raise NotImplementedError("sgattn: double backward through the native attention is not implemented")


def _attention_bwd_fake(dout, q, k, v, scale, window, H, W):
    # new_empty, not empty_like: the kernels return contiguous tensors whatever
    # the inputs' strides (empty_like would keep a permuted q's layout).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _aggregate_fake(x, index, weights, biases, group_sizes):
    G, B, N = index.shape
    return x.new_empty(G, B, reference.reallocated_length(N, group_sizes), x.shape[2])


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
    _python_side_registered = True
