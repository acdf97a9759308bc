"""Triton backend vs the reference (fp64-justified tolerances, tests/tolerance.py).

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest) or on a GPU.
Every kernel's output buffer is poisoned with NaN (torch.empty patched while
the kernel runs), so an element a kernel forgets to write fails the test.
"""
import math

import pytest
import torch

import sgattn
from sgattn import reference
from sgattn.backends import BackendError, get_backend

from tolerance import assert_close_to_reference

pytestmark = pytest.mark.skipif(get_backend("triton").unavailable() is not None,
                                reason=f"triton backend unavailable: {get_backend('triton').unavailable()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def poison(monkeypatch):
    """Fill every float tensor the backend allocates with NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t
    monkeypatch.setattr(torch, "empty", empty)
    return lambda: monkeypatch.setattr(torch, "empty", real_empty)


def _inputs(shapes, dtype, device, transposed_q=True):
    """Fresh random tensors; q as a transposed view of [B, N, h, d] like the modules pass."""
    (B, h, N, d), (M, dv) = shapes
    q = torch.randn(B, N, h, d, device=device, dtype=dtype).transpose(1, 2) if transposed_q \
        else torch.randn(B, h, N, d, device=device, dtype=dtype)
    k = torch.randn(B, h, M, d, device=device, dtype=dtype)
    v = torch.randn(B, h, M, dv, device=device, dtype=dtype)
    return q, k, v


def _check_attention(q, k, v, window=None, hw=None, poison=None, grads=True):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with sgattn.use_backend("triton"):
        out, imp = sgattn.attention_with_importance(*leaves, window=window, hw=hw)
    dout = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    if grads:
        out.backward(dout)  # still poisoned: the backward's buffers are checked too
    if poison:
        poison()
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_out, ref_imp = reference.attention(*ref_leaves, window=window, hw=hw)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, imp64 = reference.attention(*leaves64, window=window, hw=hw)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert imp.shape == ref_imp.shape and imp.dtype == torch.float32
    assert_close_to_reference(out, ref_out, out64, what="out")
    assert_close_to_reference(imp, ref_imp, imp64, what="importance")
    assert imp.grad_fn is None
    if not grads:
        return
    ref_out.backward(dout)
    out64.backward(dout.double())
    for name, a, r, r64 in zip("qkv", leaves, ref_leaves, leaves64):
        assert a.grad.dtype == a.dtype
        if name in "qk" and k.shape[2] == 1:
            # One key: softmax is constant, dq = dk = 0 exactly, and autograd's
            # softmax backward cancels exactly. A flash backward computes
            # p * (dO.v - dO.o) with two length-d fp32 dot products instead, so
            # it leaves fp32 rounding of those terms: bound it by their size.
            d, N = q.shape[3], q.shape[2]
            ds = 4 * d * 2 ** -23 * (dout.abs().max() * v.abs().max()).item()  # |dO.v - dO.o|
            other = k if name == "q" else q  # dq = ds k scale; dk = sum over N queries of ds q scale
            bound = ds * other.abs().max().item() * d ** -0.5 * (N if name == "k" else 1)
            assert r64.grad.abs().max() == 0 and a.grad.abs().max().item() <= bound
            continue
        assert_close_to_reference(a.grad, r.grad, r64.grad, what=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,M,d", [
    (97, 1, 32),     # a single key
    (97, 50, 24),    # SG-Former-like reduced map, non-power-of-two head dim
    (33, 130, 32),   # one 256-wide key tile
    (70, 300, 24),   # long rows: online softmax + key-major importance pass
])
def test_global_attention(N, M, d, dtype, device, poison):
    _check_attention(*_inputs(((2, 2, N, d), (M, d)), dtype, device), poison=poison)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw,window,d", [((9, 11), 7, 24), ((5, 6), 4, 32), ((3, 2), 7, 32)])
def test_window_attention(hw, window, d, dtype, device, poison):
    N = hw[0] * hw[1]
    _check_attention(*_inputs(((2, 2, N, d), (N, d)), dtype, device), window=window, hw=hw, poison=poison)


@pytest.mark.parametrize("d", [16, 40, 72, 96, 128])
def test_head_dims(d, device):
    _check_attention(*_inputs(((1, 2, 20, d), (30, d)), torch.float16, device))


def test_large_window(device):
    # w = 12: a 144-token window in one 256-wide tile, with padding on both axes
    _check_attention(*_inputs(((1, 2, 13 * 5, 16), (13 * 5, 16)), torch.float32, device), window=12, hw=(13, 5))


def test_value_dim_differs_and_contiguous_q(device):
    _check_attention(*_inputs(((1, 3, 40, 16), (20, 48)), torch.float32, device, transposed_q=False))
    _check_attention(*_inputs(((1, 2, 30, 40), (30, 72)), torch.float16, device), window=5, hw=(5, 6))


def test_no_importance_skips_it(device):
    q, k, v = _inputs(((1, 2, 20, 32), (300, 32)), torch.float32, device)
    with sgattn.use_backend("triton"):
        out = sgattn.ops.attention(q, k, v)
        _, lse, part = torch.ops.sgattn.triton_attention_fwd(q, k, v, 0.2, 0, 0, 0, False)
    assert part.numel() == 0 and lse.shape == (1, 2, 20)
    assert_close_to_reference(out, reference.attention(q, k, v)[0],
                              reference.attention(q.double(), k.double(), v.double())[0])


def test_deterministic(device):
    q, k, v = _inputs(((2, 2, 50, 32), (300, 32)), torch.float32, device)
    with sgattn.use_backend("triton"):
        a = sgattn.attention_with_importance(q, k, v)
        b = sgattn.attention_with_importance(q, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hw,sr", [((9, 10), 2), ((14, 14), 4)])
def test_hybrid_scale_attention(hw, sr, dtype, device, poison):
    B, h, d = 2, 2, 32
    H, W = hw
    reduced_hw = (H // sr, W // sr)
    N, M = H * W, reduced_hw[0] * reduced_hw[1]
    g = _inputs(((B, h, N, d), (M, d)), dtype, device)
    loc = _inputs(((B, h, N, d), (N, d)), dtype, device)
    kw = dict(hw=hw, reduced_hw=reduced_hw, window=7)
    with sgattn.use_backend("triton"):
        out, imp = sgattn.hybrid_scale_attention(*g, *loc, **kw)
    poison()
    ref_out, ref_imp = reference.hybrid_scale_attention(*g, *loc, **kw)
    out64, imp64 = reference.hybrid_scale_attention(*(t.double() for t in g + loc), **kw)
    assert imp.shape == (B, H, W) and imp.dtype == torch.float32
    assert_close_to_reference(out, ref_out, out64, what="out")
    assert_close_to_reference(imp, ref_imp, imp64, what="importance map")


def _random_index(G, B, N, device):
    return torch.stack([torch.stack([torch.randperm(N, device=device) for _ in range(B)]) for _ in range(G)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,groups,G", [
    (97, (7, 3, 2), 2),   # short last groups in every part
    (50, (2, 1), 1),      # sr=2 plan, one ordering given as [B, N]
    (60, (49, 14, 7), 2),  # sr=4 group sizes larger than a part
    (5, (2, 1), 2),
])
def test_aggregate_sorted(N, groups, G, dtype, device, poison):
    B, C = 2, 24
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    index = _random_index(G, B, N, device)
    if G == 1:
        index = index[0]
    ws = [torch.randn(r, device=device, dtype=dtype) / math.sqrt(r) for r in groups]
    bs = [torch.randn(1, device=device, dtype=dtype) for _ in groups]

    def run(fn, cast=None):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in [x, *ws, *bs]]
        out = fn(leaves[0], index, leaves[1:1 + len(ws)], leaves[1 + len(ws):])
        return out, leaves

    triton_backend = get_backend("triton")
    out, leaves = run(triton_backend.aggregate_sorted)
    dout = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    out.backward(dout)  # still poisoned: the backward's buffers are checked too
    poison()
    ref, ref_leaves = run(reference.aggregate_sorted)
    ref64, leaves64 = run(reference.aggregate_sorted, torch.float64)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close_to_reference(out, ref, ref64, what="aggregate")
    ref.backward(dout)
    ref64.backward(dout.double())
    names = ["x"] + [f"w{p}" for p in range(len(ws))] + [f"b{p}" for p in range(len(bs))]
    for name, a, r, r64 in zip(names, leaves, ref_leaves, leaves64):
        assert a.grad.shape == a.shape and a.grad.dtype == a.dtype
        assert_close_to_reference(a.grad, r.grad, r64.grad, what=f"d{name}")


def test_reallocate_tokens_public_op(device):
    x = torch.randn(1, 49, 32, device=device)
    imp = torch.rand(1, 49, device=device)
    ws = [torch.randn(r, device=device) for r in (7, 3, 2)]
    bs = [torch.randn(1, device=device) for _ in range(3)]
    with sgattn.use_backend("triton"):
        out = sgattn.reallocate_tokens(x, imp, ws, bs)
    ref = reference.reallocate_tokens(x, imp, ws, bs)
    ref64 = reference.reallocate_tokens(x.double(), imp, [w.double() for w in ws], [b.double() for b in bs])
    assert_close_to_reference(out, ref, ref64)


# ---------------------------------------------------------------- bad inputs
def test_unsupported_inputs_name_the_reason(device):
    q = torch.randn(1, 2, 8, 32, device=device, dtype=torch.float64)
    with sgattn.use_backend("triton"), pytest.raises(BackendError, match="float64"):
        sgattn.attention_with_importance(q, q, q)
    q = torch.randn(1, 2, 8, 8, device=device)
    with sgattn.use_backend("triton"), pytest.raises(BackendError, match="head dim 8"):
        sgattn.attention_with_importance(q, q, q)
    q = torch.randn(1, 2, 17 * 17, 32, device=device)
    with sgattn.use_backend("triton"), pytest.raises(BackendError, match="window 17"):
        sgattn.attention_with_importance(q, q, q, window=17, hw=(17, 17))
    q = torch.randn(1, 2, 8, 32, device=device)
    with sgattn.use_backend("triton"), pytest.raises(BackendError, match="dropout is not implemented"):
        sgattn.attention_with_importance(q, q, q, dropout_p=0.1)
    other = "cuda" if device == "cpu" else "cpu"
    if other == "cpu" or torch.cuda.is_available():
        t = torch.randn(1, 2, 8, 32, device=other)
        assert "tensor on" in get_backend("triton").unsupported("attention", (t,))


def test_dropout_falls_back_to_reference(device):
    q = torch.randn(1, 2, 16, 32, device=device)
    torch.manual_seed(1)
    out, imp = sgattn.attention_with_importance(q, q, q, dropout_p=0.5)  # automatic dispatch
    torch.manual_seed(1)
    ref, ref_imp = reference.attention(q, q, q, dropout_p=0.5)
    assert torch.equal(out, ref) and torch.equal(imp, ref_imp)
