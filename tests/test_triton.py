"""Triton backend: what the agreement table (tests/test_backend_agreement.py:
every shape, dtype and layout against float64, outputs poisoned with NaN) does
not check: plans and fp32 precision modes, determinism, empty batches, argument
errors, out-of-range indices, grid limits, dropout fallback.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest) or on a GPU.
"""
import pytest
import torch

import sgattn
from sgattn import reference
from sgattn.backends import BackendError, get_backend
from sgattn.testing import CASES, compare

pytestmark = pytest.mark.skipif(get_backend("triton").unavailable() is not None,
                                reason=f"triton backend unavailable: {get_backend('triton').unavailable()}")

def _inputs(shapes, dtype, device):
    """Fresh random tensors; q as a transposed view of [B, N, h, d] like the modules pass."""
    (B, h, N, d), (M, dv) = shapes
    q = torch.randn(B, N, h, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, h, M, d, device=device, dtype=dtype)
    v = torch.randn(B, h, M, dv, device=device, dtype=dtype)
    return q, k, v


def test_no_importance_skips_it(device):
    q, k, v = _inputs(((1, 2, 20, 32), (300, 32)), torch.float32, device)
    with sgattn.use_backend("triton"):
        out = sgattn.ops.attention(q, k, v)
        _, lse, part = torch.ops.sgattn.triton_attention_fwd(q, k, v, 0.2, 0, 0, 0, False)
    assert part.numel() == 0 and lse.shape == (1, 2, 20) and out.shape == (1, 2, 20, 32)


def test_deterministic(device):
    q, k, v = _inputs(((2, 2, 50, 32), (300, 32)), torch.float32, device)
    with sgattn.use_backend("triton"):
        a = sgattn.attention_with_importance(q, k, v)
        b = sgattn.attention_with_importance(q, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _random_index(G, B, N, device):
    return torch.stack([torch.stack([torch.randperm(N, device=device) for _ in range(B)]) for _ in range(G)])


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
    # a row of the agreement table, its fp32 plan under the tf32 setting (exact fp32 under the interpreter)
    case = next(c for c in CASES if c.name == "g-40x20-d16-dv48")
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        verdicts = compare(case, "triton", torch.float32, device)
    finally:
        torch.set_float32_matmul_precision(old)
    assert verdicts and all(v.ok for v in verdicts), [str(v) for v in verdicts if not v.ok]


def test_op_argument_errors(device):
    ops = torch.ops.sgattn
    q = torch.randn(1, 2, 12, 16, device=device)
    k20 = torch.randn(1, 2, 20, 16, device=device)
    cases = [
        ((q, q, q, 0.25, -1, 3, 4, True), "window must be >= 0"),
        ((q, q, q, 0.25, 17, 3, 4, True), "window 17 is larger than 16"),
        ((q, k20, k20, 0.25, 3, 3, 4, True), "window mode needs as many keys as queries"),
        ((q, q, q, 0.25, 3, 3, 5, True), r"H\*W = 3\*5 = 15 does not match N = 12"),
        ((q, q, q, 0.25, 3, 2 ** 16, 2 ** 16, True), r"H\*W = 65536\*65536 = 4294967296 does not match N = 12"),
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
        ((x, index + 1, w, b, [3, 2]), r"index values must lie in \[0, N\) = \[0, 12\)"),
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
