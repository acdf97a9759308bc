"""Backend agreement: one tolerance rule and one table of cases, shared by the
test suite (tests/test_backend_agreement.py, tests/test_fuzz.py) and ``sgattn check``.

The rule (flash-attention's): a backend's result ``out`` in dtype T agrees when
|out - ref64| <= factor * |ref_T - ref64| + 2 ulp_T * max|ref64| + extra
(elementwise max), where ref64 is the reference computed in float64 and ref_T
the reference computed from the same dtype-T inputs. The reference accumulates
in fp32, so ref_T's error is the rounding a correct fp32-accumulating kernel
also makes; the ulp term covers outputs whose reference error happens to be ~0;
``extra`` covers errors the reference cannot make (``flash_row_errors``). Every
run sees the same rounded input values, so the float64 reference has no input
rounding to hide behind. For float64 (no higher precision to compare with) the
fp32 reference of the same values stands in for ref_T, its error scaled by the
ratio of the unit roundoffs. The reference backend itself, being ref_T, is
held to float64 rounded to T instead (``REFERENCE_FACTORS``).

Adding an op's cases: write a builder returning ``Case(name, make, ...)``,
where ``make(gen, device)`` draws the float64 inputs that get gradients (every
random value from ``gen``) and returns ``(inputs, fn)``; ``fn(*tensors)`` calls
the public op (the runner forces the backend being checked) and returns its
outputs as a tuple; ``grad_outputs`` names the outputs that get a cotangent.
Append the rows to ``CASES``; ``check=True`` puts a row in ``sgattn check``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from typing import Callable

import torch

from . import composition, ops, reference
from .backends import BackendError, get_backend, select, use_backend

ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23, torch.float64: 2 ** -52}
LOW = (torch.float32, torch.float16, torch.bfloat16)
# The reference against float64 rounded to T: fp32 accumulation (out), longer
# chains (gradients), sums over B*M*C terms (reduction gradients).
REFERENCE_FACTORS = (8.0, 32.0, 128.0)
# A kernel against the reference: outputs, input gradients, and gradients that
# sum over B*M*C terms in another order than the reference's (torch sums
# pairwise, a kernel in blocks: the cpu kernel's weight gradient of a
# one-token self-guided group needed 8.8x the reference's own error).
KERNEL_FACTORS = (2.0, 3.0, 16.0)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    what: str
    ok: bool
    err: float
    bound: float
    note: str = ""

    def __str__(self):
        return f"{self.what}: {self.note or f'max error {self.err:.3e} vs fp64, bound {self.bound:.3e}'}"


def agreement(out, ref_same_dtype, ref64, *, factor=2.0, extra=0.0, ratio=1.0, what="output") -> Verdict:
    """The rule above; ``ratio`` scales ref_same_dtype's error (float64 outputs
    judged by an fp32 reference)."""
    if out.shape != ref64.shape:
        return Verdict(what, False, math.nan, 0.0, f"shape {tuple(out.shape)} != {tuple(ref64.shape)}")
    if not torch.isfinite(out).all():
        return Verdict(what, False, math.nan, 0.0, "not finite")
    scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1e-30
    bound = factor * ratio * max_err(ref_same_dtype, ref64) + 2 * ULP[out.dtype] * scale + extra
    err = max_err(out, ref64)
    return Verdict(what, err <= bound, err, bound)


def assert_close_to_reference(out, ref_same_dtype, ref64, factor=2.0, what="output", extra=0.0):
    v = agreement(out, ref_same_dtype, ref64, factor=factor, extra=extra, what=what)
    assert v.ok, f"{v} (factor {factor}, extra {extra:.3e}, dtype {out.dtype})"


def flash_row_errors(q, k, v, dout, out64, imp64, dq64, scale):
    """What a correct flash-style kernel, accumulating in fp32, may add beyond
    the reference's own error to the importance and the gradients.

    It takes delta_i = rowsum(dO_i * O_i) (a length-d fp32 dot: error
    e_delta <= d 2**-24 max_i sum_c |dO_ic O_ic|) and P = exp(s - lse_i) from a
    stored fp32 lse (one ulp: relative error rho = 2**-23 (max|s| + ln M) on
    every P of a row). Both are the same for all keys of a row, so they do not
    average out of dS_ij = P_ij (dP_ij - delta_i): its error is at most
    P_ij (e_delta + rho |dP_ij - delta_i|), with |dP_ij - delta_i| <= 2 max|dP|
    and sum_i P_ij <= h N max(importance) (importance: the mean over heads and
    queries). Hence importance (rho relative), dq_i = scale sum_j dS_ij k_j
    (sum_j P_ij = 1; dq_i scaled by rho), dk_j = scale sum_i dS_ij q_i and
    dv_j = sum_i P_ij dO_i. All from float64 values of the rounded inputs;
    for fp16/bf16 outputs the terms are far below one ulp.
    """
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    h, N, d, M = q.shape[1], q.shape[2], q.shape[3], k.shape[2]
    s_max = (q @ k.transpose(-1, -2)).abs().max().item() * scale
    dp_max = (dout @ v.transpose(-1, -2)).abs().max().item()
    e_delta = d * 2.0 ** -24 * (dout * out64.double()).abs().sum(-1).max().item()
    rho = 2.0 ** -23 * (s_max + math.log(M))
    col = h * N * imp64.max().item()
    return {"importance": rho * imp64.abs().max().item(),
            "dq": scale * k.abs().max().item() * e_delta + rho * dq64.abs().max().item(),
            "dk": scale * q.abs().max().item() * col * (e_delta + 2 * rho * dp_max),
            "dv": rho * dout.abs().max().item() * col}


def softmax_row_error(q, k, v, scale):
    """What fp32 logits cost the reference's output beyond rounding it: each
    s_ij is a length-d fp32 dot (error <= d 2**-24 scale sum_c |q_ic k_jc|) and
    exp(s - max) loses 2**-23 (max|s| + ln M) relative, both on every P of a
    row, so out_i = sum_j P_ij v_j moves by up to that times max|v|."""
    q, k, v = (t.double() for t in (q, k, v))
    d, M = q.shape[-1], k.shape[2]
    s_max = (q @ k.transpose(-1, -2)).abs().max().item() * scale
    dot = d * 2.0 ** -24 * scale * (q.abs() @ k.abs().transpose(-1, -2)).max().item()
    return (2.0 ** -23 * (s_max + math.log(M)) + dot) * v.abs().max().item()


def cancelled_gradient(grad, q, k, v, dout, scale, name) -> Verdict | None:
    """dq, dk of attention are exactly zero with one key per query (window 1,
    M = 1) and zero up to exp(-120) for a one-hot P: the softmax Jacobian
    cancels terms of size ~ scale d |dO| |v| |k| (dq; |q| and up to N queries
    per key for dk), which autograd cancels exactly but a flash backward
    (dS = P (dO.v - dO.o)) leaves at fp32 rounding of those terms. None when
    the float64 gradient is not such a zero (``grad`` is the float64 one)."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    other = k if name == "dq" else q * q.shape[2]
    terms = scale * q.shape[-1] * (dout.abs().max() * v.abs().max() * other.abs().max()).item()
    if grad.abs().max().item() > 2 ** -52 * terms:
        return None
    return Verdict(name, False, math.nan, 8 * 2 ** -23 * terms, "a cancelled (zero) gradient")


