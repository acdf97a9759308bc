"""torch.compile(fullgraph=True) traces the sgattn modules without graph breaks."""
import pytest
import torch

import sgattn
from sgattn import nn as sgnn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_equals_eager(module, *args):
    # aot_eager traces forward and backward graphs (what fullgraph guarantees)
    # without paying for inductor code generation on a 2-core CI machine.
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = args[0].detach().requires_grad_()
    out, mask = compiled(x, *args[1:])
    ref_x = args[0].detach().requires_grad_()
    ref, ref_mask = module(ref_x, *args[1:])
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    return mask, ref_mask


@pytest.mark.parametrize("H,W", [(9, 10)])
def test_modules_compile_fullgraph_with_reference_backend(H, W):
    x = torch.randn(2, H * W, 32)
    hsa = sgnn.Attention(32, False, num_heads=4, sr_ratio=2)
    sga = sgnn.Attention(32, True, num_heads=4, sr_ratio=2)
    glob = sgnn.Attention(32, False, num_heads=4, sr_ratio=1)
    with sgattn.use_backend("reference"):
        mask, ref_mask = _compiled_equals_eager(hsa, x, H, W)
        for a, b in zip(mask, ref_mask):
            torch.testing.assert_close(a, b)
        _compiled_equals_eager(sga, x, H, W, [m.detach() for m in ref_mask])
        _compiled_equals_eager(glob, x, H, W, None)
