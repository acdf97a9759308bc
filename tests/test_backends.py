"""Declared backend capabilities against what each backend really runs, and
the cases where the backends used to disagree (zero heads with importance,
dropout), for every backend present: reference, cpu, triton (under the
interpreter on a machine without a GPU) and cuda (GPU only)."""
import collections
import importlib

import pytest
import torch

import sgattn
from sgattn import BackendError, reference
from sgattn.backends import FLOATS, capability_reasons, capability_table, get_backend, unavailable_reason
from tolerance import assert_close_to_reference

NAMES = ("reference", "cpu", "triton", "cuda")
NATIVE = ("cpu", "triton", "cuda")


def _present(name):
    why = unavailable_reason(name)
    if why is not None:
        pytest.skip(f"backend {name} is not present here: {why}")
    backend = get_backend(name)
    caps = backend.capabilities()
    return backend, caps, caps.devices[0] if caps.devices else "cpu"


def _qkv(B, h, N, d, dtype, device, M=None):
    g = torch.Generator().manual_seed(B * 1000 + h * 100 + N + d)
    return [torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(device, dtype) for n in (N, M or N, M or N)]


def _supported_configs(caps):
    """(dtype, d, window) inside the declared capabilities, at their edges."""
    lo, hi = caps.head_dims or (1, 128)
    window = min(caps.max_window or 3, 3)
    return [(dtype, d, w) for dtype in caps.dtypes for d in sorted({max(lo, 16), hi}) for w in (None, window)]


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_run(name):
    """Every declared dtype, the head-dim edges and a window run on the forced
    backend, close to the float64 reference."""
    backend, caps, device = _present(name)
    for dtype, d, window in _supported_configs(caps):
        q, k, v = _qkv(1, 2, 12, d, dtype, device)
        hw = (3, 4) if window else None
        assert backend.unsupported("attention_with_importance", (q, k, v), window=window, hw=hw) is None
        with sgattn.use_backend(name):
            out, imp = sgattn.attention_with_importance(q, k, v, window=window, hw=hw)
        ref, ref_imp = reference.attention(q, k, v, window=window, hw=hw)
        ref64, imp64 = reference.attention(q.double(), k.double(), v.double(), window=window, hw=hw)
        what = f"{name} {dtype} d={d} window={window}"
        assert_close_to_reference(out, ref, ref64, what=what)
        assert_close_to_reference(imp, ref_imp, imp64, what=f"{what} importance")


def _misses(caps, device):
    """(q, k, v, window, hw, the fragments of every reason expected): inputs
    outside each declared limit at once."""
    dtype = next((t for t in FLOATS if t not in caps.dtypes), caps.dtypes[0])
    d = caps.head_dims[1] + 1 if caps.head_dims else 16
    # a window past a small declared limit, on a grid it fits (the public op clips a window to the grid)
    window = caps.max_window + 1 if caps.max_window is not None and caps.max_window < 64 else None
    side = window or 4
    q, k, v = _qkv(1, 1, side * side, d, dtype, device)
    expect = ["dropout"] if not caps.dropout else []
    if dtype not in caps.dtypes:
        expect.append(str(dtype))
    if caps.head_dims:
        expect.append(f"head dim {d} is outside")
    if window:
        expect.append(f"window {window} is larger")
    return q, k, v, window, (side, side) if window else None, expect


@pytest.mark.parametrize("name", NAMES)
def test_capability_miss_lists_every_reason(name):
    """A forced call outside several declared limits raises one BackendError
    naming each; each declared miss is also a real one: the backend's own
    method (no dispatch) refuses it."""
    backend, caps, device = _present(name)
    q, k, v, window, hw, expect = _misses(caps, device)
    options = dict(window=window, hw=hw, dropout_p=0.5)
    why = backend.unsupported("attention_with_importance", (q, k, v), **options)
    if name == "reference":  # the oracle runs everything
        assert expect == [] and why is None
        return
    assert len(expect) >= 2 and why is not None
    assert why == "; ".join(capability_reasons(caps, "attention_with_importance", (q, k, v), options))
    with sgattn.use_backend(name), pytest.raises(BackendError) as info:
        sgattn.attention_with_importance(q, k, v, **options)
    for fragment in expect:
        assert fragment in str(info.value), (fragment, str(info.value))
    with pytest.raises(BackendError, match="probability dropout is not implemented"):
        backend.attention(q, k, v, window=window, hw=hw, dropout_p=0.5)
    if len(expect) > 1:  # without dropout the kernels themselves refuse the rest
        with pytest.raises(ValueError):
            backend.attention(q, k, v, window=window, hw=hw)


