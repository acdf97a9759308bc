"""The registered CPU ops (``torch.ops.sgattn.*``, csrc/cpu_ops.cpp) called directly.

- layout contract: every op returns contiguous tensors whatever its inputs'
  strides, and every fake (meta) kernel in sgattn._native says exactly that;
- training through the ops under torch.compile(inductor, fullgraph) at two
  input sizes (dynamic shapes) equals eager;
- bad arguments raise a ValueError naming the problem, never abort the
  process or return garbage (cases that used to abort run in a subprocess, so
  that a regression shows as a failure instead of killing pytest); the table
  of bad arguments shared with the other backends is tests/test_contract.py;
- empty batches and heads give empty results;
- results are bitwise independent of the thread count.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sgattn
from sgattn import _native, reference

_WHY = sgattn.available_backends()["cpu"]
if _WHY is not None and os.environ.get("SGATTN_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"SGATTN_REQUIRE_NATIVE=1 but the cpu backend is unavailable: {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable: {_WHY}")

if _WHY is None:
    _native.op("attention_fwd")  # loads the extension
    OPS = torch.ops.sgattn


def heads_view(B, N, h, d, dtype=torch.float32):
    """[B, h, N, d] as a permuted (non-contiguous) view of a [B, N, h*d] tensor."""
    return torch.randn(B, N, h * d, dtype=dtype).reshape(B, N, h, d).transpose(1, 2)


def fwd_stats(q, k, v, scale, window, H, W, permuted=False):
    """The forward's (out, lse) that attention_bwd takes; out as a permuted
    (non-contiguous) copy when asked."""
    out, lse, _ = OPS.attention_fwd(q, k, v, scale, window, H, W, False)
    return (out.transpose(1, 2).contiguous().transpose(1, 2) if permuted else out), lse


def attention_bwd(dout, q, k, v, scale, window, H, W):
    """OPS.attention_bwd with the statistics of the forward on the same inputs."""
    return OPS.attention_bwd(dout, q, k, v, *fwd_stats(q, k, v, scale, window, H, W), scale, window, H, W)


def perm_index(G, B, N):
    return torch.argsort(torch.rand(G, B, N), dim=-1)


def agg_inputs(B=2, N=13, C=6, G=2, groups=(2, 1), dtype=torch.float32):
    x = torch.randn(B, C, N, dtype=dtype).transpose(1, 2)  # non-contiguous [B, N, C]
    return x, perm_index(G, B, N), torch.randn(sum(groups), dtype=dtype), torch.randn(len(groups), dtype=dtype)


def split_params(w, b, groups):
    ws = list(torch.split(w, list(groups)))
    return [t.reshape(1, -1) for t in ws], [t.reshape(1) for t in b]


# ------------------------------------------------------------ layout contract

def _op_cases():
    q, k, v = heads_view(2, 12, 2, 8), heads_view(2, 7, 2, 8), heads_view(2, 7, 2, 8)
    qw, kw, vw = heads_view(1, 12, 2, 8), heads_view(1, 12, 2, 8), heads_view(1, 12, 2, 4)
    dout, doutw = heads_view(2, 12, 2, 8), heads_view(1, 12, 2, 4)
    x, idx, w, b = agg_inputs()
    grad = torch.randn(2, 2, 6, 10).transpose(2, 3)  # [G, B, M=10, C=6], non-contiguous
    return {
        "attention_fwd-global": ("attention_fwd", (q, k, v, 0.3, 0, 0, 0, True)),
        "attention_fwd-noimp": ("attention_fwd", (q, k, v, 0.3, 0, 0, 0, False)),
        "attention_fwd-window": ("attention_fwd", (qw, kw, vw, 0.3, 3, 3, 4, True)),
        "attention_bwd-global": ("attention_bwd", (dout, q, k, v, *fwd_stats(q, k, v, 0.3, 0, 0, 0, True),
                                                   0.3, 0, 0, 0)),
        "attention_bwd-window": ("attention_bwd", (doutw, qw, kw, vw, *fwd_stats(qw, kw, vw, 0.3, 3, 3, 4, True),
                                                   0.3, 3, 3, 4)),
        "aggregate_fwd": ("aggregate_fwd", (x, idx, w, b, [2, 1])),
        "aggregate_bwd": ("aggregate_bwd", (grad, x, idx, w, [2, 1])),
    }


@pytest.mark.parametrize("case", ["attention_fwd-global", "attention_fwd-noimp", "attention_fwd-window",
                                  "attention_bwd-global", "attention_bwd-window", "aggregate_fwd",
                                  "aggregate_bwd"])
def test_fake_kernels_match_real_layout(case):
    name, args = _op_cases()[case]
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
    op = getattr(OPS, name).default
    real = op(*args)
    real = real if isinstance(real, tuple) else (real,)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(fake) == len(real)
    for i, (f, r) in enumerate(zip(fake, real)):
        assert r.is_contiguous(), f"{case} output {i} is not contiguous: strides {r.stride()}"
        assert (tuple(f.shape), f.stride(), f.dtype) == (tuple(r.shape), r.stride(), r.dtype), \
            f"{case} output {i}: fake {tuple(f.shape)} {f.stride()} {f.dtype} != real " \
            f"{tuple(r.shape)} {r.stride()} {r.dtype}"
    # opcheck: schema, fake kernel, autograd registration, aot dispatch (dynamic).
    torch.library.opcheck(op, args)


def test_forward_lse_is_the_float64_logsumexp_with_permuted_inputs():
    # the statistics attention_bwd takes (the outputs and gradients are rows of
    # tests/test_backend_agreement.py's table)
    q, k, v = _op_cases()["attention_fwd-global"][1][:3]
    _, lse, _ = OPS.attention_fwd(q, k, v, 0.3, 0, 0, 0, True)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_compiled_training_through_the_ops_matches_eager_at_two_sizes():
    # inductor, fullgraph, a second input size (automatic dynamic shapes): the
    # fake kernels must give the real layouts, the backward ops' included. The
    # inputs are permuted head views; no other graph op (cheap code generation).
    def f(q, k, v, qw, kw, vw, x, idx, w, b, H, W):
        out, _, imp = OPS.attention_fwd(q, k, v, 0.3, 0, 0, 0, True)
        out_w, _, imp_w = OPS.attention_fwd(qw, kw, vw, 0.3, 3, H, W, True)
        agg = OPS.aggregate_fwd(x, idx, w, b, [2, 1])
        return out, out_w, agg, imp, imp_w

    def hv(*shape):
        return heads_view(*shape).requires_grad_()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    for H, W in ((3, 4), (4, 5)):
        N = H * W
        leaves = (hv(2, N, 2, 8), hv(2, 5 + H, 2, 8), hv(2, 5 + H, 2, 8), hv(2, N, 2, 8), hv(2, N, 2, 8),
                  hv(2, N, 2, 4), torch.randn(2, 4, N).transpose(1, 2).requires_grad_(),
                  torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True))
        idx = perm_index(2, 2, N)
        results = []
        with torch._inductor.config.patch(force_disable_caches=True):  # no stale code from a cache
            for fn in (f, compiled):
                outs = fn(*leaves[:7], idx, *leaves[7:], H, W)
                cot = [torch.ones_like(o).mul_(torch.arange(o.numel()).reshape(o.shape) % 7 - 3) for o in outs[:3]]
                results.append((outs, torch.autograd.grad(outs[:3], leaves, cot)))
        (eo, eg), (co, cg) = results
        assert len(co) == len(eo) and len(cg) == len(eg) == len(leaves)
        for i, (a, e) in enumerate(zip((*co, *cg), (*eo, *eg))):
            assert a.shape == e.shape and torch.equal(a, e), f"size {H}x{W}: compiled result {i} differs from eager"


# -------------------------------------------------------------- bad arguments

def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _device_cases():
    # Devices and layouts reached only by redispatching to the CPU kernel; the
    # bad-argument table every backend shares is tests/test_contract.py.
    q = _q(1, 2, 12, 8)
    meta = torch.empty(1, 2, 12, 8, device="meta")
    o, lse = fwd_stats(q, q, q, 0.3, 0, 0, 0)  # the statistics the backward cases hand over
    x, idx, w, b = agg_inputs(B=2, N=13, C=6)
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return [
        ("k on meta", lambda: OPS.attention_fwd.default.redispatch(cpu_key, q, meta, q, 0.3, 0, 0, 0, True),
         r"attention_fwd: k must be a CPU tensor \(this is the cpu kernel\), got a tensor on meta"),
        ("sparse q", lambda: OPS.attention_fwd.default.redispatch(cpu_key, q.to_sparse(), q, q, 0.3, 0, 0, 0, True),
         r"attention_fwd: q must be a dense \(strided\) tensor, got layout Sparse"),
        ("bwd dout on meta", lambda: OPS.attention_bwd.default.redispatch(cpu_key, meta, q, q, q, o, lse, 0.3, 0, 0, 0),
         r"attention_bwd: dout must be a CPU tensor \(this is the cpu kernel\), got a tensor on meta"),
        ("bwd lse on meta", lambda: OPS.attention_bwd.default.redispatch(
            cpu_key, q, q, q, q, o, meta[..., 0], 0.3, 0, 0, 0),
         r"attention_bwd: lse must be a CPU tensor \(this is the cpu kernel\), got a tensor on meta"),
        ("x on meta", lambda: OPS.aggregate_fwd.default.redispatch(
            cpu_key, torch.empty(2, 13, 6, device="meta"), idx, w, b, [2, 1]),
         r"aggregate_fwd: x must be a CPU tensor \(this is the cpu kernel\), got a tensor on meta"),
    ]


def _huge(M, d):
    """An expanded [1, 2, M, d] tensor: M keys, one stored element."""
    return torch.randn(1).expand(1, 2, M, d)


def _max_diff(got, expect):
    return max((a - b).abs().max().item() for a, b in zip(got, expect))


def _risky_cases():
    # Inputs that used to abort the process (std::bad_alloc thrown inside an
    # OpenMP region) or return uninitialised memory. A window at least as large
    # as the grid is one window over the whole grid: exactly global attention,
    # importance included (the cases return the difference, which must be 0).
    q = _q(1, 2, 12, 8)
    glob = lambda: OPS.attention_fwd(q, q, q, 0.3, 0, 0, 0, True)  # noqa: E731
    stats = fwd_stats(q, q, q, 0.3, 0, 0, 0)
    glob_bwd = lambda: OPS.attention_bwd(q, q, q, q, *stats, 0.3, 0, 0, 0)  # noqa: E731
    q1 = _q(1, 2, 12, 1)
    return [
        ("window 10**6", lambda: _max_diff(OPS.attention_fwd(q, q, q, 0.3, 10 ** 6, 3, 4, True), glob()), None),
        ("window 2**32+1", lambda: _max_diff(OPS.attention_fwd(q, q, q, 0.3, 2 ** 32 + 1, 3, 4, True), glob()),
         None),
        ("window 2**63-1", lambda: _max_diff(OPS.attention_fwd(q, q, q, 0.3, 2 ** 63 - 1, 3, 4, True), glob()),
         None),
        ("bwd window 2**63-1",
         lambda: _max_diff(OPS.attention_bwd(q, q, q, q, *stats, 0.3, 2 ** 63 - 1, 3, 4), glob_bwd()),
         None),
        ("huge M", lambda: OPS.attention_fwd(q, _huge(2 ** 40, 8), _huge(2 ** 40, 8), 0.3, 0, 0, 0, False),
         r"attention_fwd: M=1099511627776 keys with d=8, dv=8 need more than 1 GiB of scratch per thread"),
        ("huge M importance", lambda: OPS.attention_fwd(q, _huge(2 ** 26, 8), _huge(2 ** 26, 8), 0.3, 0, 0, 0, True),
         r"attention_fwd: M=67108864 keys with d=8, dv=8 need more than 1 GiB of scratch per thread"),
        # dk, dv are real (64 MiB, never written); the scratch would be ~2 GiB per thread.
        ("huge M bwd", lambda: OPS.attention_bwd(q1, q1, _huge(2 ** 23, 1), _huge(2 ** 23, 1), q1,
                                                 torch.zeros(1, 2, 12), 0.3, 0, 0, 0),
         r"attention_bwd: 8388608 keys per row with d=1, dv=1 need more than 1 GiB of scratch per thread"),
    ]


# name -> (call, expected error regex, or None: the call succeeds and returns 0.0)
CASES = {name: (fn, msg) for name, fn, msg in
         (_device_cases() + _risky_cases() if _WHY is None else [])}

# Every case runs in a subprocess, so that a regression that aborts or crashes
# the process (as several of these inputs used to) shows as the failure of
# that case instead of killing pytest; a crashed run is resumed after the case.
_RUNNER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import test_native_ops as t
    for name in sys.argv[2:]:
        try:
            res = t.CASES[name][0]()
            rep = {"ok": True, "result": res if isinstance(res, float) else None}
        except Exception as exc:
            rep = {"ok": False, "type": type(exc).__name__, "msg": str(exc).splitlines()[0]}
        print(json.dumps({name: rep}), flush=True)
""")


