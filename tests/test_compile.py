"""torch.compile as users run it: the default inductor backend, fullgraph=True,
the default ``dynamic=None`` (a second input size recompiles with dynamic
shapes, a third reuses that graph), forward and backward, equal to eager; and
a whole model in training with ``dynamic=True`` at three sizes.

The self-guided module is compared on a fixed importance pair: its sort makes
end-to-end fp32 comparisons tie-sensitive.
"""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import sgattn
from sgattn import nn as sgnn

RESOLUTIONS = [(9, 10), (12, 14), (7, 16)]
# What a CPU user gets: the native kernels when built, else the reference. An
# inductor compile costs ~30 s per graph on 2 cores, so inductor runs one
# backend; the reference backend is traced with aot_eager further below.
INDUCTOR_BACKEND = "cpu" if sgattn.available_backends()["cpu"] is None else "reference"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mask(B, H, W):
    imp = torch.rand(B, H, W)
    return [imp.reshape(B, H * W), imp.transpose(1, 2).reshape(B, H * W)]


def _compare(module, compiled, x, H, W, mask, tol):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_mask = compiled(xa, H, W, mask)
    ref, ref_mask = module(xb, H, W, mask)
    torch.testing.assert_close(out, ref, **tol)
    if ref_mask is not None:
        for a, b in zip(out_mask, ref_mask):
            torch.testing.assert_close(a, b, **tol)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for p in module.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("backend", [INDUCTOR_BACKEND])
@pytest.mark.parametrize("mask_kind,sr", [(False, 2), (True, 2), (False, 1)], ids=["hybrid", "self_guided", "global"])
def test_modules_compile_with_inductor_at_three_resolutions(backend, mask_kind, sr):
    module = sgnn.Attention(32, mask_kind, num_heads=4, qkv_bias=True, sr_ratio=sr)
    compiled = torch.compile(module, fullgraph=True)
    tol = dict(rtol=1e-4, atol=1e-5)  # inductor reorders fp32 reductions (LayerNorm, linear epilogues)
    with sgattn.use_backend(backend):
        for H, W in RESOLUTIONS:
            module.zero_grad()
            mask = _mask(2, H, W) if isinstance(module, sgnn.SelfGuidedAttention) else None
            _compare(module, compiled, torch.randn(2, H * W, 32), H, W, mask, tol)


@pytest.mark.parametrize("backend", [INDUCTOR_BACKEND])
def test_module_compiles_under_autocast(backend):
    module = sgnn.Attention(32, True, num_heads=4, qkv_bias=True, sr_ratio=2)
    compiled = torch.compile(module, fullgraph=True)
    H, W = 9, 10
    mask = _mask(2, H, W)
    with sgattn.use_backend(backend), torch.autocast("cpu", torch.bfloat16):
        # bf16 has 8 bits of mantissa: inductor's fused bf16 casts may round differently
        _compare(module, compiled, torch.randn(2, H * W, 32), H, W, mask, dict(rtol=2e-2, atol=2e-2))


@pytest.mark.parametrize("mask_kind,sr", [(False, 2), (True, 2), (False, 1)], ids=["hybrid", "self_guided", "global"])
def test_modules_trace_fullgraph_on_the_reference_backend(mask_kind, sr):
    module = sgnn.Attention(32, mask_kind, num_heads=4, qkv_bias=True, sr_ratio=sr)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with sgattn.use_backend("reference"):
        for H, W in RESOLUTIONS[:2]:
            module.zero_grad()
            mask = _mask(2, H, W) if isinstance(module, sgnn.SelfGuidedAttention) else None
            _compare(module, compiled, torch.randn(2, H * W, 32), H, W, mask, dict(rtol=1e-5, atol=1e-6))


# landscape, portrait, square (stage-1 grids 24x20, 20x28, 18x18). A square first size would
# give H and W one symbol (duck sizing) and a recompile at the first non-square one; the
# model's own img_size (64: grid 16x16) uses the stored position embedding, not resampled:
# another branch, another graph.
MODEL_SIZES = [(96, 80), (80, 112), (72, 72)]


def _train_compiled_and_eager(compiled, model, eager):
    """fwd+bwd of the compiled and the eager copy at MODEL_SIZES, compared.

    Tolerance: at random initialisation the importance maps are near-uniform
    (cv ~0.01), so fp32 rounding (eager vs float64: 2e-7 of the output) can
    swap near-tied tokens in the sort; such a swap moves the output by up to
    1.1e-4 of its largest value and single parameters' gradients by up to 70%
    (eager fp32 vs eager float64, same weights and inputs). So the check is on
    the output (2e-3 of its largest value) and on the gradient of all
    parameters as one vector (2e-2 relative, L2); a wrong graph is off by O(1).
    """
    for H, W in MODEL_SIZES:
        x = torch.randn(2, 3, H, W)
        out = compiled(x)
        out.square().sum().backward()
        ref = eager(x)
        ref.square().sum().backward()
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-3, (H, W)
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        want = torch.cat([p.grad.flatten() for p in eager.parameters()])
        assert ((got - want).norm() / want.norm()).item() < 2e-2, (H, W)
        model.zero_grad()
        eager.zero_grad()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_whole_model_trains_compiled_at_three_sizes(compiler):
    """The tiny SG-Former (every block kind: hybrid-scale, self-guided, plain;
    stem, patch merging, position-embedding resampling) compiled whole with
    dynamic shapes, in training, at three sizes, forward and backward, against
    eager. Traced through AOT autograd, sgattn's code adds no guard on the
    sizes: one graph serves all three. Inductor still recompiles when the
    stage-1 grid changes (a guard on a channels-last stride,
    32*ceil(W/4) == 640 at 96x80): at most one graph per size."""
    from torch._dynamo.utils import counters

    from sgattn.demo import tiny_sgformer
    torch.manual_seed(0)
    model = tiny_sgformer().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=compiler)
    counters.clear()
    with sgattn.use_backend(INDUCTOR_BACKEND):
        _train_compiled_and_eager(compiled, model, eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1 if compiler == "aot_eager" else graphs <= len(MODEL_SIZES), dict(counters["stats"])


def test_first_call_inside_a_compiled_region_in_a_fresh_process():
    # Nothing may be imported or loaded lazily while dynamo traces the first op call.
    code = textwrap.dedent("""
        import torch, sgattn
        f = torch.compile(lambda q, k, v: sgattn.attention_with_importance(q, k, v), fullgraph=True,
                          backend="aot_eager")
        q = torch.randn(1, 2, 20, 16)
        out, imp = f(q, q, q)
        ref, ref_imp = sgattn.attention_with_importance(q, q, q)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(imp, ref_imp)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
