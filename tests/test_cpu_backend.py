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
from sgattn import _native, reference
from sgattn.backends import get_backend, select, use_backend
from tolerance import assert_close_to_reference

_WHY = sgattn.available_backends()["cpu"]
if _WHY is not None and os.environ.get("SGATTN_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"SGATTN_REQUIRE_NATIVE=1 but the cpu backend is unavailable: {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")

CPU = None if _WHY else get_backend("cpu")
LOW = (torch.float32, torch.bfloat16, torch.float16)


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


# ----------------------------------------------------------- attention mass

def mass_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0, padded=False):
    """q, k, v and (padded) a key padding mask with batch entry 0 padded entirely."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
               for H, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    mask = None
    if padded:
        mask = torch.rand(B, Lk, generator=g) < 0.3
        mask[0] = True
    return q, k, v, mask


MASS_GRAD_CASES = [  # (B, Hq, Hkv, Lq, Lk, causal, padded): odd lengths, Lq > Lk (queries with no key), GQA, MQA
    (2, 4, 2, 17, 16, True, False), (2, 4, 2, 16, 65, True, True), (1, 6, 1, 33, 7, True, False),
    (2, 2, 2, 130, 300, False, True), (1, 8, 2, 70, 70, True, True), (1, 4, 4, 300, 129, True, False),
]


@pytest.mark.parametrize("case", MASS_GRAD_CASES)
@pytest.mark.parametrize("dtype", LOW)
def test_attention_with_mass_gradients_match_the_float64_oracle(case, dtype):
    """dq, dk, dv of the fused backward (causal, grouped-query heads summed over
    the group, key padding) against the oracle's in float64."""
    B, Hq, Hkv, Lq, Lk, causal, padded = case
    q64, k64, v64, mask = mass_inputs(B, Hq, Hkv, Lq, Lk, 16, torch.float64, seed=Lq + Lk, padded=padded)
    dout = torch.randn(B, Hq, Lq, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(backend, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with use_backend(backend):
            out, _ = sgattn.attention_with_mass(q, k, v, causal=causal, key_padding_mask=mask)
        return torch.autograd.grad(out, (q, k, v), dout.to(q.dtype))

    want64 = grads("reference", q64, k64, v64)
    low = [t.to(dtype) for t in (q64, k64, v64)]
    got, want = grads("cpu", *low), grads("reference", *low)
    for name, g, w, w64 in zip("qkv", got, want, want64):
        assert g.dtype == dtype
        assert_close_to_reference(g, w, w64, what=f"d{name} {case} {dtype}")


def test_attention_with_mass_is_bitwise_independent_of_the_thread_count():
    q, k, v, mask = mass_inputs(2, 8, 2, 200, 333, 32, torch.float32, padded=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for dtype in (torch.float32, torch.bfloat16):
                qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
                with use_backend("cpu"):
                    out, mass, lse = sgattn.attention_with_mass(qq, kk, vv, causal=True, key_padding_mask=mask,
                                                                mass_queries=64, return_lse=True)
                    from_lse = sgattn.attention_mass(qq, kk, lse, causal=True, key_padding_mask=mask,
                                                     mass_reduce="causal_mean", mass_heads="group_sum")
                results.append((out, mass, lse, from_lse, *torch.autograd.grad(out.float().sum(), (qq, kk, vv))))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[:2], results[2:]):
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_a_decode_step_reads_the_cache_in_place():
    """One query against a long fp32 cache: the kernel reads K and V where they are, so its memory
    beyond the inputs is the outputs and a few MiB of score tiles (it used to zero-fill a cache-sized
    copy of K and of V, and a 64-row score tile, per thread on every call: ~190 MiB here)."""
    from sgattn._report import peak_memory
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 64, generator=g)
    k, v = (torch.randn(1, 2, 1 << 17, 64, generator=g) for _ in range(2))  # 32 MiB each
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with use_backend("cpu"):
            call = lambda: sgattn.attention_with_mass(q, k, v, causal=True)  # noqa: E731
            call()
            peak = peak_memory(call, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    if peak is None:
        pytest.skip("no resident-set high-water mark here (/proc/self/clear_refs)")
    # mass [1, 8, 2**17] fp32 (4 MiB), its fp64 per-head partials (8 MiB), 2 threads x 2 MiB of scores
    assert peak < 48 << 20, f"{peak / 2 ** 20:.0f} MiB"


def test_mass_ops_pass_torch_library_opcheck():
    q, k, v, mask = mass_inputs(2, 4, 2, 19, 23, 8, torch.float32, padded=True)
    weight = torch.arange(19, dtype=torch.float32) % 3
    for causal, m, w in ((True, mask, weight), (False, None, None)):
        torch.library.opcheck(_native.op("mass_attention_fwd"), (q, k, v, 0.3, causal, m, w))
        out, lse, _ = _native.op("mass_attention_fwd")(q, k, v, 0.3, causal, m, w)
        torch.library.opcheck(_native.op("mass_attention_bwd"), (torch.randn_like(out), q, k, v, out, lse, 0.3,
                                                                 causal, m))
        torch.library.opcheck(_native.op("mass_from_lse"), (q, k, lse, 0.3, causal, m, w))


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v, m: _native.op("mass_attention_fwd")(q, *(torch.cat([t, t[:, :1]], 1) for t in (k, v)), 1.0,
                                                      False, None, None),
     "mass_attention_fwd: the query heads must be a multiple of the key/value heads"),
    (lambda q, k, v, m: _native.op("mass_attention_fwd")(q, k, v, 1.0, True, m[:, :5], None),
     r"mass_attention_fwd: key_padding_mask must be bool \[B, M\]"),
    (lambda q, k, v, m: _native.op("mass_attention_fwd")(q, k, v, 1.0, True, None, torch.ones(3)),
     r"mass_attention_fwd: query_weight must be float32 \[N\]"),
    (lambda q, k, v, m: _native.op("mass_from_lse")(q, k, torch.zeros(2, 4, 3), 1.0, True, None, None),
     r"mass_from_lse: lse must be float32 \[B, Hq, N\]"),
    (lambda q, k, v, m: _native.op("mass_attention_fwd")(q, k.double(), v, 1.0, False, None, None),
     "mass_attention_fwd: dtype mismatch"),
])
def test_mass_ops_reject_bad_arguments_with_value_errors(call, match):
    q, k, v, mask = mass_inputs(2, 4, 2, 9, 11, 8, torch.float32, padded=True)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, mask)


