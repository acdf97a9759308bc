"""Seeded fuzz: every backend that runs here against the float64 reference, over
random shapes (primes, tile edges, windows larger than the grid), dtypes,
memory layouts (head views, strided last dims, broadcast batches) and value
scales (down to saturated softmax) and value structures (key tiles every query
gives a tiny but nonzero probability, fully saturated rows), forward and backward.

Tensors live on the test device (CUDA when a GPU is present, so the GPU
backends are fuzzed there). Tolerances follow tests/tolerance.py. The case list is drawn from a fixed seed
so a failure reproduces; ``SGATTN_FUZZ_SEED`` and ``SGATTN_FUZZ_CASES`` draw
other or more cases locally.
"""
import os
import random
import zlib

import pytest
import torch

import sgattn
from sgattn import reference
from sgattn.backends import get_backend
from conftest import DEVICE
from tolerance import assert_close_to_reference, flash_row_errors

SEED = int(os.environ.get("SGATTN_FUZZ_SEED", "20261125"))
CASES = int(os.environ.get("SGATTN_FUZZ_CASES", "10"))
BACKENDS = [name for name, why in sgattn.available_backends().items() if why is None]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EDGES = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 49, 63, 64, 65, 97, 127, 128, 129, 131, 255, 256, 257)
HEAD_DIMS = (16, 24, 32, 40, 64, 72, 128)
LAYOUTS = ("contiguous", "heads", "strided", "broadcast")
SCALES = (0.05, 1.0, 6.0)  # 6: scores of ~36*sqrt(d)*scale, a saturated softmax
# Every third case has each structure (the shapes stay random):
# randn: the scaled normal inputs alone;
# tiny_tail: every query gives the keys from a cut on (a whole key tile when
#   the cut is a multiple of the tile) probability exp(-gap), gap 80..100
#   nats: ~2**-115..2**-144, down to fp32 subnormals;
# saturated_row: one key outscores every other by 120 nats: P is one-hot in fp32.
VALUES = ("randn", "tiny_tail", "saturated_row")


def _layout(t64, layout, rng):
    """t64 [B, h, L, d] as a tensor with the same values and another memory layout."""
    B, h, L, d = t64.shape
    if layout == "heads":  # a head view of a [B, L, h*d] projection, as the modules make it
        return t64.transpose(1, 2).reshape(B, L, h * d).reshape(B, L, h, d).transpose(1, 2)
    if layout == "strided":  # every other element of a wider tensor: last-dim stride 2
        wide = torch.zeros(B, h, L, 2 * d, dtype=t64.dtype, device=t64.device)
        wide[..., ::2] = t64
        return wide[..., ::2]
    if layout == "broadcast" and B > 1:  # one batch item seen B times (stride 0)
        return t64[:1].expand(B, h, L, d)
    return t64.contiguous()


def _attention_case(rng):
    B, h = rng.choice((1, 2, 3)), rng.choice((1, 2, 3))
    d = rng.choice(HEAD_DIMS)
    if rng.random() < 0.5:
        N, M, window, hw = rng.choice(EDGES), rng.choice(EDGES), None, None
    else:
        H, W = rng.randint(1, 19), rng.randint(1, 19)
        N = M = H * W
        window, hw = rng.choice((1, 2, 3, 5, 7, 7, 8, 9, 12, 16, 40)), (H, W)
    return dict(B=B, h=h, N=N, M=M, d=d, window=window, hw=hw, dtype=rng.choice(DTYPES),
                layout=rng.choice(LAYOUTS), scale=rng.choice(SCALES))


def _cases(kind):
    rng = random.Random(f"{SEED}-{kind}")
    if kind == "attention":
        return [dict(_attention_case(rng), values=VALUES[i % len(VALUES)]) for i in range(CASES)]
    return [_realloc_case(rng) for _ in range(CASES)]


def _structure(q64, k64, case, rng):
    """Overwrite component 0 of q and k (float64, [B, h, L, d]) for the case's
    value structure; the other components keep the random draw."""
    d, M = q64.shape[-1], k64.shape[2]
    if case["values"] == "tiny_tail" and M > 1:
        cut = rng.choice([c for c in (16, 32, 64, 128, 256) if c < M] or [M - 1])
        gap = rng.choice((80.0, 90.0, 100.0))  # nats between the near keys' scores and the cut-off ones'
        q64.mul_(0.1 / case["scale"])  # small spread around the structure
        k64.mul_(0.1 / case["scale"])
        q64[..., 0] = gap * d ** 0.5 / 11  # default scale d**-0.5: near keys k0 = 1, cut-off keys k0 = -10
        k64[..., 0] = 1.0
        k64[..., cut:, 0] = -10.0
    elif case["values"] == "saturated_row":
        q64[..., 0] = 120.0 * d ** 0.5
        k64[..., 0] = 0.0
        k64[..., rng.randrange(M), 0] = 1.0


def _case_id(c):
    return "-".join(f"{k}{v}" for k, v in c.items() if k not in ("dtype",)) + f"-{str(c['dtype'])[6:]}"


def _skip_reason(backend, op, tensors, **options):
    b = get_backend(backend)
    return b.unavailable() or (b.unsupported(op, tensors, **options) if tensors[0].shape[0] else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases("attention"), ids=_case_id)
