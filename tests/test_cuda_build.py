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
from sgattn import reference
from sgattn._ops_names import SCHEMAS, qualified
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
    if torch.cuda.is_available():
        c = t.cuda()
        long_k = torch.zeros(1, 2, 300, 32, device="cuda")
        assert "exceed" in be.unsupported("attention", (c, long_k, long_k))
        assert "probability dropout" in be.unsupported("attention", (c, c, c), dropout_p=0.1)
        assert "float64" in be.unsupported("attention", (c.double(),) * 3)
        assert "window 17" in be.unsupported("attention_with_importance", (c, c, c), window=17)


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
    # Deterministic: same inputs, same bits.
    out2, imp2 = be.attention(qT, kT, vT, window=window, hw=hw)
    assert torch.equal(out, out2) and torch.equal(imp, imp2)


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("sr,N,C", [(8, 3136, 64), (4, 197, 40), (2, 97, 256), (2, 5, 6)])
def test_cuda_aggregate_matches_reference(sr, N, C, dtype):
    be = get_backend("cuda")
    B = 2
    groups = reference.REALLOCATION_GROUPS[sr]
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


@gpu
def test_cuda_aggregate_rejects_non_permutation_index():
    be = get_backend("cuda")
    x = torch.randn(1, 8, 4, device="cuda")
    idx = torch.zeros(1, 8, dtype=torch.long, device="cuda")
    w = [torch.ones(2, device="cuda"), torch.ones(1, device="cuda")]
    b = [torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")]
    with pytest.raises(ValueError, match="permutation"):
        be.aggregate_sorted(x, idx, w, b)


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