@pytest.fixture(scope="module")
def case_reports():
    reports, todo = {}, list(CASES)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, os.path.dirname(os.path.abspath(__file__)), *todo],
                              capture_output=True, text=True, timeout=600)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                reports.update(json.loads(line))
        todo = [n for n in todo if n not in reports]
        if todo:  # the process died in todo[0]
            reports[todo.pop(0)] = {"died": f"exit code {proc.returncode}; stderr tail: {proc.stderr[-1500:]}"}
    return reports


@pytest.mark.parametrize("name", list(CASES) or ["none"])
def test_bad_arguments_raise_clear_errors(name, case_reports):
    rep, expect = case_reports[name], CASES[name][1]
    assert "died" not in rep, f"the process died in case {name!r}: {rep['died']}"
    if expect is None:
        assert rep == {"ok": True, "result": 0.0}, rep
    else:
        assert not rep["ok"] and rep["type"] == "ValueError", rep
        assert re.search(expect, rep["msg"]), f"message {rep['msg']!r} does not match {expect!r}"


# ----------------------------------------------------------- empty batch/heads

@pytest.mark.parametrize("B,h,need", [(0, 2, True), (0, 2, False), (2, 0, False), (0, 0, True)])
@pytest.mark.parametrize("window", [0, 3])
def test_empty_batch_or_heads_give_empty_results(B, h, need, window):
    q, k, v = _q(B, h, 12, 8), _q(B, h, 12 if window else 5, 8), _q(B, h, 12 if window else 5, 4)
    H, W = (3, 4) if window else (0, 0)
    out, lse, imp = OPS.attention_fwd(q, k, v, 0.3, window, H, W, need)
    assert out.shape == (B, h, 12, 4) and lse.shape == (B, h, 12)
    assert imp.shape == ((B, 12 if window else 5) if need else (0,))
    dq, dk, dv = OPS.attention_bwd(_q(B, h, 12, 4), q, k, v, out, lse, 0.3, window, H, W)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