def test_mass_ops_trace_under_torch_compile_fullgraph():
    q, k, v, mask = mass_inputs(1, 4, 2, 12, 20, 8, torch.float32, padded=True)

    def f(q, k, v):
        with use_backend("cpu"):
            out, mass, lse = sgattn.attention_with_mass(q, k, v, causal=True, key_padding_mask=mask,
                                                        mass_queries=4, mass_reduce="causal_mean",
                                                        mass_heads="group_mean", return_lse=True)
            again = sgattn.attention_mass(q, k, lse, causal=True, key_padding_mask=mask)
        return out, mass, again

    inputs = [t.requires_grad_() for t in (q, k, v)]
    eager = f(*inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(compiled[0].sum(), inputs), torch.autograd.grad(eager[0].sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_runs_each_sequence_on_the_kernels(causal):
    """attention_with_mass_varlen / attention_mass_varlen against the oracle:
    sequences at tile edges, with no queries, with no keys, Lq > Lk; mass over
    the last n queries of each and over packed indices; gradients flow."""
    g = torch.Generator().manual_seed(3)
    lq, lk = [17, 0, 5, 70, 9], [16, 4, 0, 65, 3]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lq, lk))
    q64, k64, v64 = (torch.randn(sum(n), H, 16, generator=g, dtype=torch.float64)
                     for n, H in ((lq, 4), (lk, 2), (lk, 2)))
    for dtype in LOW:
        for mq, reduce, heads in ((None, "sum", "none"), (2, "causal_mean", "group_sum"),
                                  (torch.tensor([0, 30, 30, 100]), "mean", "mean")):
            opts = dict(causal=causal, mass_queries=mq, mass_reduce=reduce, mass_heads=heads)
            want64 = reference.attention_with_mass_varlen(q64, k64, v64, cu_q, cu_k, **opts)
            low = [t.to(dtype) for t in (q64, k64, v64)]
            want = reference.attention_with_mass_varlen(*low, cu_q, cu_k, **opts)
            q, k, v = (t.clone().requires_grad_() for t in low)
            with use_backend("cpu"):
                got = sgattn.attention_with_mass_varlen(q, k, v, cu_q, cu_k, 70, 65, return_lse=True, **opts)
                from_lse = sgattn.attention_mass_varlen(q, k, want[2], cu_q, cu_k, 70, 65, **opts)
            what = f"{dtype} {opts}"
            for name, a, w, w64 in zip(("out", "mass", "lse"), got, want, want64):
                assert a.shape == w64.shape, (name, what)
                if name == "lse":  # queries without keys: -inf on both sides
                    assert torch.equal(a.isinf(), w64.isinf()), what
                    a, w, w64 = (t.nan_to_num(neginf=0.0) for t in (a, w, w64))
                assert_close_to_reference(a, w, w64, what=f"{name} {what}")
            assert_close_to_reference(from_lse, want[1], want64[1], what=f"from lse {what}")
            got[0].float().sum().backward()
            assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
