"""The CUDA extension: build/import checks that run anywhere, and the kernels
against sgattn.reference where a GPU is present.

Without a GPU, only the import and registration checks run (when the
extension is built; SGATTN_REQUIRE_CUDA_BUILD=1 makes a missing build fail).
The standalone nvcc register/spill check is tools/ci_native_checks.sh.
"""
import os

import pytest
import torch

import sgattn
from sgattn import composition, reference
from sgattn._schemas import SCHEMAS, qualified
from sgattn.backends import get_backend
from tolerance import assert_close_to_reference

try:
    import sgattn._C_cuda  # noqa: F401
    _BUILD_ERROR = None
except ImportError as exc:
    _BUILD_ERROR = str(exc)

if _BUILD_ERROR and os.environ.get("SGATTN_REQUIRE_CUDA_BUILD") == "1":
    raise RuntimeError(f"SGATTN_REQUIRE_CUDA_BUILD=1 but sgattn._C_cuda does not import: {_BUILD_ERROR}")

built = pytest.mark.skipif(_BUILD_ERROR is not None, reason=f"sgattn._C_cuda not built: {_BUILD_ERROR}")
gpu = pytest.mark.skipif(_BUILD_ERROR is not None or not torch.cuda.is_available(),
                         reason="needs the CUDA extension and a GPU")


@built
def test_every_op_has_cpu_and_cuda_kernels():
    from sgattn import _native
    assert _native.load_extension("sgattn._C_cuda") is None  # also registers the Python-side kernels
    for name in SCHEMAS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), key), (name, key)


# Loads one extension's shared library by path (not through the sgattn package,
# whose import may load the other), then defines the schemas as sgattn._native
# does: the extension's kernels are there for its own dispatch key only.
_LOAD_ALONE = """
import importlib.machinery, importlib.util, runpy, sys, torch
name, path, schemas_py, key, other = sys.argv[1:]
loader = importlib.machinery.ExtensionFileLoader(f"sgattn.{name}", path)
loader.exec_module(importlib.util.module_from_spec(importlib.util.spec_from_loader(f"sgattn.{name}", loader)))
assert "sgattn" not in sys.modules
lib = torch.library.Library("sgattn", "FRAGMENT")
schemas = runpy.run_path(schemas_py)["SCHEMAS"]
for schema in schemas.values():
    lib.define(schema)
has = lambda op, k: torch._C._dispatch_has_kernel_for_dispatch_key(f"sgattn::{op}", k)
print([(op, has(op, key), has(op, other)) for op in schemas])
assert all(has(op, key) and not has(op, other) for op in schemas)
"""