@pytest.mark.parametrize("G,B,N,C", [(2, 0, 13, 6), (0, 2, 13, 6), (2, 2, 0, 6), (2, 2, 13, 0)])
def test_empty_aggregation(G, B, N, C):
    groups = (2, 1)
    x = torch.randn(B, N, C, requires_grad=True)
    w, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    idx = perm_index(G, B, N)
    out = OPS.aggregate_fwd(x, idx, w, b, list(groups))
    ws, bs = split_params(w, b, groups)
    refs = [reference.aggregate_sorted(x, idx[g], ws, bs) for g in range(G)]
    ref = torch.stack(refs) if refs else x.new_empty(0, B, reference.reallocated_length(N, groups), C)
    assert out.shape == ref.shape
    grad = torch.randn(ref.shape)
    dx, dw, db = OPS.aggregate_bwd(grad, x.detach(), idx, w.detach(), list(groups))
    leaves = (x, w, b)
    if ref.requires_grad:
        rdx, rdw, rdb = torch.autograd.grad(ref, leaves, grad, allow_unused=True, materialize_grads=True)
    else:
        rdx, rdw, rdb = (torch.zeros_like(t) for t in leaves)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)
    torch.testing.assert_close(db, rdb)


def test_group_larger_than_its_part():
    # r_p beyond the part's length: the unused weights get zero gradient.
    x, idx, _, _ = agg_inputs(B=2, N=9, C=5, G=1)
    groups = (7, 30)
    w, b = torch.randn(37), torch.randn(2)
    out = OPS.aggregate_fwd(x, idx, w, b, list(groups))
    ws, bs = split_params(w, b, groups)
    wl, bl = [t.requires_grad_() for t in ws], [t.requires_grad_() for t in bs]
    xl = x.detach().requires_grad_()
    ref = reference.aggregate_sorted(xl, idx[0], wl, bl)
    torch.testing.assert_close(out[0], ref)
    grad = torch.randn(ref.shape)
    dx, dw, db = OPS.aggregate_bwd(grad[None], x, idx, w, list(groups))
    rdx, *rdw = torch.autograd.grad(ref, [xl, *wl, *bl], grad)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, torch.cat([t.reshape(-1) for t in rdw[:2]]))
    torch.testing.assert_close(db, torch.cat(rdw[2:]))
    assert (dw[4:7] == 0).all() and (dw[7 + 5:] == 0).all()  # parts of 4 and 5 tokens