# --------------------------------------------------------------- the table --

@dataclasses.dataclass(frozen=True)
class Case:
    """One row: see the module docstring.

    attention: the row's inputs are (q, k, v) of one attention with these
        options (scale, window, hw) and its first output is the attention
        output: the flash allowances apply.
    out_factor: multiplies the output's factor (aggregation: group sums of up
        to 196 terms in another order; the cpu kernel's needed 4.9).
    cotangent_scale: the std of the output cotangents.
    reduction_from: inputs from this index on get gradients that sum over
        B*M*C terms (KERNEL_FACTORS[2]).
    slow: the dtypes skipped on emulated backends (Triton's interpreter; True:
        all), where another row covers the same plan faster.
    reference: False when the reference backend is not held to float64
        rounded to T on this row.
    check: the row is one of ``sgattn check``'s.
    """

    name: str
    make: Callable
    dtypes: tuple = LOW
    grad_outputs: tuple = (0,)
    layout: str = "contiguous"
    attention: dict | None = None
    out_factor: float = 1.0
    cotangent_scale: float = 1.0
    reduction_from: int = 10 ** 9
    slow: bool | tuple = False
    reference: bool = True
    check: bool = False

    def seed(self) -> int:
        return zlib.crc32(self.name.encode())


def arrange(t, layout):
    """``t`` with another memory layout; "broadcast" also changes the values
    (one batch item seen B times, stride 0), so it is applied to every copy."""
    if t.dim() < 2 or layout == "contiguous":
        return t.contiguous()
    if layout == "heads" and t.dim() == 4:  # a head view of a [B, L, h*d] projection, as the modules make it
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "transposed":  # last two dims swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a wider tensor: last-dim stride 2
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "broadcast" and t.dim() >= 3:
        return t[:1].expand(t.shape)
    return t.contiguous()


