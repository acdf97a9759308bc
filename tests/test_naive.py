"""The naive (materialising, paper-style) implementation equals sgattn's
modules on the reference backend, in float64 with weights that spread the
importance (Linear weights std 1/sqrt(fan_in), SPEC 2b's note on sort ties)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgattn
from sgattn import naive
from sgattn import nn as sgnn

# (grid, channels, heads, sr) of SG-Former-S's four stages at 224x224.
STAGES = [(56, 64, 2, 8), (28, 128, 4, 4), (14, 256, 8, 2), (7, 512, 16, 1)]
TOL = 1e-12


@pytest.fixture(autouse=True)
def fast_fp64_depthwise_conv(monkeypatch):
    """PyTorch's CPU float64 depthwise conv takes a slow per-channel path
    (~0.2 s per call at 256 channels): both sides' 3x3 depthwise convs (lepe,
    MLP) run as an exact sum of 9 shifted products instead. The conv is not
    what these tests compare; both implementations use the same one."""
    original = nn.Conv2d._conv_forward

    def conv(self, x, weight, bias):
        C = x.shape[1]
        if (x.dtype != torch.float64 or self.groups != C or self.kernel_size != (3, 3)
                or self.stride != (1, 1) or self.padding != (1, 1) or self.dilation != (1, 1)):
            return original(self, x, weight, bias)
        H, W = x.shape[-2:]
        xp = F.pad(x, (1, 1, 1, 1))
        out = sum(xp[:, :, i:i + H, j:j + W] * weight[:, 0, i, j].view(1, C, 1, 1)
                  for i in range(3) for j in range(3))
        return out if bias is None else out + bias.view(1, C, 1, 1)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", conv)


def spread_(module):
    """Linear weights std 1/sqrt(fan_in), biases std 0.1. Drawn in float32 so
    that a float32 round trip is exact (sgattn.patch_model loads the state
    dict into a float32 module before casting it back)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def make_pair(dim, heads, sr, self_guided):
    ref = spread_(naive.Attention(dim, self_guided, num_heads=heads, qkv_bias=True, sr_ratio=sr).double())
    new = sgnn.Attention(dim, self_guided, num_heads=heads, qkv_bias=True, sr_ratio=sr).double()
    new.load_state_dict(ref.state_dict(), strict=True)
    return ref, new


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def run(module, x, H, W, mask):
    x = x.clone().requires_grad_(True)
    out, mask_out = module(x, H, W, mask)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (gx,) = torch.autograd.grad((out * grad_out).sum(), x)
    return out.detach(), mask_out, gx


@pytest.mark.parametrize("grid,dim,heads,sr", STAGES, ids=[f"{g}x{g}-sr{s}" for g, _, _, s in STAGES])
def test_naive_modules_equal_sgattn_modules(grid, dim, heads, sr):
    B = 2 if grid <= 28 else 1
    H = W = grid
    x = torch.randn(B, H * W, dim, dtype=torch.float64)
    with sgattn.use_backend("reference"):
        if sr == 1:
            ref, new = make_pair(dim, heads, sr, False)
            o_ref, _, g_ref = run(ref, x, H, W, None)
            o_new, _, g_new = run(new, x, H, W, None)
            assert rel_err(o_new, o_ref) < TOL and rel_err(g_new, g_ref) < TOL
            return
        # hybrid-scale block: output, input gradient and both importance orderings
        ref, new = make_pair(dim, heads, sr, False)
        o_ref, mask_ref, g_ref = run(ref, x, H, W, None)
        o_new, mask_new, g_new = run(new, x, H, W, None)
        assert rel_err(o_new, o_ref) < TOL, "hybrid-scale output"
        assert rel_err(g_new, g_ref) < TOL, "hybrid-scale input gradient"
        for a, b in zip(mask_new, mask_ref):
            assert rel_err(a, b) < TOL, "importance map"
        # spread weights make the importance distinct: the sorts agree
        assert torch.unique(mask_ref[0][0]).numel() > 0.9 * H * W
        # self-guided block fed the same importance on both sides
        ref, new = make_pair(dim, heads, sr, True)
        x2 = torch.randn(B, H * W, dim, dtype=torch.float64)
        o_ref, _, g_ref = run(ref, x2, H, W, mask_ref)
        o_new, _, g_new = run(new, x2, H, W, mask_ref)
        assert rel_err(o_new, o_ref) < TOL, "self-guided output"
        assert rel_err(g_new, g_ref) < TOL, "self-guided input gradient"


