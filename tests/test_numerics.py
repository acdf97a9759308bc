"""Numerically hard attention inputs, one table, every backend, every dtype.

Each row is a case a kernel has got wrong or could get wrong: dS beyond fp16's
range, saturated softmax rows, key tiles that every query attends to with a
tiny but nonzero probability (the scale of a split dS tile must stay finite),
and windows with padded (fully masked) positions and partial tiles. Every
backend present runs every row in fp32, fp16 and bf16 (the GPU backends where a
GPU is, the Triton one under the interpreter otherwise), forward and backward,
against the float64 reference of the same rounded inputs with the tolerance
rule of tests/tolerance.py. For the reference backend the bound is its own
error, so its rows check that it stays finite.
"""
import pytest
import torch

import sgattn
from sgattn import reference
from sgattn.backends import get_backend
from conftest import DEVICE
from tolerance import assert_close_to_reference, flash_row_errors

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
D = 32


def _randn(g, *shape, s=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * s


def _large_ds(g):
    # Nearly equal keys and |dO.v| ~ 1e6: ds = P (dP - delta) ~ 1e5 is beyond
    # fp16's 65504 while dq, dk, dv are small (sum_j ds_ij = 0).
    B, h, N = 1, 2, 36
    q = _randn(g, B, h, N, D, s=1e-2)
    k = _randn(g, 1, 1, 1, D) + _randn(g, B, h, N, D, s=1e-3)
    return q, k, _randn(g, B, h, N, D, s=1e4), _randn(g, B, h, N, D, s=100.0)


def _saturated(g):
    # Logits of std ~10 * sqrt(d) * d**-0.5: one key takes nearly all of each row.
    B, h, N = 1, 2, 36
    return _randn(g, B, h, N, D, s=10.0), _randn(g, B, h, N, D), _randn(g, B, h, N, D), _randn(g, B, h, N, D)


def _tiny_tile(g, N, M, far, k_far):
    # q.k ~ 8 for the first keys, ~8 * k_far for keys from `far` on: every
    # query gives those probability ~exp(8 (k_far - 1)) (k_far -10: ~2**-127,
    # -11: ~2**-138, fp32 subnormal). With 64-key tiles they fill the last
    # (partial) key tile, whose largest |dS| is then below 2**-113. The other
    # components (std 0.1) spread the near keys' probabilities unevenly.
    q = _randn(g, 1, 1, N, D, s=0.1)
    q[..., 0] = 8.0
    k = _randn(g, 1, 1, M, D, s=0.1)
    k[..., 0] = 1.0
    k[..., far:, 0] = k_far
    return q, k, _randn(g, 1, 1, M, D), _randn(g, 1, 1, N, D)


def _padded(g, hw):
    # Windows that do not tile the grid (partial windows, padded key and query
    # positions), logits of std ~4.
    B, h, N = 2, 2, hw[0] * hw[1]
    return (_randn(g, B, h, N, D, s=4.0), _randn(g, B, h, N, D), _randn(g, B, h, N, D),
            _randn(g, B, h, N, D))


# name: (inputs(generator), window, hw, scale)
CASES = {
    "large_ds": (_large_ds, None, None, None),
    "large_ds-window": (_large_ds, 4, (6, 6), None),
    "saturated": (_saturated, None, None, None),
    "saturated-window": (_saturated, 4, (6, 6), None),
    # the recipe: N=64 queries, M=65 keys, the 65th far away, scale 1
    "tiny_tile": (lambda g: _tiny_tile(g, 64, 65, 64, -10.0), None, None, 1.0),
    "tiny_tile-subnormal": (lambda g: _tiny_tile(g, 64, 65, 64, -11.0), None, None, 1.0),
    # one 9x9 window of 81 tokens: its last 17 keys (the second key chunk) far away
    "tiny_tile-window": (lambda g: _tiny_tile(g, 81, 81, 64, -10.0), 9, (9, 9), 1.0),
    "padded-window": (lambda g: _padded(g, (5, 7)), 4, (5, 7), None),
    "window-larger-than-grid": (lambda g: _padded(g, (3, 4)), 7, (3, 4), None),
}
BACKENDS = list(sgattn.available_backends())


def _device(backend):
    return "cpu" if backend == "cpu" else DEVICE


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_numerics_table(backend, case, dtype):
    make, window, hw, scale = CASES[case]
    device = _device(backend)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    q, k, v, dout = (t.to(dtype).to(device) for t in make(g))
    be = get_backend(backend)
    why = be.unavailable() or be.unsupported("attention_with_importance", (q, k, v), window=window)
    if why:
        pytest.skip(f"{backend}: {why}")

    def run(inputs, grad, use):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with sgattn.use_backend(use):
            out, imp = sgattn.attention_with_importance(*leaves, scale=scale, window=window, hw=hw)
        out.backward(grad)
        return out, imp, [t.grad for t in leaves]

    out, imp, grads = run((q, k, v), dout, backend)
    ref_out, ref_imp, ref_grads = run((q, k, v), dout, "reference")
    out64, imp64, grads64 = run([t.double() for t in (q, k, v)], dout.double(), "reference")
    assert out.dtype == dtype and imp.dtype == torch.float32
    for name, t in [("out", out), ("importance", imp)] + list(zip(("dq", "dk", "dv"), grads)):
        assert torch.isfinite(t).all(), f"{backend} {name} not finite"
    # fp32: a flash-style kernel's row-coherent errors (tests/tolerance.py)
    extra = flash_row_errors(q, k, v, dout, out64, imp64, grads64[0], q.shape[-1] ** -0.5 if scale is None else scale)
    assert_close_to_reference(out, ref_out, out64, what=f"{backend} out")
    assert_close_to_reference(imp, ref_imp, imp64, what=f"{backend} importance", extra=extra["importance"])
    for name, a, r, r64 in zip(("dq", "dk", "dv"), grads, ref_grads, grads64):
        assert a.dtype == dtype
        assert_close_to_reference(a, r, r64, what=f"{backend} {name}", extra=extra[name])