def test_fuzz_attention(backend, case):
    B, h, N, M, d, dtype = case["B"], case["h"], case["N"], case["M"], case["d"], case["dtype"]
    window, hw = case["window"], case["hw"]
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    q64, k64, v64 = (torch.randn(B, h, L, d, dtype=torch.float64, generator=gen) * case["scale"] for L in (N, M, M))
    rng = random.Random(_case_id(case))
    _structure(q64, k64, case, rng)
    q64, k64, v64 = (t.to(DEVICE) for t in (q64, k64, v64))
    inputs = [_layout(t.to(dtype), case["layout"], rng) for t in (q64, k64, v64)]
    why = _skip_reason(backend, "attention_with_importance", inputs, window=window)
    if why:
        pytest.skip(f"{backend}: {why}")
    leaves_T = [t.detach().requires_grad_() for t in inputs]
    leaves_R = [t.detach().clone().requires_grad_() for t in inputs]
    leaves_64 = [t.detach().requires_grad_() for t in (q64, k64, v64)]
    with sgattn.use_backend(backend):
        out, imp = sgattn.attention_with_importance(*leaves_T, window=window, hw=hw)
    ref_out, ref_imp = reference.attention(*leaves_R, window=window, hw=hw)
    out64, imp64 = reference.attention(*leaves_64, window=window, hw=hw)
    assert out.dtype == dtype and out.shape == out64.shape and imp.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(imp).all()
    assert_close_to_reference(out, ref_out, out64, what=f"{backend} out")
    grad64 = torch.randn(out64.shape, dtype=torch.float64, generator=gen).to(DEVICE)
    out.backward(grad64.to(dtype))
    ref_out.backward(grad64.to(dtype))
    out64.backward(grad64)
    extra = flash_row_errors(q64, k64, v64, grad64, out64, imp64, leaves_64[0].grad, d ** -0.5)
    assert_close_to_reference(imp, ref_imp, imp64, what=f"{backend} importance", extra=extra["importance"])
    # One key per query (M == 1, window 1) makes dq and dk exactly zero, and a
    # one-hot P (saturated_row) zero up to exp(-120): the softmax Jacobian
    # cancels terms of size ~ scale * |dO| |v| |k| d, which a kernel
    # accumulating in fp32 leaves at fp32 rounding of those terms.
    terms = d ** 0.5 * grad64.abs().max() * v64.abs().max() * k64.abs().max().clamp(min=q64.abs().max())
    for name, t, r, t64 in zip("qkv", leaves_T, leaves_R, leaves_64):
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
        if t64.grad.abs().max() <= 2 ** -52 * terms:
            assert t.grad.abs().max() <= 8 * 2 ** -23 * terms, f"{backend} d{name} of a zero"
        else:
            assert_close_to_reference(t.grad, r.grad, t64.grad, what=f"{backend} d{name}", extra=extra[f"d{name}"])


def _realloc_case(rng):
    N = rng.choice(EDGES[3:] + (196, 300, 784))
    parts = rng.choice((2, 3))
    sizes = [rng.randint(1, max(1, N // 4)) for _ in range(parts)]
    return dict(B=rng.choice((1, 2, 3)), N=N, C=rng.choice((1, 8, 24, 64, 100)), sizes=tuple(sizes),
                ties=rng.random() < 0.4, dtype=rng.choice(DTYPES), strided=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases("reallocation"), ids=_case_id)
def test_fuzz_reallocation(backend, case):
    B, N, C, dtype = case["B"], case["N"], case["C"], case["dtype"]
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    x64 = torch.randn(B, N, C, dtype=torch.float64, generator=gen).to(DEVICE)
    imp = torch.rand(B, N, generator=gen)
    if case["ties"]:  # many exact ties: the stable sort must order them by token index everywhere
        imp = (imp * 4).floor()
    imp = imp.to(DEVICE)
    w64 = [(torch.randn(r, dtype=torch.float64, generator=gen) / r ** 0.5).to(DEVICE) for r in case["sizes"]]
    b64 = [torch.randn(1, dtype=torch.float64, generator=gen).to(DEVICE) for _ in case["sizes"]]
    x = x64.to(dtype)
    if case["strided"]:  # tokens as a transposed view of a [B, C, N] tensor
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    why = _skip_reason(backend, "reallocate_tokens", [x])
    if why:
        pytest.skip(f"{backend}: {why}")

    def run(x_in, ws, bs, use=None):
        leaves = [x_in.detach().requires_grad_()] + [t.detach().requires_grad_() for t in ws + bs]
        with sgattn.use_backend(use):
            out = sgattn.reallocate_tokens(leaves[0], imp, leaves[1:1 + len(ws)], leaves[1 + len(ws):])
        return out, leaves

    out, leaves = run(x, [w.to(dtype) for w in w64], [b.to(dtype) for b in b64], backend)
    ref, ref_leaves = run(x, [w.to(dtype) for w in w64], [b.to(dtype) for b in b64], "reference")
    out64, leaves64 = run(x64, w64, b64, "reference")
    assert out.dtype == dtype and out.shape == out64.shape
    assert_close_to_reference(out, ref, out64, what=f"{backend} reallocation")
    grad64 = torch.randn(out64.shape, dtype=torch.float64, generator=gen).to(DEVICE)
    for o, g in ((out, grad64.to(dtype)), (ref, grad64.to(dtype)), (out64, grad64)):
        o.backward(g)
    for i, (t, r, t64) in enumerate(zip(leaves, ref_leaves, leaves64)):
        assert_close_to_reference(t.grad, r.grad, t64.grad, what=f"{backend} grad of input {i}")
