"""Mixed precision: the ops follow torch.autocast as F.scaled_dot_product_attention
does (inputs cast to the autocast dtype, importance untouched and returned in
fp32), on every backend that runs here, and SG-Former trains under autocast.

Tests run on the test device: CUDA autocast when a GPU is present; here
``torch.autocast("cpu", torch.bfloat16)``, which exercises the same dtype
plumbing (an fp32 LayerNorm output meets bf16 projections).
"""
import pytest
import torch

import sgattn
from sgattn import naive, ops
from sgattn.models import sgformer_s

from conftest import DEVICE

BF16 = torch.bfloat16
BACKENDS = [name for name, why in sgattn.available_backends().items() if why is None]
def R(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _op_calls():
    """(name, function of the fp32 inputs, the inputs); each returns a tuple of tensors."""
    B, h, N, d, H, W = 2, 2, 30, 16, 5, 6
    q, k, v = R(B, h, N, d), R(B, h, 12, d), R(B, h, 12, d)
    ql, kl, vl = R(B, h, N, d), R(B, h, N, d), R(B, h, N, d)
    x = R(B, N, 2 * h * d)
    C = 2 * h * d
    sizes = (2, 1)
    params = [R(C, C) / C ** 0.5, R(C), R(C, C) / C ** 0.5, R(C), [R(r) for r in sizes], [R(1) for _ in sizes]]
    imp = torch.rand(B, H, W, device=DEVICE)
    pair = (imp.reshape(B, N), imp.transpose(1, 2).reshape(B, N))
    q4 = R(B, 2 * h, N, d)
    return [
        ("global", lambda q, k, v: ops.attention_with_importance(q, k, v), (q, k, v)),
        ("window", lambda q, k, v: ops.attention_with_importance(q, k, v, window=3, hw=(H, W)), (ql, kl, vl)),
        ("plain", lambda q, k, v: (ops.attention(q, k, v),), (q, k, v)),
        ("hybrid", lambda *t: ops.hybrid_scale_attention(*t, hw=(H, W), reduced_hw=(3, 4), window=3),
         (q[:, :, :N], k, v, ql, kl, vl)),
        ("reallocate", lambda x, w0, w1, b0, b1: (ops.reallocate_tokens(x, pair[0], [w0, w1], [b0, b1]),),
         (x, *params[4], *params[5])),
        ("self_guided", lambda q, x, w1, b1, w2, b2, f0, f1, c0, c1: (ops.self_guided_attention(
            q, x, pair, w1, b1, w2, b2, [f0, f1], [c0, c1], hw=(H, W)),),
         (q4, x, *params[:4], *params[4], *params[5])),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn,inputs", _op_calls(), ids=[c[0] for c in _op_calls()])
def test_ops_follow_autocast(backend, name, fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    with sgattn.use_backend(backend):
        with torch.autocast(DEVICE, BF16):
            got = fn(*leaves)
        expected = fn(*[t.to(BF16) for t in inputs])  # what autocast promises: the op on bf16 inputs
    assert got[0].dtype == BF16
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        assert torch.equal(g, e), f"{name}: autocast result differs from the op on bf16-cast inputs"
    if len(got) > 1:
        assert got[1].dtype == torch.float32  # importance stays fp32
    got[0].float().square().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def test_autocast_leaves_float64_alone():
    q = R(1, 2, 9, 8, dtype=torch.float64)
    with torch.autocast(DEVICE, BF16):
        out, imp = sgattn.attention_with_importance(q, q, q)
    assert out.dtype == imp.dtype == torch.float64


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("build", ["sgattn", "patched"])
def test_sgformer_trains_under_autocast(build):
    torch.manual_seed(0)
    if build == "sgattn":
        model = sgformer_s(num_classes=10)
    else:  # the authors' module layout, patched in place
        model = naive.naive_sgformer("sgformer_s", num_classes=10, strict=False)
        assert sgattn.patch_model(model) > 0
    model.to(DEVICE)
    x = R(2, 3, 64, 80)
    ref = model(x)
    with torch.autocast(DEVICE, BF16):
        logits = model(x)
    assert logits.dtype == BF16 and torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits; a sort tie flipped by rounding moves a few logits more
    assert _cosine(logits, ref) > 0.98
    logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
