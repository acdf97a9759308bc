"""The Triton custom ops are torch.compile-ready (the sgattn.nn modules on the
Triton backend against float64 are rows of tests/test_backend_agreement.py).

Under TRITON_INTERPRET=1 the custom ops run the interpreted kernels on CPU
tensors, also inside compiled graphs (torch.compile with the aot_eager
backend: the point is that Dynamo traces the modules in one graph, not
Inductor's code generation).
"""
import pytest
import torch

import sgattn
from sgattn import nn as snn
from sgattn.backends import get_backend

pytestmark = pytest.mark.skipif(get_backend("triton").unavailable() is not None,
                                reason=f"triton backend unavailable: {get_backend('triton').unavailable()}")

DIM, HEADS = 64, 4


def test_torch_compile_fullgraph(device):
    """A hybrid-scale block feeding a self-guided block, plus plain attention,
    traced by Dynamo in one graph each (fullgraph=True raises on any break)."""
    torch._dynamo.reset()
    hw = (9, 10)
    hsa = snn.HybridScaleAttention(DIM, num_heads=HEADS, sr_ratio=2).to(device)
    sga = snn.SelfGuidedAttention(DIM, num_heads=HEADS, sr_ratio=2).to(device)
    glb = snn.GlobalAttention(DIM, num_heads=HEADS).to(device)
    for m in (hsa, sga):  # spread the importance so that the sort is stable under rounding
        torch.nn.init.normal_(m.q1.weight if hasattr(m, "q1") else m.q.weight, std=DIM ** -0.5)

    def blocks(x):
        y, mask = hsa(x, *hw)
        z, _ = sga(y, *hw, mask)
        w, _ = glb(z, *hw)
        return w

    x = torch.randn(1, hw[0] * hw[1], DIM, device=device)
    with sgattn.use_backend("triton"):
        eager = blocks(x)
        compiled = torch.compile(blocks, fullgraph=True, backend="aot_eager")
        xc = x.clone().requires_grad_()
        out = compiled(xc)
        out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert xc.grad is not None and torch.isfinite(xc.grad).all()


def test_custom_ops_opcheck(device):
    """Schema, fake (meta) implementations and autograd registration of every op."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 12, 16, device=device, requires_grad=True)
    k = torch.randn(1, 2, 12, 16, device=device, requires_grad=True)
    v = torch.randn(1, 2, 12, 16, device=device, requires_grad=True)
    ops = torch.ops.sgattn
    torch.library.opcheck(ops.triton_attention_fwd.default, (q, k, v, 0.25, 0, 0, 0, True))
    torch.library.opcheck(ops.triton_attention_fwd.default, (q, k, v, 0.25, 3, 3, 4, True))
    out, lse, part = ops.triton_attention_fwd(q, k, v, 0.25, 0, 0, 0, True)
    do = torch.randn_like(out)
    torch.library.opcheck(ops.triton_attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.25, 0, 0, 0))
    torch.library.opcheck(ops.triton_importance.default, (part, 1 / 24, None, 0.0, 0, 0, 0, 0))
    part_l = ops.triton_attention_fwd(q, k, v, 0.25, 3, 3, 4, True)[2]
    torch.library.opcheck(ops.triton_importance.default, (part_l, 0.5, part, 1 / 24, 3, 4, 3, 4))
    x = torch.randn(2, 12, 8, device=device, requires_grad=True)
    index = torch.stack([torch.stack([torch.randperm(12) for _ in range(2)]) for _ in range(2)]).to(device)
    w = torch.randn(5, device=device, requires_grad=True)
    b = torch.randn(2, device=device, requires_grad=True)
    torch.library.opcheck(ops.triton_aggregate_fwd.default, (x, index, w, b, [3, 2]))
    # head dims that are not multiples of 16 run zero-padded: same layouts as the fakes declare
    q24, k24, v24 = (torch.randn(1, 2, 12, 24, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops.triton_attention_fwd.default, (q24, k24, v24, 0.2, 3, 3, 4, True))
    dout = torch.randn(2, 2, 5, 8, device=device)  # 12 tokens, halves of 6: 2 + 3 groups
    torch.library.opcheck(ops.triton_aggregate_bwd.default, (dout, x.detach(), index, w.detach(), [3, 2]))


def test_fake_impls_give_right_shapes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.sgattn
    with FakeTensorMode():
        q = torch.empty(2, 3, 97, 24, dtype=torch.bfloat16, device=device)
        k = torch.empty(2, 3, 300, 24, dtype=torch.bfloat16, device=device)
        v = torch.empty(2, 3, 300, 40, dtype=torch.bfloat16, device=device)
        out, lse, part = ops.triton_attention_fwd(q, k, v, 0.2, 0, 0, 0, True)
        assert out.shape == (2, 3, 97, 40) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 97) and part.dtype == torch.float32 and part.shape[::2] == (2, 300)
        imp = ops.triton_importance(part, 1.0, None, 0.0, 0, 0, 0, 0)
        assert imp.shape == (2, 300) and imp.dtype == torch.float32
        x = torch.empty(2, 97, 64, dtype=torch.float16, device=device)
        idx = torch.empty(2, 2, 97, dtype=torch.int64, device=device)
        w = torch.empty(7 + 3 + 2, dtype=torch.float16, device=device)
        bias = torch.empty(3, dtype=torch.float16, device=device)
        agg = ops.triton_aggregate_fwd(x, idx, w, bias, [7, 3, 2])
        from sgattn.reference import reallocated_length
        assert agg.shape == (2, 2, reallocated_length(97, (7, 3, 2)), 64) and agg.dtype == torch.float16


def test_opcheck_noncontiguous_inputs_and_fake_strides(device):
    """Fakes give the real ops' strides, also for permuted, non-contiguous
    inputs (last dims not contiguous included)."""
    torch.manual_seed(0)
    ops = torch.ops.sgattn
    base = torch.randn(1, 16, 12, 2, device=device)      # [B, d, N, h]: permuted views below
    q = base.permute(0, 3, 2, 1).requires_grad_()         # [1, 2, 12, 16], last-dim stride 24
    k = torch.randn(12, 2, 1, 16, device=device).permute(2, 1, 0, 3).requires_grad_()
    v = torch.randn(1, 2, 16, 12, device=device).transpose(2, 3).requires_grad_()
    assert q.stride(-1) != 1 and v.stride(-1) != 1
    for window, H, W in ((0, 0, 0), (3, 3, 4)):
        torch.library.opcheck(ops.triton_attention_fwd.default, (q, k, v, 0.25, window, H, W, True))
        out, lse, _ = ops.triton_attention_fwd(q, k, v, 0.25, window, H, W, True)
        do = torch.randn(1, 12, 16, 2, device=device).permute(0, 3, 1, 2)
        torch.library.opcheck(ops.triton_attention_bwd.default,
                              (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.25, window, H, W))
    x = torch.randn(2, 8, 12, device=device).transpose(1, 2).requires_grad_()  # [2, 12, 8], channel stride 12
    index = torch.stack([torch.stack([torch.randperm(12) for _ in range(2)]) for _ in range(2)]).to(device)
    w = torch.randn(5, device=device, requires_grad=True)
    b = torch.randn(2, device=device, requires_grad=True)
    torch.library.opcheck(ops.triton_aggregate_fwd.default, (x, index, w, b, [3, 2]))
    dout = torch.randn(2, 2, 8, 5, device=device).transpose(2, 3)
    torch.library.opcheck(ops.triton_aggregate_bwd.default, (dout, x.detach(), index, w.detach(), [3, 2]))