def _randn(gen, *shape, s=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * s


def attention_case(name, shape, *, window=None, hw=None, scale=None, spread=1.0, values=None,
                   importance=True, **kw):
    """A row of attention_with_importance (``importance=False``: sgattn.ops.attention).
    shape: (B, h, N, M, d[, dv]) of a normal (q, k, v) draw of std ``spread``,
    or None and ``values(gen)`` draws (q, k, v)."""
    def make(gen, device):
        if values is not None:
            qkv = values(gen)
        else:
            B, h, N, M, d, dv = shape if len(shape) == 6 else (*shape, shape[-1])
            qkv = [_randn(gen, B, h, L, e, s=spread) for L, e in ((N, d), (M, d), (M, dv))]

        def fn(q, k, v):
            if importance:
                return ops.attention_with_importance(q, k, v, scale=scale, window=window, hw=hw)
            return (ops.attention(q, k, v, scale=scale),)
        return [t.to(device) for t in qkv], fn
    return Case(name, make, attention=dict(scale=scale, window=window, hw=hw), **kw)


def _numerics(name, values, **kw):
    return attention_case(name, None, values=values, **kw)


def _large_ds(gen, D=32):
    # Nearly equal keys and |dO.v| ~ 1e6 (v ~ 1e4, cotangents ~ 100): ds = P (dP - delta) beyond fp16's 65504 while
    # dq, dk, dv are small (sum_j ds_ij = 0).
    B, h, N = 1, 2, 36
    q = _randn(gen, B, h, N, D, s=1e-2)
    k = _randn(gen, 1, 1, 1, D) + _randn(gen, B, h, N, D, s=1e-3)
    return q, k, _randn(gen, B, h, N, D, s=1e4)


def _saturated(gen, D=32):
    # Logits of std ~10 * sqrt(d) * d**-0.5: one key takes nearly all of each row.
    B, h, N = 1, 2, 36
    return _randn(gen, B, h, N, D, s=10.0), _randn(gen, B, h, N, D), _randn(gen, B, h, N, D)


def _tiny_tile(N, M, far, k_far, D=32):
    # q.k ~ 8 for the first keys, ~8 * k_far for keys from `far` on: every
    # query gives those probability ~exp(8 (k_far - 1)) (k_far -10: ~2**-127,
    # -11: ~2**-138, fp32 subnormal). With 64-key tiles they fill the last
    # (partial) key tile, whose largest |dS| is then below 2**-113. The other
    # components (std 0.1) spread the near keys' probabilities unevenly.
    def values(gen):
        q = _randn(gen, 1, 1, N, D, s=0.1)
        q[..., 0] = 8.0
        k = _randn(gen, 1, 1, M, D, s=0.1)
        k[..., 0] = 1.0
        k[..., far:, 0] = k_far
        return q, k, _randn(gen, 1, 1, M, D)
    return values


def _padded(hw, D=32):
    # Windows that do not tile the grid (partial windows, padded key and query
    # positions), logits of std ~4.
    def values(gen):
        B, h, N = 2, 2, hw[0] * hw[1]
        return _randn(gen, B, h, N, D, s=4.0), _randn(gen, B, h, N, D), _randn(gen, B, h, N, D)
    return values


def hybrid_case(name, B, hg, hl, hw, sr, d, window=7, **kw):
    H, W = hw
    rhw = (H // sr, W // sr)
    N, M = H * W, rhw[0] * rhw[1]

    def make(gen, device):
        shapes = [(B, hg, N, d), (B, hg, M, d), (B, hg, M, d), (B, hl, N, d), (B, hl, N, d), (B, hl, N, d)]

        def fn(*t):
            return ops.hybrid_scale_attention(*t, hw=hw, reduced_hw=rhw, window=window)
        return [_randn(gen, *s).to(device) for s in shapes], fn
    return Case(name, make, **kw)


def self_guided_case(name, B, heads, C, hw, groups, **kw):
    """Two orderings from a spread (tie-free) importance map, kv projections
    with biases, aggregation parameters last (their gradients are reductions)."""
    H, W = hw
    N = H * W

    def make(gen, device):
        imp = torch.randperm(B * N, generator=gen).reshape(B, H, W).to(device=device, dtype=torch.float32)
        inputs = [_randn(gen, B, heads, N, C // heads), _randn(gen, B, N, C),
                  _randn(gen, C, C, s=C ** -0.5), _randn(gen, C), _randn(gen, C, C, s=C ** -0.5), _randn(gen, C)]
        inputs += [_randn(gen, r, s=r ** -0.5) for r in groups] + [_randn(gen, 1) for _ in groups]
        P = len(groups)

        def fn(q, x, k1w, k1b, k2w, k2b, *wb):
            return (ops.self_guided_attention(q, x, imp, k1w, k1b, k2w, k2b, list(wb[:P]), list(wb[P:]),
                                                 hw=hw),)
        return [t.to(device) for t in inputs], fn
    return Case(name, make, reduction_from=6, **kw)


def aggregate_case(name, B, N, C, groups, G, public=False, ties=False, **kw):
    """backend.aggregate_sorted with G random orderings ([B, N] when G == 1);
    ``public``: sgattn.reallocate_tokens with a random importance instead
    (``ties``: four values only, the stable sort orders ties by token index)."""
    def make(gen, device):
        index = torch.stack([torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
                             for _ in range(G)]).to(device)
        index = index[0] if G == 1 else index
        imp = torch.rand(B, N, generator=gen)
        imp = (imp * 4).floor().to(device) if ties else imp.to(device)
        inputs = [_randn(gen, B, N, C)] + [_randn(gen, r, s=r ** -0.5) for r in groups]
        inputs += [_randn(gen, 1) for _ in groups]
        P = len(groups)

        def fn(x, *wb):
            if public:
                return (ops.reallocate_tokens(x, imp, list(wb[:P]), list(wb[P:])),)
            # select: the forced backend, or a BackendError naming why it cannot
            return (select("reallocate_tokens", (x,)).aggregate_sorted(x, index, list(wb[:P]), list(wb[P:])),)
        return [t.to(device) for t in inputs], fn
    return Case(name, make, reduction_from=1, out_factor=4.0, **kw)


def module_case(name, kind, dim, heads, sr, hw, B=2, **kw):
    """An sgattn.nn attention module (``kind``: its class name) with seeded
    parameters, differentiable in its input and every parameter (their
    gradients sum over the batch and tokens); outputs y and any importance
    masks it hands on. SelfGuidedAttention gets a spread (tie-free) mask."""
    H, W = hw

    def make(gen, device):
        from . import nn as snn
        module = getattr(snn, kind)(dim, num_heads=heads, qkv_bias=True, sr_ratio=sr).to(device)
        names = [n for n, _ in module.named_parameters()]
        # weights of std fan_in**-0.5 (well separated importance), others (norms, biases) 1 or 0 plus noise
        params = [_randn(gen, *p.shape, s=p[0].numel() ** -0.5) if p.dim() >= 2
                  else p.detach().double().cpu() + _randn(gen, *p.shape, s=0.1)
                  for p in module.parameters()]
        row = torch.stack([torch.randperm(H * W, generator=gen) for _ in range(B)]).to(device) / (H * W)
        mask = [row, row.clone()] if kind == "SelfGuidedAttention" else None

        def fn(x, *p):
            y, new_mask = torch.func.functional_call(module, dict(zip(names, p)), (x, H, W, mask))
            return (y, *(new_mask or ()))
        return [t.to(device) for t in [_randn(gen, B, H * W, dim)] + params], fn
    # the reference in fp32 through norms, projections and convolutions drifts
    # past REFERENCE_FACTORS from float64 rounded to fp32 (a self-guided grad: 1.3x)
    return Case(name, make, reduction_from=1, reference=False, **kw)


def _groups(sr):
    return composition.REALLOCATION_GROUPS[sr]


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CASES = [
    # global attention: odd sizes, tile edges, head dims, layouts
    attention_case("g-97x1-d32-one-key", (2, 2, 97, 1, 32), layout="heads"),
    attention_case("g-97x49-d24", (2, 2, 97, 49, 24), spread=2.0, layout="heads", check=True),
    attention_case("g-64x60-d40", (1, 3, 64, 60, 40), layout="transposed"),
    attention_case("g-33x147-d72", (2, 1, 33, 147, 72), layout="strided"),
    attention_case("g-33x130-d32", (2, 2, 33, 130, 32), layout="heads", dtypes=(F16, BF16)),
    attention_case("g-70x300-d24", (2, 2, 70, 300, 24), layout="heads", dtypes=(F32, F16)),
    attention_case("g-5x1-d16", (3, 2, 5, 1, 16), layout="broadcast"),
    attention_case("g-7x7-d8", (1, 2, 7, 7, 8), dtypes=(F32,)),
    attention_case("g-40x20-d16-dv48", (1, 3, 40, 20, 16, 48), dtypes=(F32,)),
    *[attention_case(f"g-20x30-d{d}", (1, 2, 20, 30, d), dtypes=(F16,)) for d in (16, 40, 72, 96, 128)],
    attention_case("g-50x20-d24-noimportance-scale0.3", (2, 2, 50, 20, 24), scale=0.3, importance=False,
                   layout="heads"),
    # the CPU backward's split over chunks of query blocks with fp32 dK/dV partials:
    # one head (16 chunks of 64 rows), and 8 heads of 49 keys (256-row blocks, 8 chunks each)
    attention_case("g-1025x17-d32-dv48", (1, 2, 1025, 17, 32, 48), layout="heads", slow=True),
    attention_case("g-1000x300-d32", (1, 1, 1000, 300, 32), layout="heads", slow=True),
    attention_case("g-2048x49-d16-dv24", (4, 2, 2048, 49, 16, 24), layout="heads", slow=True),
    # window attention: partial and padded windows, windows larger than the grid
    attention_case("w7-9x11-d24", (2, 2, 99, 99, 24), window=7, hw=(9, 11), layout="heads", check=True),
    attention_case("w7-14x14-d32", (1, 3, 196, 196, 32), window=7, hw=(14, 14), layout="heads", dtypes=(F16, BF16)),
    attention_case("w7-13x7-d40", (2, 2, 91, 91, 40), window=7, hw=(13, 7), layout="strided", dtypes=(F16, BF16)),
    attention_case("w4-5x6-d32", (2, 2, 30, 30, 32), window=4, hw=(5, 6), layout="heads"),
    attention_case("w4-5x6-d16-dv20", (1, 2, 30, 30, 16, 20), window=4, hw=(5, 6), dtypes=(F32,), slow=True),
    attention_case("w5-5x6-d40-dv72", (1, 2, 30, 30, 40, 72), window=5, hw=(5, 6), dtypes=(F16,)),
    attention_case("w7-3x2-larger-than-grid", (2, 2, 6, 6, 32), window=7, hw=(3, 2)),
    attention_case("w16-2x3-d8-larger-than-grid", (1, 1, 6, 6, 8), window=16, hw=(2, 3), dtypes=(F32,)),
    attention_case("w1-4x5-one-key", (2, 2, 20, 20, 16), window=1, hw=(4, 5), dtypes=(F32,), slow=True),
    # w = 12: a 144-token window in one 256-wide tile, padding on both axes
    attention_case("w12-13x5-d16", (1, 2, 65, 65, 16), window=12, hw=(13, 5), dtypes=(F16,)),
    # w = 9: 81 positions in a 128 block, sub-blocks and key chunks with split ds
    attention_case("w9-10x9-d16", (1, 2, 90, 90, 16), window=9, hw=(10, 9), dtypes=(F16, BF16)),
    # numerically hard values: dS beyond fp16's range, saturated rows, key tiles
    # every query gives a tiny but nonzero probability (a split dS tile's scale
    # must stay finite), padded windows with partial tiles
    _numerics("num-large_ds", _large_ds, cotangent_scale=100.0),
    _numerics("num-large_ds-window", _large_ds, window=4, hw=(6, 6), cotangent_scale=100.0),
    _numerics("num-saturated", _saturated),
    _numerics("num-saturated-window", _saturated, window=4, hw=(6, 6)),
    # N=64 queries, M=65 keys, the 65th far away, scale 1
    _numerics("num-tiny_tile", _tiny_tile(64, 65, 64, -10.0), scale=1.0),
    _numerics("num-tiny_tile-subnormal", _tiny_tile(64, 65, 64, -11.0), scale=1.0),
    # one 9x9 window of 81 tokens: its last 17 keys (the second key chunk) far away
    _numerics("num-tiny_tile-window", _tiny_tile(81, 81, 64, -10.0), window=9, hw=(9, 9), scale=1.0),
    _numerics("num-padded-window", _padded((5, 7)), window=4, hw=(5, 7)),
    _numerics("num-window-larger-than-grid", _padded((3, 4)), window=7, hw=(3, 4)),
    # compositions
    hybrid_case("hybrid-14x14-sr2", 2, 1, 1, (14, 14), 2, 32, check=True),
    hybrid_case("hybrid-9x10-sr2", 2, 2, 2, (9, 10), 2, 32, slow=(F32,)),
    hybrid_case("hybrid-14x14-sr4", 2, 2, 2, (14, 14), 4, 32, dtypes=(F16, BF16)),
    self_guided_case("self_guided-7x7-sr2", 2, 4, 32, (7, 7), _groups(2), check=True),
    self_guided_case("self_guided-9x10-sr4", 1, 2, 64, (9, 10), _groups(4)),
    # aggregation (float64 too: the CPU kernel takes it)
    aggregate_case("agg-3136-sr8-G2", 2, 3136, 40, _groups(8), 2, dtypes=(F32, BF16, F64), slow=(BF16,)),
    aggregate_case("agg-197-sr4-G1", 2, 197, 40, _groups(4), 1, dtypes=LOW + (F64,)),
    aggregate_case("agg-97-sr2-G2", 2, 97, 40, _groups(2), 2, dtypes=LOW + (F64,), slow=(F16, BF16)),
    aggregate_case("agg-50-sr8-G1", 2, 50, 40, _groups(8), 1, dtypes=(F32, F64)),
    aggregate_case("agg-3-sr2-G2", 2, 3, 40, _groups(2), 2, dtypes=(F32, F64)),
    aggregate_case("agg-97-(7,3,2)-G2", 2, 97, 24, (7, 3, 2), 2, layout="transposed"),
    aggregate_case("agg-60-sr4-G2", 2, 60, 24, _groups(4), 2),
    aggregate_case("agg-5-sr2-G2", 2, 5, 24, _groups(2), 2, dtypes=(F16,)),
    aggregate_case("reallocate_tokens-90-sr4", 2, 90, 16, _groups(4), 1, public=True, check=True),
    # the modules: projections, convolutions and norms around the ops
    module_case("module-hybrid-14x14-sr2", "HybridScaleAttention", 64, 4, 2, (14, 14), dtypes=(F32,)),
    module_case("module-hybrid-9x10-sr4", "HybridScaleAttention", 64, 4, 4, (9, 10), dtypes=(F32,)),
    module_case("module-hybrid-14x14-sr8", "HybridScaleAttention", 64, 2, 8, (14, 14), dtypes=(F32,), slow=True),
    module_case("module-hybrid-13x10-sr4", "HybridScaleAttention", 48, 4, 4, (13, 10), dtypes=(F32,), slow=True),
    module_case("module-self_guided-14x14-sr4", "SelfGuidedAttention", 64, 4, 4, (14, 14), dtypes=(F32,)),
    module_case("module-self_guided-9x10-sr2", "SelfGuidedAttention", 64, 4, 2, (9, 10), dtypes=(F32,)),
    module_case("module-self_guided-9x11-sr2", "SelfGuidedAttention", 32, 2, 2, (9, 11), dtypes=(F32,), slow=True),
    module_case("module-global-9x10", "GlobalAttention", 64, 4, 1, (9, 10), dtypes=(F32,)),
]


# -------------------------------------------------------------- the runner --

class Skipped(Exception):
    """The backend cannot run this row (the reason is the message)."""


def forward_backward(fn, inputs, cotangents=None, grad_outputs=(0,), cot_gen=None, cot_scale=1.0,
                     cot_dtype=torch.float64):
    """Outputs, input gradients and the cotangents of ``fn``; cotangents (std
    ``cot_scale``, rounded to ``cot_dtype``, held in float64) are drawn from
    ``cot_gen`` when not given, and rounded to each output's dtype."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if cotangents is None:
        cotangents = [(torch.randn(outs[i].shape, generator=cot_gen, dtype=torch.float64) * cot_scale)
                      .to(cot_dtype).double() for i in grad_outputs]
    diff = [outs[i] for i in grad_outputs]
    grads = torch.autograd.grad(diff, leaves, [c.to(o.device, o.dtype) for c, o in zip(cotangents, diff)],
                                allow_unused=True)
    return [o.detach() for o in outs], list(grads), cotangents


def compare(case: Case, backend: str, dtype, device, around=contextlib.nullcontext) -> list[Verdict]:
    """Run ``case`` on ``backend`` in ``dtype`` and judge every output and input
    gradient by the rule; raises Skipped when the backend cannot run it.
    ``around()``: a context entered around the backend's own run."""
    if backend == "reference" and not case.reference:
        raise Skipped("the reference backend in this dtype is the row's ref_T: judged by nothing else")
    if (case.slow is True or dtype in (case.slow or ())) and get_backend(backend).emulated:
        raise Skipped(f"{backend} runs on an emulator here: too slow for this size")
    gen = torch.Generator().manual_seed(case.seed())
    raw, fn = case.make(gen, device)
    low = F32 if dtype == F64 else dtype
    values = [arrange(t.to(low).double(), case.layout) for t in raw]  # what every run sees
    dtype_in = [arrange(t.to(dtype), case.layout) for t in values]
    cot_gen = torch.Generator().manual_seed(case.seed() + 1)
    try:
        with use_backend(backend), around():
            out, grads, cots = forward_backward(fn, dtype_in, grad_outputs=case.grad_outputs, cot_gen=cot_gen,
                                                  cot_scale=case.cotangent_scale, cot_dtype=low)
    except BackendError as exc:
        raise Skipped(str(exc)) from None
    with use_backend("reference"):
        low_in = dtype_in if low == dtype else [arrange(t.to(low), case.layout) for t in values]
        ref_out, ref_grads, _ = forward_backward(fn, low_in, cots, case.grad_outputs)
        out64, grads64, _ = forward_backward(fn, values, cots, case.grad_outputs)
    ratio = ULP[F64] / ULP[F32] if dtype == F64 else 1.0
    o_factor, g_factor, r_factor = KERNEL_FACTORS
    o_factor *= case.out_factor
    if backend == "reference":  # ref_T itself: against float64 rounded to T
        ref_out = [t.to(o.dtype) for t, o in zip(out64, out)]
        ref_grads = [None if g is None else g.to(dtype) for g in grads64]
        o_factor, g_factor, r_factor = REFERENCE_FACTORS
    extra, scale = {}, None
    if case.attention is not None:  # flash allowances, from float64 values
        scale = case.attention["scale"] or values[0].shape[-1] ** -0.5
        imp64 = reference.attention(*values[:3], **{**case.attention, "scale": scale})[1]
        extra = flash_row_errors(*values[:3], cots[0], out64[0], imp64, grads64[0], scale)
        if backend == "reference":
            extra["out"] = softmax_row_error(*values[:3], scale)
    verdicts = []
    want = ref_out if dtype == low else out64
    for i, (o, r, r64, w) in enumerate(zip(out, ref_out, out64, want)):
        name = "out" if i == 0 else ("importance" if extra else f"out[{i}]")
        if o.dtype != w.dtype:
            verdicts.append(Verdict(name, False, math.nan, 0.0, f"dtype {o.dtype}, expected {w.dtype}"))
            continue
        verdicts.append(agreement(o, r, r64, factor=o_factor, ratio=ratio, extra=extra.get(name, 0.0), what=name))
    names = ("dq", "dk", "dv") if extra else [f"grad[{i}]" for i in range(len(grads))]
    for i, (g, r, r64) in enumerate(zip(grads, ref_grads, grads64)):
        name = names[i]
        if r64 is None:
            continue
        if g is None:
            verdicts.append(Verdict(name, False, math.nan, 0.0, "missing"))
            continue
        if g.dtype != dtype_in[i].dtype:
            verdicts.append(Verdict(name, False, math.nan, 0.0, f"dtype {g.dtype}, expected {dtype_in[i].dtype}"))
            continue
        if extra and name in ("dq", "dk"):
            zero = cancelled_gradient(r64, *values[:3], cots[0], scale, name)
            if zero is not None:
                ok = bool(torch.isfinite(g).all()) and g.abs().max().item() <= zero.bound
                verdicts.append(dataclasses.replace(zero, ok=ok, err=g.abs().max().item()))
                continue
        factor = r_factor if i >= case.reduction_from else g_factor
        verdicts.append(agreement(g, r, r64, factor=factor, ratio=ratio, extra=extra.get(name, 0.0), what=name))
    return verdicts