def test_naive_functional_ops_match_reference():
    """The op-level naive functions (used by the benchmarks) equal sgattn's ops,
    including the padded generalisation (strict=False) on a 10x9 grid."""
    torch.manual_seed(0)
    B, h, d, H, W, hr, wr = 2, 2, 8, 10, 9, 5, 4
    N, M = H * W, hr * wr
    qg, qloc, kl, vl = (torch.randn(B, h, N, d, dtype=torch.float64) for _ in range(4))
    kg, vg = (torch.randn(B, h, M, d, dtype=torch.float64) for _ in range(2))
    with pytest.raises(ValueError, match="multiples of 7"):
        naive.hybrid_scale_attention(qg, kg, vg, qloc, kl, vl, hw=(H, W), reduced_hw=(hr, wr))
    out_n, imp_n = naive.hybrid_scale_attention(qg, kg, vg, qloc, kl, vl, hw=(H, W), reduced_hw=(hr, wr),
                                                strict=False)
    with sgattn.use_backend("reference"):
        out_r, imp_r = sgattn.hybrid_scale_attention(qg, kg, vg, qloc, kl, vl, hw=(H, W), reduced_hw=(hr, wr))
    assert rel_err(out_n, out_r) < TOL and rel_err(imp_n, imp_r) < TOL
    # self-guided op, sr 4 plan (49, 14, 7) on N = 90: parts 22, 44, 24 -> short groups
    C = 2 * h * d
    q = torch.randn(B, 2 * h, N, d, dtype=torch.float64)
    x = torch.randn(B, N, C, dtype=torch.float64)
    imp = torch.rand(B, H, W, dtype=torch.float64)
    w = [torch.randn(r, dtype=torch.float64) for r in (49, 14, 7)]
    b = [torch.randn(1, dtype=torch.float64) for _ in range(3)]
    kv = [torch.randn(C, C, dtype=torch.float64) / C ** 0.5, torch.randn(C, dtype=torch.float64)]
    args = (q, x, imp, kv[0], kv[1], kv[0].flip(0), kv[1].flip(0), w, b)
    with pytest.raises(ValueError, match="whole groups"):
        naive.self_guided_attention(*args, hw=(H, W))
    out_n = naive.self_guided_attention(*args, hw=(H, W), strict=False)
    with sgattn.use_backend("reference"):
        out_r = sgattn.self_guided_attention(*args, hw=(H, W))
    assert rel_err(out_n, out_r) < TOL


def test_naive_module_rejects_what_the_paper_cannot_run():
    m = naive.Attention(64, False, num_heads=2, sr_ratio=8)
    with pytest.raises(ValueError, match="multiples of 7"):
        m(torch.randn(1, 64 * 64, 64), 64, 64, None)
    with pytest.raises(ValueError, match="mask"):
        naive.Attention(64, True, num_heads=2, sr_ratio=8)(torch.randn(1, 49, 64), 7, 7, None)


def test_patched_naive_sgformer_s_equals_naive():
    torch.manual_seed(0)
    model = spread_(naive.naive_sgformer("sgformer_s").double().eval())
    patched = copy.deepcopy(model)
    assert sgattn.patch_model(patched) == sum(model.depths)
    assert not any(isinstance(m, naive.Attention) for m in patched.modules())
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad(), sgattn.use_backend("reference"):
        a, b = model(x), patched(x)
    assert rel_err(b, a) < TOL