@built
@pytest.mark.parametrize("name, key, other", [("_C_cuda", "CUDA", "CPU"), ("_C", "CPU", "CUDA")])
def test_each_extension_loads_alone(name, key, other):
    import importlib
    import subprocess
    import sys
    from sgattn import _schemas
    path = importlib.import_module(f"sgattn.{name}").__file__
    res = subprocess.run([sys.executable, "-c", _LOAD_ALONE, name, path, _schemas.__file__, key, other],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@built
def test_backend_availability_reason_is_clear():
    why = sgattn.available_backends()["cuda"]
    if torch.cuda.is_available():
        assert why is None
    else:
        assert why == "no CUDA device is available"


def test_unbuilt_or_deviceless_backend_explains_itself():
    # Whatever this machine has, the reason is None or a sentence, never an exception.
    why = sgattn.available_backends()["cuda"]
    assert why is None or ("not built" in why or "CUDA device" in why or "failed to load" in why)


def test_cuda_backend_reasons_for_inputs_it_cannot_run():
    be = get_backend("cuda")
    t = torch.zeros(1, 2, 8, 32)
    assert "CUDA tensors only" in be.unsupported("attention", (t, t, t))
    if torch.cuda.is_available() and _BUILD_ERROR is None:
        c = t.cuda()
        assert "probability dropout" in be.unsupported("attention", (c, c, c), dropout_p=0.1)
        assert "float64" in be.unsupported("attention", (c.double(),) * 3)
        assert "head dim" in be.unsupported("attention", (torch.zeros(1, 2, 8, 130, device="cuda"),) * 3)
        # Long key rows and large windows run (online softmax over key tiles).
        long_k = torch.zeros(1, 2, 4096, 32, device="cuda")
        assert be.unsupported("attention", (c, long_k, long_k)) is None
        assert be.unsupported("attention_with_importance", (c, c, c), window=17) is None


# ---------------------------------------------- host-side planner (no GPU needed)

SM80, SM90 = 163 * 1024, 227 * 1024


def _plan(dtype, B, h, N, M, d, window=None, hw=None, smem=SM90):
    from sgattn.backends.cuda import plan_attention
    return plan_attention(dtype, B, h, N, M, d, window, hw, smem)


@built
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", (1, 24, 32, 40, 64, 72, 96, 100, 128))
def test_planner_fits_every_head_dim_on_sm80_and_sm90(dtype, d):
    for limit in (SM80, SM90):
        for window, hw, N, M in ((None, None, 4099, 65536), (7, (57, 61), 57 * 61, 57 * 61),
                                 (16, (33, 17), 33 * 17, 33 * 17)):
            plan = _plan(dtype, 2, 3, N, M, d, window, hw, smem=limit)
            assert plan["error"] is None, plan
            assert plan["warps"] == 4  # the full 64-query tile fits both architectures
            assert plan["smem"] <= limit and plan["imp_smem"] <= limit


@built
def test_planner_any_key_count_and_geometry():
    # SG-Former S/M/B at 1024x1024: stage 1 global keys 32*32, sr 2 stage 3 reallocated rows, window 7.
    for N, M in ((256 * 256, 32 * 32), (64 * 64, 32 * 32), (1, 1), (5, 300), (3136, 4096)):
        plan = _plan(torch.float16, 1, 2, N, M, 32)
        assert plan["error"] is None
        assert plan["fwd_blocks"] == 2 * -(-N // 64)
        assert plan["ktiles"] == -(-M // 64)
        assert plan["imp_blocks"] == 2 * plan["ktiles"] * plan["splits"]
        assert plan["partial_elems"] == 2 * plan["splits"] * M
    plan = _plan(torch.float32, 2, 2, 10 * 9, 10 * 9, 32, 7, (10, 9))
    assert plan["fwd_blocks"] == 2 * 2 * 4 and plan["ktiles"] == 1 and plan["splits"] == 1


@built
def test_planner_keeps_o_in_score_rows_for_one_key_tile():
    # fp16/bf16, head dim <= 64, at most 64 keys per segment (SG-Former at 224: M = 49, 60, 7x7 windows):
    # no O buffer, so less shared memory per block.
    for dtype in (torch.float16, torch.bfloat16):
        for d in (24, 32, 64):
            for args in ((3136, 49, None, None), (784, 60, None, None), (3136, 3136, 7, (56, 56)), (49, 64, None, None)):
                one = _plan(dtype, 1, 2, args[0], args[1], d, args[2], args[3])
                many = _plan(dtype, 1, 2, 3136, 147, d)
                assert one["o_in_s"] and not many["o_in_s"], (dtype, d, args)
                assert one["smem"] < many["smem"] and one["imp_smem"] == many["imp_smem"]
                assert one["fwd_blocks"] == 2 * -(-args[0] // 64) if args[2] is None else True
    assert not _plan(torch.float16, 1, 2, 100, 65, 32)["o_in_s"]  # two key tiles
    assert not _plan(torch.float16, 1, 2, 100, 49, 96)["o_in_s"]  # an O row would not fit a score row
    assert not _plan(torch.float32, 1, 2, 100, 49, 32)["o_in_s"]  # SIMT path keeps its O buffer
    assert not _plan(torch.float16, 1, 2, 81, 81, 32, 9, (9, 9))["o_in_s"]  # 81-key windows


@built
def test_planner_limits_have_reasons():
    assert "head dim" in _plan(torch.float16, 1, 1, 8, 8, 129)["error"]
    assert "shared memory" in _plan(torch.float32, 1, 1, 8, 8, 128, smem=16 * 1024)["error"]
    # Smaller devices get fewer warps per block, never an oversized launch.
    small = _plan(torch.bfloat16, 1, 1, 8, 8, 128, smem=64 * 1024)
    assert small["error"] is None and small["warps"] < 4 and small["smem"] <= 64 * 1024
    assert "2^31" in _plan(torch.float16, 65536, 65536, 64 * 64, 16, 32)["error"]  # B*h*tiles blocks
    assert "32 bits" in _plan(torch.float16, 1, 1, 2 ** 31, 16, 32)["error"]
    assert "window" in _plan(torch.float16, 1, 1, 49, 49, 32, 50000, (7, 7))["error"]


@built
def test_aggregate_launch_limits_have_reasons():
    from sgattn.backends.cuda import aggregate_limits
    assert aggregate_limits(2, 4, 3136, 60) is None
    assert "output rows" in aggregate_limits(2, 2 ** 20, 4096, 2048)
    assert "tokens" in aggregate_limits(2, 2 ** 20, 2 ** 14, 1)


ATTN_CASES = [
    (2, 2, 97, 49, 24, None, None),
    (1, 3, 64, 60, 40, None, None),
    (2, 1, 33, 147, 72, None, None),
    (1, 2, 1025, 256, 128, None, None),
    (2, 2, 3136, 49, 32, None, None),
    (2, 2, 99, 99, 24, 7, (9, 11)),
    (1, 3, 196, 196, 64, 7, (14, 14)),
    (2, 2, 91, 91, 40, 7, (13, 7)),
    (1, 2, 300, 300, 32, 16, (15, 20)),
    # long key rows: online softmax over 64-key tiles, importance from the stored lse
    (2, 2, 37, 300, 32, None, None),
    (1, 3, 129, 1254, 40, None, None),
    (1, 1, 65, 4096, 64, None, None),
    (1, 2, 1100, 4096, 96, None, None),
    (1, 2, 420, 420, 24, 20, (21, 20)),  # 400 keys per window
    (2, 1, 1, 1, 8, None, None),
]


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-w{c[5]}")
def test_cuda_attention_matches_reference(case, dtype):
    B, h, N, M, d, window, hw = case
    be = get_backend("cuda")
    q64 = torch.randn(B, N, h * d, dtype=torch.float64, device="cuda").reshape(B, N, h, d).transpose(1, 2)
    k64 = torch.randn(B, h, M, d, dtype=torch.float64, device="cuda")
    v64 = torch.randn(B, h, M, d, dtype=torch.float64, device="cuda")
    q64, k64, v64 = (t.requires_grad_() for t in (q64, k64, v64))
    qT, kT, vT = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    qR, kR, vR = (t.detach().clone().requires_grad_() for t in (qT, kT, vT))
    out, imp = be.attention(qT, kT, vT, window=window, hw=hw)
    ref, ref_imp = reference.attention(qR, kR, vR, window=window, hw=hw)
    ref64, imp64 = reference.attention(q64, k64, v64, window=window, hw=hw)
    # Tensor-core rounding of P to the input dtype before P.V: allow 3x the reference's error.
    assert_close_to_reference(out, ref, ref64, factor=3.0, what="out")
    assert_close_to_reference(imp, ref_imp, imp64, factor=3.0, what="importance")
    grad = torch.randn_like(ref64)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype))
    ref64.backward(grad)
    for name, t, r, t64 in zip("qkv", (qT, kT, vT), (qR, kR, vR), (q64, k64, v64)):
        assert_close_to_reference(t.grad, r.grad, t64.grad, factor=3.0, what=f"d{name}")
    # Deterministic: same inputs, same bits (forward, importance and the fused backward).
    out2, imp2 = be.attention(qT, kT, vT, window=window, hw=hw)
    assert torch.equal(out, out2) and torch.equal(imp, imp2)
    grads = [t.grad.clone() for t in (qT, kT, vT)]
    for t in (qT, kT, vT):
        t.grad = None
    out2.backward(grad.to(dtype))
    assert all(torch.equal(a, t.grad) for a, t in zip(grads, (qT, kT, vT)))


def _relayout(t, how):
    """The same values as t ([B, h, n, d]) in another memory layout, selecting another load path of
    the kernels (kernels/attention.cuh, choose_load_mode)."""
    B, h, n, d = t.shape
    if how == "contiguous":  # 16-byte cp.async for fp16/bf16 when d * 2 is a multiple of 16
        return t.contiguous()
    if how == "offset":  # base pointer off 16-byte alignment by one element: element loads (4-byte cp.async for fp32)
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = flat[1:].view(B, h, n, d)
        out.copy_(t)
        return out
    if how == "padded":  # row stride rounded up to a multiple of 8 elements: 16-byte chunks, the last one partial
        pad = -(-d // 8) * 8 + 8
        out = torch.zeros(B, h, n, pad, dtype=t.dtype, device=t.device)[..., :d]
        out.copy_(t)
        return out
    if how == "strided_d":  # head dim not unit-stride: element loads
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(how)


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("d,window", [(20, None), (24, None), (32, 7), (36, None), (72, None)])
def test_cuda_attention_load_paths_give_identical_bits(dtype, d, window):
    # Every load path (16-byte cp.async, partial chunks, 4-byte cp.async, element loads) stages the same
    # values into shared memory, so outputs, importance and gradients are bitwise equal across layouts.
    B, h = 2, 2
    N, M, hw = (130, 75, None) if window is None else (99, 99, (9, 11))
    g = torch.Generator(device="cuda").manual_seed(d)
    base = [torch.randn(B, h, n, d, generator=g, device="cuda").to(dtype) for n in (N, M, M)]
    grad = torch.randn(B, h, N, d, generator=g, device="cuda").to(dtype)
    be = get_backend("cuda")
    results = {}
    for how in ("contiguous", "offset", "padded", "strided_d"):
        q, k, v = (_relayout(t, how).requires_grad_() for t in base)
        out, imp = be.attention(q, k, v, window=window, hw=hw)
        out.backward(_relayout(grad, how))
        results[how] = [out.detach(), imp, q.grad, k.grad, v.grad]
    for how, res in results.items():
        for name, a, b in zip(("out", "importance", "dq", "dk", "dv"), results["contiguous"], res):
            assert torch.equal(a, b), f"{how}: {name} differs from the contiguous layout"
    ref64 = reference.attention(*(t.double() for t in base), window=window, hw=hw)[0]
    ref = reference.attention(*base, window=window, hw=hw)[0]
    assert_close_to_reference(results["contiguous"][0], ref, ref64, factor=3.0, what="out")


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_cuda_attention_backward_direct_strided_dout(dtype):
    from sgattn import _native
    _native.load_extension("sgattn._C_cuda")
    B, h, N, M, d = 2, 3, 77, 130, 40
    q, k, v = (torch.randn(B, h, n, d, device="cuda", dtype=torch.float64) for n in (N, M, M))
    dout = torch.randn(B, N, h, d, device="cuda", dtype=torch.float64).transpose(1, 2)  # not contiguous
    qt, kt, vt = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse, _ = _native.op("attention_fwd")(qt, kt, vt, d ** -0.5, 0, 0, 0, False)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # a strided out too
    dq, dk, dv = _native.op("attention_bwd")(dout.to(dtype), qt, kt, vt, out, lse, d ** -0.5, 0, 0, 0)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    ref = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref64 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference.attention(*ref, need_importance=False)[0].backward(dout.to(dtype))
    reference.attention(*ref64, need_importance=False)[0].backward(dout)
    for name, got, r, r64 in zip("qkv", (dq, dk, dv), ref, ref64):
        assert_close_to_reference(got, r.grad, r64.grad, factor=3.0, what=f"d{name}")


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("sr,N,C", [(8, 3136, 64), (4, 197, 40), (2, 97, 256), (2, 5, 6)])
def test_cuda_aggregate_matches_reference(sr, N, C, dtype):
    be = get_backend("cuda")
    B = 2
    groups = composition.REALLOCATION_GROUPS[sr]
    x64 = torch.randn(B, N, C, dtype=torch.float64, device="cuda", requires_grad=True)
    w64 = [(torch.randn(r, dtype=torch.float64, device="cuda") * r ** -0.5).requires_grad_() for r in groups]
    b64 = [torch.randn(1, dtype=torch.float64, device="cuda", requires_grad=True) for _ in groups]
    idx = torch.stack([torch.argsort(torch.rand(B, N, device="cuda"), -1) for _ in range(2)])
    leaves64 = [x64, *w64, *b64]
    leavesT = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    leavesR = [t.detach().clone().requires_grad_() for t in leavesT]
    P = len(groups)
    out = be.aggregate_sorted(leavesT[0], idx, leavesT[1:1 + P], leavesT[1 + P:])
    ref = reference.aggregate_sorted(leavesR[0], idx, leavesR[1:1 + P], leavesR[1 + P:])
    ref64 = reference.aggregate_sorted(x64, idx, w64, b64)
    assert_close_to_reference(out, ref, ref64, what="aggregate")
    grad = torch.randn_like(ref64)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype))
    ref64.backward(grad)
    for i, (t, r, t64) in enumerate(zip(leavesT, leavesR, leaves64)):
        assert_close_to_reference(t.grad, r.grad, t64.grad, factor=4.0, what=f"grad of leaf {i}")


_BAD_INDEX_SCRIPT = r"""
import sys, torch, sgattn._native as nat
nat.load_extension("sgattn._C_cuda")
kind = sys.argv[1]
x = torch.randn(2, 8, 16, device="cuda", requires_grad=True)
idx = torch.argsort(torch.rand(1, 2, 8, device="cuda"), -1)
if kind == "range":
    idx[0, 1, 3] = 8
elif kind == "negative":
    idx[0, 0, 0] = -1
else:
    idx[0, 1, 2] = idx[0, 1, 5]  # a duplicate: not a permutation
w = torch.ones(3, device="cuda", requires_grad=True)
b = torch.zeros(2, device="cuda", requires_grad=True)
try:
    out = nat.op("aggregate_fwd")(x, idx, w, b, [2, 1])
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
except Exception as exc:
    print("RAISED", type(exc).__name__, exc)
    sys.exit(3)
print("NO ERROR")
"""


@gpu
@pytest.mark.parametrize("kind", ("range", "negative", "duplicate"))
def test_cuda_aggregate_reports_bad_index_on_the_device(kind):
    # A device-side assertion poisons the CUDA context: run in a fresh process.
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _BAD_INDEX_SCRIPT, kind], capture_output=True, text=True,
                         timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "NO ERROR" not in text, text
    assert "sgattn" in text or "device-side assert" in text, text


