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
        assert "tensor on" in get_backend("triton").unsupported("attention", (t, t, t))


def test_dropout_falls_back_to_reference(device):
    q = torch.randn(1, 2, 16, 32, device=device)
    torch.manual_seed(1)
    out, imp = sgattn.attention_with_importance(q, q, q, dropout_p=0.5)  # automatic dispatch
    torch.manual_seed(1)
    ref, ref_imp = reference.attention(q, q, q, dropout_p=0.5)
    assert torch.equal(out, ref) and torch.equal(imp, ref_imp)


# ------------------------------------------------------- hardening (issue 8)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("case", ["large_ds", "saturated"])
def test_backward_large_gradients_saturated_softmax(case, dtype, window, device, poison):
    """large_ds: nearly equal keys, |dO.v| ~ 1e6: ds = P (dP - delta) ~ 1e5 is
    beyond fp16's 65504 while dq, dk, dv are small (sum_j ds_ij = 0). saturated:
    logits of std ~10. ds stays in fp32 range and precision (split hi/lo dots)."""
    B, h, N, d = 1, 2, 36, 32
    hw = (6, 6) if window else None
    g = torch.Generator(device="cpu").manual_seed(3)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device)  # noqa: E731
    if case == "large_ds":
        q = r(B, h, N, d, s=1e-2)
        k = r(1, 1, 1, d) + r(B, h, N, d, s=1e-3)
        v = r(B, h, N, d, s=1e4)
        dout = r(B, h, N, d, s=100.0)
    else:
        q, k, v, dout = r(B, h, N, d, s=10.0), r(B, h, N, d), r(B, h, N, d), r(B, h, N, d)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with sgattn.use_backend("triton"):
        out, _ = sgattn.attention_with_importance(*leaves, window=window, hw=hw)
    out.backward(dout)
    poison()
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.attention(*ref_leaves, window=window, hw=hw)
    ref_out.backward(dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, _ = reference.attention(*leaves64, window=window, hw=hw)
    out64.backward(dout.double())
    for name, a, r, r64 in zip("qkv", leaves, ref_leaves, leaves64):
        assert torch.isfinite(a.grad).all(), f"d{name} not finite"
        assert_close_to_reference(a.grad, r.grad, r64.grad, what=f"d{name}")


@pytest.mark.parametrize("B,h", [(0, 2), (2, 0)])
@pytest.mark.parametrize("window", [0, 3])
def test_empty_batch_or_heads(B, h, window, device):
    q = torch.randn(B, h, 12, 16, device=device, requires_grad=True)
    # importance over no heads is refused (tests/test_backends.py), as on the native backends
    out, lse, part = torch.ops.sgattn.triton_attention_fwd(q, q, q, 0.25, window, 3, 4, h > 0)
    assert out.shape == (B, h, 12, 16) and lse.shape == (B, h, 12) and part.shape[0] == B
    out.sum().backward()
    assert q.grad.shape == q.shape
    if h == 0:
        return  # the public layer rejects zero heads (sgattn.ops)
    with sgattn.use_backend("triton"):
        o, imp = sgattn.attention_with_importance(q, q, q)
    ref_o, ref_imp = reference.attention(q, q, q)
    assert o.shape == ref_o.shape and imp.shape == ref_imp.shape
    assert torch.equal(imp.isnan(), ref_imp.isnan())  # no heads: a mean over nothing


def test_fp32_precision_follows_torch_setting(device):
    from sgattn.triton import launch as A, plans as P
    q, k, v = _inputs(((1, 2, 20, 32), (30, 32)), torch.float32, device)
    out = A.new_out(q, 32)
    lse = torch.empty(1, 2, 20)
    old = torch.get_float32_matmul_precision()
    try:
        precs = {}
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            launches = A.forward_launches(q, k, v, out, lse, lse, 0.1, 0, None, False)
            precs[setting] = launches[0][3]["PREC"]
        torch.set_float32_matmul_precision("highest")
        half = A.forward_launches(q.half(), k.half(), v.half(), out.half(), lse, lse, 0.1, 0, None, False)
    finally:
        torch.set_float32_matmul_precision(old)
    assert precs == {"highest": "ieee", "high": "tf32", "medium": "tf32"}
    assert P.PLANS[("ieee", 32)].block_m <= P.PLANS[("tf32", 32)].block_m  # fp32 FMA tiles are smaller
    assert half[0][3]["BLOCK_M"] == P.PLANS[("fp16", 32)].block_m


def test_tf32_mode_runs(device):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _check_attention(*_inputs(((1, 2, 20, 32), (40, 32)), torch.float32, device), grads=False)
    finally:
        torch.set_float32_matmul_precision(old)


def test_op_argument_errors(device):
    ops = torch.ops.sgattn
    q = torch.randn(1, 2, 12, 16, device=device)
    k20 = torch.randn(1, 2, 20, 16, device=device)
    cases = [
        ((q, q, q, 0.25, -1, 3, 4, True), "window must be >= 0"),
        ((q, q, q, 0.25, 17, 3, 4, True), "window 17 is larger than 16"),
        ((q, k20, k20, 0.25, 3, 3, 4, True), "window mode needs as many keys as queries"),
        ((q, q, q, 0.25, 3, 3, 5, True), r"H\*W = 3\*5 = 15 does not match N = 12"),
        ((q, q, q, 0.25, 3, 2 ** 16, 2 ** 16, True), "overflows int32"),
        ((q, q, q, 0.25, 3, 0, 4, True), "needs a grid H, W >= 1"),
        ((q, q.double(), q, 0.25, 0, 0, 0, True), "dtype mismatch"),
        ((q.double(), q.double(), q.double(), 0.25, 0, 0, 0, True), "float16, bfloat16 or float32"),
        ((q, q[:, :1], q[:, :1], 0.25, 0, 0, 0, True), r"k must be \[B, h, M, d\]"),
        ((q[..., :8], q[..., :8], q[..., :8], 0.25, 0, 0, 0, True), "head dim d = 8 is outside 16..128"),
        ((q, q[:, :, :0], q[:, :, :0], 0.25, 0, 0, 0, True), "at least one query and one key"),
        ((q, q, q, float("inf"), 0, 0, 0, True), "scale must be finite"),
        ((q[0], q, q, 0.25, 0, 0, 0, True), "q must have 4 dimensions"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.triton_attention_fwd(*args)
    out, lse, _ = ops.triton_attention_fwd(q, q, q, 0.25, 0, 0, 0, False)
    with pytest.raises(ValueError, match="lse must"):
        ops.triton_attention_bwd(out, q, q, q, out, lse[0], 0.25, 0, 0, 0)
    with pytest.raises(ValueError, match=r"dout must be \[B, h, N, dv\]"):
        ops.triton_attention_bwd(out[:, :, :5], q, q, q, out, lse, 0.25, 0, 0, 0)
    if device == "cpu":
        with pytest.raises(ValueError, match="device mismatch|is on meta"):
            ops.triton_attention_fwd(q, torch.empty(1, 2, 12, 16, device="meta"), q, 0.25, 0, 0, 0, True)
    # importance
    part = torch.rand(2, 4, 12, device=device)
    with pytest.raises(ValueError, match=r"H\*W = 3\*3 = 9 does not match the 12 tokens"):
        ops.triton_importance(part, 0.5, part[:, :, :4], 0.5, 3, 3, 2, 2)
    with pytest.raises(ValueError, match="part must be float32"):
        ops.triton_importance(part.half(), 0.5, None, 0.0, 0, 0, 0, 0)


def test_aggregate_op_argument_errors(device):
    ops = torch.ops.sgattn
    x = torch.randn(2, 12, 8, device=device)
    index = _random_index(2, 2, 12, device)
    w, b = torch.randn(5, device=device), torch.randn(2, device=device)
    cases = [
        ((x, index, w, b, [3]), "group_sizes must be 2 or 3 positive ints"),
        ((x, index, w, b, [3, 0]), "group_sizes must be 2 or 3 positive ints"),
        ((x, index, w[:4], b, [3, 2]), r"w_cat must hold sum\(group_sizes\) = 5"),
        ((x, index, w, b[:1], [3, 2]), "b_cat must hold one bias per part"),
        ((x, index.int(), w, b, [3, 2]), "index must be int64"),
        ((x, index[:, :1], w, b, [3, 2]), r"x must be \[B, N, C\] = \[1, 12, C\]"),
        ((x, torch.cat([index, index[:1]]), w, b, [3, 2]), "G = 1 or 2 orderings"),
        ((x.half(), index, w, b, [3, 2]), "dtype mismatch"),
        ((x, index + 1, w, b, [3, 2]), "permutation of 0..N-1"),
        ((x, torch.zeros_like(index), w, b, [3, 2]), "permutation of 0..N-1"),
    ]
    if device == "cpu":
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                ops.triton_aggregate_fwd(*args)
    dout = torch.randn(2, 2, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"dout must be \[G, B, M, C\]"):
        ops.triton_aggregate_bwd(dout[:, :, :4], x, index, w, [3, 2])


def test_out_of_range_index_stays_in_bounds(device):
    """The kernels mask gathers through a bad index (the permutation check is
    only made on CPU): bypass the op and call the launchers directly."""
    from sgattn.triton import launch
    x = torch.randn(1, 12, 8, device=device)
    bad = torch.tensor([[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10 ** 9]]], device=device)
    w, b = torch.ones(5, device=device), torch.zeros(2, device=device)
    out = launch.aggregate_forward(x, bad, w, b, [3, 2])
    good = bad.clone()
    good[0, 0, -1] = 11
    ref = launch.aggregate_forward(x, good, w, b, [3, 2])
    assert torch.equal(out[..., :-1, :], ref[..., :-1, :])  # the last group lost only its bad member
    assert torch.allclose(out[0, 0, -1], ref[0, 0, -1] - x[0, 11])


def test_unsupported_states_grid_limit(device):
    backend = get_backend("triton")
    q = torch.empty(1, 1, 1, 32, device=device).expand(2 ** 16, 2 ** 10, 4096, 32)
    why = backend.unsupported("attention", (q, q, q))
    assert why is not None and "grid limit 2**31-1" in why
    small = torch.empty(1, 2, 64, 32, device=device)
    assert backend.unsupported("attention", (small, small, small)) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_window_chunked_half(dtype, device, poison):
    # w = 9: 81 positions in a 128 block, sub-blocks and key chunks (modes 0, 2, 3) with split ds
    _check_attention(*_inputs(((1, 2, 10 * 9, 16), (10 * 9, 16)), dtype, device), window=9, hw=(10, 9),
                     poison=poison)