@pytest.mark.parametrize("name", NATIVE)
def test_hybrid_dropout_is_a_backend_error(name):
    backend, caps, device = _present(name)
    q, k, v = _qkv(1, 2, 16, 16, caps.dtypes[0], device)
    with pytest.raises(BackendError, match=f"backend '{name}' cannot run attention: probability dropout"):
        backend.hybrid_scale_attention(q, k[:, :, :4], v[:, :, :4], q, k, v, hw=(4, 4), reduced_hw=(2, 2),
                                       window=2, dropout_p=0.1)


def test_unsupported_lists_several_reasons_per_limit():
    """A float64 call with dropout on cpu: two reasons, in one string."""
    backend, caps, _ = _present("cpu")
    t = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    why = backend.unsupported("attention", (t, t, t), dropout_p=0.1)
    assert why == ("dtype torch.float64 is not supported (float16, bfloat16, float32 are); "
                   "probability dropout is not implemented")
    # aggregation takes float64 on cpu: the dtype reason is per op
    assert backend.unsupported("reallocate_tokens", (torch.zeros(1, 4, 2, dtype=torch.float64),)) is None


def _registered_fwd(name):
    return torch.ops.sgattn.triton_attention_fwd if name == "triton" else torch.ops.sgattn.attention_fwd


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("window", [0, 3])
def test_zero_heads_with_importance_is_a_value_error(name, window):
    """The registered forward of every backend refuses importance over no
    heads with the same ValueError; without importance it returns empty results."""
    _, caps, device = _present(name)
    q = torch.zeros(2, 0, 12, 16, device=device)
    H, W = (3, 4) if window else (0, 0)
    with pytest.raises(ValueError, match=r"attention_fwd: the importance is a mean over heads and "
                                         r"h = 0 \(with B > 0\) has none"):
        _registered_fwd(name)(q, q, q, 0.25, window, H, W, True)
    out, lse, _ = _registered_fwd(name)(q, q, q, 0.25, window, H, W, False)
    assert out.shape == (2, 0, 12, 16) and lse.shape[:2] == (2, 0)


def test_cuda_capabilities_come_from_the_planner():
    """The declared head dims, token count and window of the cuda backend are
    the planner's limits: the edge plans, one past it does not (no GPU needed)."""
    cuda = importlib.import_module("sgattn.backends.cuda")
    try:
        caps = get_backend("cuda").capabilities()
    except BackendError as exc:
        pytest.skip(f"the CUDA extension is not built: {exc}")

    def error(**sizes):
        args = dict(B=1, h=1, N=1, M=1, d=16, window=0, hw=(1, 1)) | sizes
        return cuda.plan_attention(torch.float16, max_smem=2 ** 40, **args)["error"]

    lo, hi = caps.head_dims
    assert error(d=lo) is None and error(d=hi) is None and error(d=lo - 1) and error(d=hi + 1)
    assert error(M=caps.max_tokens) is None and error(M=caps.max_tokens + 1)
    assert error(window=caps.max_window) is None and error(window=caps.max_window + 1)


def test_triton_capabilities_are_the_ops_limits():
    """The declared head dims and window of the triton backend are where its
    custom op stops accepting arguments."""
    _, caps, device = _present("triton")
    lo, hi = caps.head_dims
    fwd = torch.ops.sgattn.triton_attention_fwd
    for d in (lo - 1, hi + 1):
        q = torch.zeros(1, 1, 4, d, device=device)
        with pytest.raises(ValueError, match=f"triton_attention_fwd: head dim d = {d} is outside {lo}..{hi}"):
            fwd(q, q, q, 0.25, 0, 0, 0, True)
    w = caps.max_window + 1
    q = torch.zeros(1, 1, w * w, lo, device=device)
    with pytest.raises(ValueError, match=f"triton_attention_fwd: window {w} is larger than {w - 1}"):
        fwd(q, q, q, 0.25, w, w, w, True)