# ----------------------------------------------------------------- threads

def _all_results():
    torch.manual_seed(3)
    q, k, v = heads_view(1, 200, 2, 16), heads_view(1, 37, 2, 16), heads_view(1, 37, 2, 16)
    dout = torch.randn(1, 2, 200, 16)
    qw = heads_view(2, 130, 3, 8)
    doutw = torch.randn(2, 3, 130, 8)
    x, idx, w, b = agg_inputs(B=3, N=197, C=70, G=2, groups=(49, 14, 7))
    M = reference.reallocated_length(197, (49, 14, 7))
    grad = torch.randn(2, 3, M, 70)
    # Global backward with one head: its query blocks split into chunks whose
    # dK/dV partials are reduced in a fixed order (fp32 direct and bf16 gathered);
    # 8 heads of 49 keys: 256-row query blocks, 8 chunks per head.
    q1, k1, v1 = heads_view(1, 1000, 1, 16), heads_view(1, 300, 1, 16), heads_view(1, 300, 1, 24)
    dout1 = torch.randn(1, 1, 1000, 24)
    q8, k8, v8 = heads_view(4, 2048, 2, 16), heads_view(4, 49, 2, 16), heads_view(4, 49, 2, 16)
    dout8 = torch.randn(4, 2, 2048, 16)
    res = [*attention_bwd(dout1, q1, k1, v1, 0.25, 0, 0, 0),
           *attention_bwd(*(t.bfloat16() for t in (dout1, q1, k1, v1)), 0.25, 0, 0, 0),
           *attention_bwd(dout8, q8, k8, v8, 0.25, 0, 0, 0),
           *OPS.attention_fwd(q, k, v, 0.25, 0, 0, 0, True),
           *OPS.attention_fwd(qw, qw, qw, 0.25, 7, 10, 13, True),
           *attention_bwd(dout, q, k, v, 0.25, 0, 0, 0),
           *attention_bwd(doutw, qw, qw, qw, 0.25, 7, 10, 13),
           OPS.aggregate_fwd(x, idx, w, b, [49, 14, 7]),
           *OPS.aggregate_bwd(grad, x, idx, w, [49, 14, 7])]
    for dtype in (torch.bfloat16, torch.float16):
        res += OPS.attention_fwd(q.to(dtype), k.to(dtype), v.to(dtype), 0.25, 0, 0, 0, True)
    return res


def test_results_are_bitwise_independent_of_the_thread_count():
    threads = torch.get_num_threads()
    try:
        runs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs[n] = _all_results()
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for i, (a, b) in enumerate(zip(runs[1], runs[n])):
            assert torch.equal(a, b), f"result {i} differs between 1 and {n} threads: {(a - b).abs().max()}"
