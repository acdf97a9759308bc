"""Backend "cpu" (csrc/cpu_ops.cpp): what the agreement table
(tests/test_backend_agreement.py: every shape, dtype and layout against
float64) does not check: thread-count independence, gradcheck, index errors,
the torch.library registration, dispatch reasons, torch.compile tracing.
Skipped when the extension is not built, unless SGATTN_REQUIRE_NATIVE=1 (CI),
where a missing extension fails.
"""
import os

import pytest
import torch

import sgattn
from sgattn import _native
from sgattn.backends import get_backend, select, use_backend

_WHY = sgattn.available_backends()["cpu"]
if _WHY is not None and os.environ.get("SGATTN_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"SGATTN_REQUIRE_NATIVE=1 but the cpu backend is unavailable: {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")

CPU = None if _WHY else get_backend("cpu")


def rand(*shape, dtype=torch.float64, spread=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * spread).to(dtype)


def strided_qkv(B, h, N, M, d, dv, dtype, spread=1.0):
    """q as a non-contiguous head view of a [B, N, h*d] projection (as the modules make it);
    k, v as halves of one [B, M, h*(d+dv)] tensor."""
    q = rand(B, N, h * d, dtype=dtype, spread=spread).reshape(B, N, h, d).transpose(1, 2)
    kv = rand(B, M, h * (d + dv), dtype=dtype, spread=spread)
    k = kv[..., :h * d].reshape(B, M, h, d).transpose(1, 2)
    v = kv[..., h * d:].reshape(B, M, h, dv).transpose(1, 2)
    return q, k, v


def test_attention_is_deterministic_and_independent_of_threads():
    q, k, v = strided_qkv(2, 4, 333, 60, 32, 32, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(CPU.attention(q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    # Importance partials are reduced in a fixed order whatever the thread count.
    assert torch.equal(results[0][1], results[1][1])


def test_aggregate_gradcheck_float64():
    x = rand(2, 11, 5).requires_grad_()
    w = [rand(r).requires_grad_() for r in (2, 1)]
    b = [rand(1).requires_grad_() for _ in range(2)]
    idx = torch.stack([torch.stack([torch.randperm(11) for _ in range(2)]) for _ in range(2)])
    fn = lambda x, w0, w1, b0, b1: CPU.aggregate_sorted(x, idx, [w0, w1], [b0, b1])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *w, *b))


def test_bad_index_raises_instead_of_crashing():
    x = rand(1, 8, 4, dtype=torch.float32)
    w, b = [torch.ones(2), torch.ones(1)], [torch.zeros(1), torch.zeros(1)]
    for bad in (8, -1):
        idx = torch.arange(8).reshape(1, 8)
        idx[0, 3] = bad
        with pytest.raises(ValueError, match=rf"index values must lie in \[0, N\) = \[0, 8\), got index\[0, 0, 3\] = {bad}"):
            CPU.aggregate_sorted(x, idx, w, b)
    # Repeated rows (in range, but not an argsort) are refused too: the backward
    # relies on one sorted position per token.
    idx = torch.arange(8).reshape(1, 8)
    idx[0, 5] = 2
    with pytest.raises(ValueError, match=r"index\[0, 0\] is not a permutation of 0..N-1 \(value 2 repeats at position 5\)"):
        CPU.aggregate_sorted(x, idx, w, b)
    with pytest.raises(ValueError, match="index must be int64, got Int"):
        CPU.aggregate_sorted(x, torch.arange(8, dtype=torch.int32).reshape(1, 8), w, b)


def test_ops_pass_torch_library_opcheck():
    # Schema, fake (meta) kernel and autograd registration consistency.
    q, k, v = (rand(1, 2, 9, 8, dtype=torch.float32).requires_grad_() for _ in range(3))
    torch.library.opcheck(_native.op("attention_fwd"), (q, k, v, 0.3, 0, 0, 0, True))
    qw, kw, vw = (rand(1, 2, 12, 8, dtype=torch.float32).requires_grad_() for _ in range(3))
    torch.library.opcheck(_native.op("attention_fwd"), (qw, kw, vw, 0.3, 3, 3, 4, True))
    dout = rand(1, 2, 12, 8, dtype=torch.float32)
    plain = [t.detach() for t in (qw, kw, vw, q, k, v)]  # attention_bwd has no double backward
    stats_w = _native.op("attention_fwd")(*plain[:3], 0.3, 3, 3, 4, False)[:2]
    stats = _native.op("attention_fwd")(*plain[3:], 0.3, 0, 0, 0, False)[:2]
    torch.library.opcheck(_native.op("attention_bwd"), (dout, *plain[:3], *stats_w, 0.3, 3, 3, 4))
    torch.library.opcheck(_native.op("attention_bwd"), (dout[:, :, :9], *plain[3:], *stats, 0.3, 0, 0, 0))
    with pytest.raises(RuntimeError, match="double backward"):
        out, _ = CPU.attention(q, k, v)
        (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        gq.sum().backward()
    x = rand(2, 13, 6, dtype=torch.float32).requires_grad_()
    idx = torch.stack([torch.randperm(13).repeat(2, 1) for _ in range(2)])
    w = rand(3, dtype=torch.float32).requires_grad_()
    b = rand(2, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(_native.op("aggregate_fwd"), (x, idx, w, b, [2, 1]))


def test_dispatch_reasons_and_fallbacks():
    t = torch.zeros(1, 2, 4, 8)
    assert CPU.unsupported("attention", (t, t, t), dropout_p=0.1) == "probability dropout is not implemented"
    assert "float64" in CPU.unsupported("attention", (t.double(),) * 3)
    assert CPU.unsupported("reallocate_tokens", (torch.zeros(1, 4, 2, dtype=torch.float64),)) is None
    assert CPU.unsupported("attention", (t, t, t)) is None
    with use_backend(None):
        # Dropout falls through cpu to a backend that implements it.
        assert select("attention", (t, t, t), dropout_p=0.5).name == "reference"
    with use_backend("cpu"):
        with pytest.raises(sgattn.BackendError, match="dropout"):
            sgattn.attention_with_importance(t, t, t, dropout_p=0.5)


def test_ops_trace_under_torch_compile_fullgraph():
    # aot_eager traces forward and backward through the fake kernels and the
    # registered autograd without generating code (cheap enough for CI).
    def f(q, k, v, x, idx, w0, w1, b0, b1):
        out, imp = CPU.attention(q, k, v)
        out_w, imp_w = CPU.attention(q, q, q, window=3, hw=(3, 4))
        agg = CPU.aggregate_sorted(x, idx, [w0, w1], [b0, b1])
        return out.sum() + out_w.sum() + imp.sum() + imp_w.sum() + agg.sum()

    args = [rand(1, 2, 12, 8, dtype=torch.float32).requires_grad_() for _ in range(3)]
    x = rand(2, 12, 4, dtype=torch.float32).requires_grad_()
    idx = torch.stack([torch.randperm(12).repeat(2, 1) for _ in range(2)])
    ws = [rand(2, dtype=torch.float32).requires_grad_(), rand(1, dtype=torch.float32).requires_grad_(),
          rand(1, dtype=torch.float32).requires_grad_(), rand(1, dtype=torch.float32).requires_grad_()]
    inputs = [*args, x, idx, *ws]
    eager = f(*inputs)
    grads = torch.autograd.grad(eager, [*args, x, *ws])
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    cgrads = torch.autograd.grad(compiled, [*args, x, *ws])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)