def test_capability_table_has_a_row_per_backend():
    lines = capability_table()
    assert lines[0].split()[:2] == ["backend", "devices"]
    rows = {line.split()[0]: line for line in lines[1:] if not line.split()[0].endswith(":")}
    assert {"reference", "cpu"} <= set(rows)
    assert rows["reference"].split()[-1] == "yes" and rows["cpu"].split()[-1] == "no"  # dropout column


def _count_calls(monkeypatch, counts, owner, attr):
    fn = getattr(owner, attr)

    def counted(*args, **kwargs):
        counts[attr] += 1
        return fn(*args, **kwargs)
    monkeypatch.setattr(owner, attr, counted)


@pytest.mark.parametrize("name", NAMES)
def test_one_self_guided_call_goes_down_the_stack_once(name, monkeypatch):
    """The public op validates once and dispatches once (capabilities, plans);
    the backend then runs its own primitives once each, and each registered op
    they call validates its own arguments once: no layer calls back up."""
    backend, _, device = _present(name)
    B, h, d, H, W = 1, 2, 16, 4, 4
    C, N = h * d, H * W
    g = torch.Generator().manual_seed(31)
    q, x = torch.randn(B, h, N, d, generator=g).to(device), torch.randn(B, N, C, generator=g).to(device)
    kv = [(torch.randn(C, C, generator=g) * C ** -0.5).to(device), None] * 2
    w = [torch.randn(r, generator=g).to(device) for r in (2, 1)]
    b = [torch.randn(1, generator=g).to(device) for _ in range(2)]
    importance = torch.rand(B, N, generator=g).to(device)
    counts = collections.Counter()
    for attr in ("_check_aggregation", "_check_options", "_check_self_guided_importance", "select"):
        _count_calls(monkeypatch, counts, sgattn.ops, attr)
    for attr in ("unsupported", "launch_limits", "attention", "aggregate_sorted"):
        _count_calls(monkeypatch, counts, backend, attr)  # instance attributes: only this backend
    expected = {"_check_aggregation", "_check_options", "_check_self_guided_importance", "select", "unsupported",
                "launch_limits", "attention", "aggregate_sorted"}
    if name == "triton":
        from sgattn.triton import ops as triton_ops
        for attr in ("_check_attention", "_check_aggregate"):  # each custom op's contract and kernel limits
            _count_calls(monkeypatch, counts, triton_ops, attr)
        expected |= {"_check_attention", "_check_aggregate"}
    if name in ("cpu", "cuda"):
        from sgattn import _native
        op = _native.op

        def counted_op(op_name):
            counts[op_name] += 1  # the C++ binding validates on each call
            return op(op_name)
        monkeypatch.setattr(_native, "op", counted_op)
        expected |= {"attention_fwd", "aggregate_fwd"}
    with sgattn.use_backend(name):
        out = sgattn.self_guided_attention(q, x, importance, *kv, w, b, hw=(H, W))
    assert dict(counts) == dict.fromkeys(expected, 1)
    refs = [reference.self_guided_attention(q.cpu().to(dt), x.cpu().to(dt), importance.cpu(),
                                            *[t if t is None else t.cpu().to(dt) for t in kv],
                                            [t.cpu().to(dt) for t in w], [t.cpu().to(dt) for t in b], hw=(H, W))
            for dt in (torch.float32, torch.float64)]
    assert_close_to_reference(out.cpu(), *refs)


def test_autocast_validates_once_and_casts_as_an_explicit_call(monkeypatch):
    g = torch.Generator().manual_seed(37)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    counts = collections.Counter()
    _count_calls(monkeypatch, counts, sgattn.contract, "check_attention")
    with sgattn.use_backend("reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, imp = sgattn.attention_with_importance(q, k, v, window=3, hw=(3, 4))
        assert counts["check_attention"] == 1  # not again on the cast inputs
        explicit = sgattn.attention_with_importance(q.bfloat16(), k.bfloat16(), v.bfloat16(), window=3, hw=(3, 4))
    assert out.dtype == torch.bfloat16 and imp.dtype == torch.float32
    assert torch.equal(out, explicit[0]) and torch.equal(imp, explicit[1])