@gpu
def test_cuda_aggregate_does_not_synchronise():
    # The permutation check lives on the device: capturable in a CUDA graph.
    be = get_backend("cuda")
    x = torch.randn(2, 90, 48, device="cuda")
    idx = torch.stack([torch.argsort(torch.rand(2, 90, device="cuda"), -1) for _ in range(2)])
    w = [torch.randn(49, device="cuda"), torch.randn(14, device="cuda"), torch.randn(7, device="cuda")]
    b = [torch.randn(1, device="cuda") for _ in range(3)]
    ref = be.aggregate_sorted(x, idx, w, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.aggregate_sorted(x, idx, w, b)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@gpu
def test_cuda_ops_validate_direct_calls():
    """The device checks of the cuda binding and its empty results; the bad
    arguments every backend shares are the table of tests/test_contract.py."""
    from sgattn import _native
    _native.load_extension("sgattn._C_cuda")
    fwd = _native.op("attention_fwd")
    q = torch.randn(1, 2, 12, 8, device="cuda")
    with pytest.raises(ValueError, match=r"attention_fwd: k must be a CUDA tensor \(this is the cuda kernel\)"):
        fwd(q, q.cpu(), q, 1.0, 0, 0, 0, True)
    # Empty batch or heads: empty outputs, no launch (importance over no heads is refused).
    for shape in ((0, 2, 12, 8), (1, 0, 12, 8)):
        e = torch.randn(*shape, device="cuda")
        need = shape[1] > 0
        out, lse, imp = fwd(e, e, e, 1.0, 0, 0, 0, need)
        assert out.shape == shape and lse.shape == shape[:3] and imp.shape == ((shape[0], 12) if need else (0,))
        assert out.is_contiguous()
    # The backward takes the forward's out and lse.
    bwd = _native.op("attention_bwd")
    out, lse, _ = fwd(q, q, q, 1.0, 0, 0, 0, False)
    with pytest.raises(ValueError, match=r"attention_bwd: lse must be a CUDA tensor"):
        bwd(q, q, q, q, out, lse.cpu(), 1.0, 0, 0, 0)
    agg = _native.op("aggregate_fwd")
    x = torch.randn(2, 8, 4, device="cuda")
    idx = torch.argsort(torch.rand(1, 2, 8, device="cuda"), -1)
    w, b = torch.ones(3, device="cuda"), torch.zeros(2, device="cuda")
    with pytest.raises(ValueError, match="aggregate_fwd: index must be a CUDA tensor"):
        agg(x, idx.cpu(), w, b, [2, 1])
    assert agg(x[:0], idx[:, :0], w, b, [2, 1]).shape == (1, 0, 6, 4)  # M = 4/2 + 4/1


@gpu
def test_cuda_self_guided_module_matches_reference():
    from sgattn.backends import use_backend
    from sgattn.nn import HybridScaleAttention, SelfGuidedAttention
    torch.manual_seed(0)
    hsa = HybridScaleAttention(64, num_heads=2, qkv_bias=True, sr_ratio=8).cuda()
    sga = SelfGuidedAttention(64, num_heads=2, qkv_bias=True, sr_ratio=8).cuda()
    for m in (hsa, sga):
        for p in m.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
    x = torch.randn(2, 56 * 56, 64, device="cuda")
    outs = {}
    for name in ("cuda", "reference"):
        with use_backend(name), torch.no_grad():
            y, mask = hsa(x, 56, 56)
            outs[name] = sga(y, 56, 56, mask)[0]
    torch.testing.assert_close(outs["cuda"], outs["reference"], rtol=1e-3, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_self_guided_long_reallocated_rows(dtype):
    # sr 2 on a 30 x 34 grid: 765 reallocated keys (> the old 256-key limit), all through the CUDA kernels.
    B, h, d, H, W = 2, 4, 16, 30, 34
    N, C = H * W, h * d
    g = torch.Generator(device="cuda").manual_seed(0)
    def rn(*s, std=1.0):
        return (std * torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)).requires_grad_()
    leaves64 = [rn(B, h, N, d), rn(B, N, C), rn(C, C, std=C ** -0.5), rn(C), rn(C, C, std=C ** -0.5), rn(C),
                rn(2, std=0.7), rn(1), rn(1), rn(1)]
    imp = torch.rand(B, N, generator=g, device="cuda")
    imp = (imp, imp.reshape(B, H, W).transpose(1, 2).reshape(B, N))
    leavesT = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    leavesR = [t.detach().clone().requires_grad_() for t in leavesT]
    def run(backend, L):
        q, x, w1, b1, w2, b2, f1, f2, c1, c2 = L
        return backend.self_guided_attention(q, x, imp, w1, b1, w2, b2, [f1, f2], [c1, c2], hw=(H, W))
    ref_be = get_backend("reference")
    out = run(get_backend("cuda"), leavesT)
    ref = run(ref_be, leavesR)
    ref64 = run(ref_be, leaves64)
    # composite op (aggregation, projections, attention): allow 4x the reference error
    assert_close_to_reference(out, ref, ref64, factor=4.0, what="self-guided out")
    grad = torch.randn_like(ref64)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype))
    ref64.backward(grad)
    for i, (t, r, t64) in enumerate(zip(leavesT, leavesR, leaves64)):
        assert_close_to_reference(t.grad, r.grad, t64.grad, factor=4.0, what=f"grad of leaf {i}")
