"""Triton backend's attention mass (``sgattn.triton.ops``: triton_mass_attention_fwd
/ _bwd, triton_mass_from_lse on the generalised global-attention kernels): what
tests/test_mass.py's backend agreement (outputs and masses of every option)
does not check: gradients against the float64 oracle (causal, grouped-query
heads, key padding, queries that see no key, tile-edge key counts), the mass
from a given lse, the varlen forms, the torch.library registration, run-to-run
determinism and argument errors.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest) or on a GPU; the
interpreter is slow, so the shapes are small.
"""
import math

import pytest
import torch

import sgattn
from sgattn import reference
from sgattn.backends import get_backend
from tolerance import assert_close_to_reference, flash_row_errors

pytestmark = pytest.mark.skipif(get_backend("triton").unavailable() is not None,
                                reason=f"triton backend unavailable: {get_backend('triton').unavailable()}")

LOW = (torch.float32, torch.bfloat16, torch.float16)
D = 16


def ops():
    return torch.ops.sgattn


def inputs(B, Hq, Hkv, Lq, Lk, device, dtype=torch.float64, seed=0, padded=False, d=D):
    """q, k, v (float64 values rounded to dtype) and (padded) a key padding mask
    with batch entry 0 padded entirely (its queries see no key)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(dtype).to(device)
               for H, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    mask = None
    if padded:
        mask = torch.rand(B, Lk, generator=g) < 0.3
        mask[0] = True
        mask = mask.to(device)
    return q, k, v, mask


def mass_error(q, k, mass64):
    """tests/test_mass.py's flash allowance: one ulp of max|s| + ln Lk on every P."""
    q, k = q.double().cpu(), k.double().cpu().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s_max = (q @ k.transpose(-1, -2)).abs().max().item() * q.shape[-1] ** -0.5
    return 2.0 ** -23 * (s_max + math.log(k.shape[2])) * mass64.abs().max().item()


# (B, Hq, Hkv, Lq, Lk, causal, padded): GQA and MQA, Lq > Lk (queries with no key),
# key counts at a tile edge (63, 64, 65), a fully padded batch entry
GRAD_CASES = [
    (2, 4, 2, 17, 16, True, False), (1, 2, 2, 16, 65, True, True), (1, 4, 1, 33, 7, True, False),
    (2, 2, 2, 20, 64, False, True), (1, 2, 1, 9, 63, False, False),
]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("dtype", LOW)
def test_gradients_match_the_float64_oracle(case, dtype, device):
    """dq, dk, dv (dk, dv summed over each kv head's query heads) against the
    oracle's in float64, within the agreement rule plus flash_row_errors'
    allowance (P from a stored fp32 lse, delta a length-d fp32 dot)."""
    B, Hq, Hkv, Lq, Lk, causal, padded = case
    q64, k64, v64, mask = inputs(B, Hq, Hkv, Lq, Lk, "cpu", seed=Lq + Lk, padded=padded)
    dout = torch.randn(B, Hq, Lq, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low = [t.to(dtype) for t in (q64, k64, v64)]
    # the rounded values in float64: the rule's ref64
    q64, k64, v64 = (t.double() for t in low)

    def grads(backend, q, k, v, mask, dout):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with sgattn.use_backend(backend):
            out, mass = sgattn.attention_with_mass(q, k, v, causal=causal, key_padding_mask=mask,
                                                   mass_reduce="mean", mass_heads="mean")
        return (out, mass, *torch.autograd.grad(out, (q, k, v), dout.to(q.dtype)))

    out64, imp64, *want64 = grads("reference", q64, k64, v64, mask, dout)
    want = grads("reference", *low, mask, dout)[2:]
    got = grads("triton", *(t.to(device) for t in low), None if mask is None else mask.to(device),
                dout.to(device))
    out, grads_ = got[0], got[2:]
    g = Hq // Hkv
    extra = flash_row_errors(q64, k64.repeat_interleave(g, 1), v64.repeat_interleave(g, 1), dout,
                             out64, imp64, want64[0], D ** -0.5)
    for name, gr, w, w64 in zip("qkv", grads_, want, want64):
        assert gr.dtype == dtype and gr.shape == w64.shape and torch.isfinite(gr).all()
        assert_close_to_reference(gr.cpu(), w, w64, what=f"d{name} {case} {dtype}", extra=extra[f"d{name}"])
    # queries that see no key: out 0 and dq 0 exactly
    seen = torch.ones(B, Lq, dtype=torch.bool)
    if causal:
        seen &= (torch.arange(Lq) + Lk - Lq >= 0)[None]
    if mask is not None:
        seen[0] = False
    assert torch.isfinite(out).all() and not out.cpu()[~seen[:, None, :].expand(B, Hq, Lq)].any()
    assert not grads_[0].cpu()[~seen[:, None, :].expand(B, Hq, Lq)].any()


@pytest.mark.parametrize("d", [64, 128])
def test_the_plans_mass_overrides_compute_the_same(d, device):
    """fp32 with tf32 allowed at head dims 64 and 128 takes the plans' mass
    overrides (smaller forward query tiles, dK/dV key tiles of 16, other warps):
    outputs, mass and gradients still match the oracle."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        q, k, v, mask = inputs(1, 4, 2, 40, 37, device, torch.float32, seed=d, padded=False, d=d)
        mask = torch.zeros(1, 37, dtype=torch.bool, device=device)
        mask[0, 5:9] = True
        dout = torch.randn(1, 4, 40, d, generator=torch.Generator().manual_seed(2)).to(device)

        def run(backend, q, k, v, mask, dout):
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            with sgattn.use_backend(backend):
                out, mass = sgattn.attention_with_mass(q, k, v, causal=True, key_padding_mask=mask)
            return (out, mass, *torch.autograd.grad(out, (q, k, v), dout))

        got = run("triton", q, k, v, mask, dout)
        cpu = [t.cpu() for t in (q, k, v, mask, dout)]
        want = run("reference", *cpu)
        want64 = run("reference", *(t.double() for t in cpu[:3]), cpu[3], cpu[4].double())
        extra = flash_row_errors(*(t.double() for t in (cpu[0], cpu[1].repeat_interleave(2, 1),
                                                         cpu[2].repeat_interleave(2, 1), cpu[4])),
                                 want64[0], want64[1].sum(1) / (4 * 40), want64[2], d ** -0.5)
        for name, a, b, c in zip(("out", "mass", "dq", "dk", "dv"), got, want, want64):
            ex = {"mass": mass_error(q, k, c)}.get(name, extra.get(name, 0.0))
            assert_close_to_reference(a.cpu(), b, c, what=f"{name} d={d}", extra=ex)
    finally:
        torch.set_float32_matmul_precision(old)


def test_queries_that_see_no_key_get_zero_output_minus_inf_lse_and_no_mass(device):
    q, k, v, mask = inputs(2, 4, 2, 12, 5, device, torch.float32, padded=True)  # causal: queries 0..6 see nothing
    weight = torch.ones(12, device=device)
    out, lse, colsum = ops().triton_mass_attention_fwd(q, k, v, 0.25, True, mask, weight, 0)
    assert torch.isfinite(out).all() and torch.isfinite(colsum).all()
    assert (out[:, :, :7] == 0).all() and (lse[:, :, :7] == -math.inf).all() and (out[0] == 0).all()
    assert (lse[0] == -math.inf).all() and (colsum[0] == 0).all()
    assert torch.isfinite(lse[1, :, 7:]).all()
    dq, dk, dv = ops().triton_mass_attention_bwd(torch.randn_like(out), q, k, v, out, lse, 0.25, True, mask)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[:, :, :7] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dk[1][:, mask[1].cpu()] == 0).all()  # padding keys get no gradient
    from_lse = ops().triton_mass_from_lse(q, k, lse, 0.25, True, mask, weight, 0)
    torch.testing.assert_close(from_lse, colsum, rtol=1e-5, atol=1e-6)  # the same pass over the same lse


@pytest.mark.parametrize("dtype", LOW)
def test_attention_mass_from_lse_matches_the_oracle(dtype, device):
    """attention_mass from the lse attention_with_mass returned (and from the
    oracle's lse), every query kind and reduction, causal, padded, GQA."""
    q, k, v, mask = inputs(2, 4, 2, 21, 70, device, dtype, seed=3, padded=True)
    cpu = [t.cpu() for t in (q, k, v)]
    q64, k64, v64 = (t.double() for t in cpu)
    for mq, reduce_, heads in ((None, "sum", "none"), (5, "causal_mean", "group_sum"),
                               (torch.tensor([0, 20, 20]), "mean", "mean")):
        opts = dict(causal=True, key_padding_mask=mask, mass_queries=mq, mass_reduce=reduce_, mass_heads=heads)
        copts = dict(opts, key_padding_mask=mask.cpu())
        with sgattn.use_backend("triton"):
            out, mass, lse = sgattn.attention_with_mass(q, k, v, return_lse=True,
                                                        **dict(opts, mass_queries=_to(mq, device)))
            again = sgattn.attention_mass(q, k, lse, **dict(opts, mass_queries=_to(mq, device)))
        _, mass64, lse64 = reference.attention_with_mass(q64, k64, v64, **copts)
        _, mass_t, lse_t = reference.attention_with_mass(*cpu, **copts)
        what = f"{dtype} {mq} {reduce_} {heads}"
        # the forward's column sums are this pass on its lse (kept in log2 units there: the
        # conversion to and from the natural log rounds, so equal to one ulp of lse, not bitwise)
        assert_close_to_reference(again.cpu(), mass.cpu(), mass64, what=f"{what} again", extra=mass_error(q, k, mass64))
        extra = mass_error(q, k, mass64)
        assert_close_to_reference(mass.cpu(), mass_t, mass64, what=what, extra=extra)
        finite = torch.isfinite(lse64)
        assert torch.equal(finite, torch.isfinite(lse.cpu())), what
        assert_close_to_reference(lse.cpu()[finite], lse_t[finite], lse64[finite], what=f"{what} lse",
                                  extra=2.0 ** -23 * lse64[finite].abs().max().item())
        with sgattn.use_backend("triton"):  # from the oracle's (natural-log) lse
            other = sgattn.attention_mass(q, k, lse64.float().to(device), **dict(opts, mass_queries=_to(mq, device)))
        assert_close_to_reference(other.cpu(), mass_t, mass64, what=f"{what} oracle lse", extra=2 * extra)


def _to(mq, device):
    return mq.to(device) if isinstance(mq, torch.Tensor) else mq


def test_varlen_forms_run_per_sequence(device):
    """attention_with_mass_varlen / attention_mass_varlen (per sequence on the
    dense kernels) against the oracle's varlen forms, with an empty sequence."""
    g = torch.Generator().manual_seed(5)
    lq, lk = [5, 0, 17, 9], [8, 3, 17, 70]
    Hq, Hkv = 4, 2
    q, k, v = (torch.randn(sum(n), H, D, generator=g).to(device) for n, H in ((lq, Hq), (lk, Hkv), (lk, Hkv)))
    cu_q, cu_k = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32, device=device)
                  for n in (lq, lk))
    opts = dict(causal=True, mass_queries=3, mass_reduce="mean", mass_heads="group_mean")
    with sgattn.use_backend("triton"):
        out, mass, lse = sgattn.attention_with_mass_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), return_lse=True,
                                                           **opts)
        again = sgattn.attention_mass_varlen(q, k, lse, cu_q, cu_k, max(lq), max(lk), **opts)
    cpu = [t.cpu() for t in (q, k, v, cu_q, cu_k)]
    ref_out, ref_mass, ref_lse = reference.attention_with_mass_varlen(*cpu, **opts)
    ref64 = reference.attention_with_mass_varlen(*(t.double() for t in cpu[:3]), *cpu[3:], **opts)
    assert_close_to_reference(out.cpu(), ref_out, ref64[0], what="varlen out")
    extra = 2.0 ** -23 * (q.abs().max().item() * k.abs().max().item() * D ** 0.5 + math.log(70)) \
        * ref64[1].abs().max().item()
    assert_close_to_reference(mass.cpu(), ref_mass, ref64[1], what="varlen mass", extra=extra)
    assert_close_to_reference(again.cpu(), ref_mass, ref64[1], what="varlen mass from lse", extra=extra)
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(ref_lse))


def test_ops_pass_torch_library_opcheck(device):
    q, k, v, mask = inputs(2, 4, 2, 19, 23, device, torch.float32, padded=True)
    weight = (torch.arange(19, dtype=torch.float32) % 3).to(device)
    for causal, m, w, first in ((True, mask, weight, 1), (False, None, None, 0)):
        torch.library.opcheck(ops().triton_mass_attention_fwd, (q, k, v, 0.3, causal, m, w, first))
        out, lse, _ = ops().triton_mass_attention_fwd(q, k, v, 0.3, causal, m, w, first)
        torch.library.opcheck(ops().triton_mass_attention_bwd,
                              (torch.randn_like(out), q, k, v, out, lse, 0.3, causal, m))
        torch.library.opcheck(ops().triton_mass_from_lse, (q, k, lse, 0.3, causal, m, w, first))


def test_first_query_skips_only_zero_weights(device):
    """A promised first_query gives the same bits as none (the skipped query
    tiles add exact zeros)."""
    q, k, v, mask = inputs(1, 2, 1, 70, 40, device, torch.float32, padded=False)
    weight = (torch.arange(70) >= 40).float().to(device)
    a = ops().triton_mass_attention_fwd(q, k, v, 0.25, True, None, weight, 40)
    b = ops().triton_mass_attention_fwd(q, k, v, 0.25, True, None, weight, 0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_deterministic(device):
    """Two runs give the same bits: out, mass, lse and the gradients (dk, dv of
    a kv head summed over its query heads in a fixed order, no atomics)."""
    q, k, v, mask = inputs(2, 4, 2, 40, 70, device, torch.float32, seed=2, padded=True)
    runs = []
    for _ in range(2):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with sgattn.use_backend("triton"):
            out, mass, lse = sgattn.attention_with_mass(qq, kk, vv, causal=True, key_padding_mask=mask,
                                                        mass_queries=7, return_lse=True)
            from_lse = sgattn.attention_mass(qq, kk, lse, causal=True, key_padding_mask=mask)
        runs.append((out, mass, lse, from_lse, *torch.autograd.grad(out.sum(), (qq, kk, vv))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _bad(op, q, k, v, mask):
    out, lse, _ = ops().triton_mass_attention_fwd(q, k, v, 1.0, False, None, None, 0)
    return {
        "gqa": lambda: ops().triton_mass_attention_fwd(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1),
                                                       1.0, False, None, None, 0),
        "mask": lambda: ops().triton_mass_attention_fwd(q, k, v, 1.0, True, mask[:, :5], None, 0),
        "weight": lambda: ops().triton_mass_attention_fwd(q, k, v, 1.0, True, None, torch.ones(3, dtype=torch.float64,
                                                                                                device=q.device), 0),
        "dtype": lambda: ops().triton_mass_attention_fwd(q, k.half(), v, 1.0, False, None, None, 0),
        "first": lambda: ops().triton_mass_attention_fwd(q, k, v, 1.0, False, None, None, 10),
        "bwd lse": lambda: ops().triton_mass_attention_bwd(out, q, k, v, out, lse[:, :, :3], 1.0, False, None),
        "bwd dout": lambda: ops().triton_mass_attention_bwd(out[:, :1], q, k, v, out, lse, 1.0, False, None),
        "from_lse lse": lambda: ops().triton_mass_from_lse(q, k, lse.double(), 1.0, True, None, None, 0),
        "from_lse head dim": lambda: ops().triton_mass_from_lse(q[..., :8], k[..., :8], lse, 1.0, True, None, None, 0),
    }[op]


@pytest.mark.parametrize("op, match", [
    ("gqa", "triton_mass_attention_fwd: the query heads must be a multiple of the key/value heads"),
    ("mask", r"triton_mass_attention_fwd: key_padding_mask must be bool \[B, M\]"),
    ("weight", r"triton_mass_attention_fwd: query_weight must be float32 \[N\]"),
    ("dtype", "triton_mass_attention_fwd: dtype mismatch"),
    ("first", r"triton_mass_attention_fwd: first_query must lie in \[0, N\]"),
    ("bwd lse", r"triton_mass_attention_bwd: lse must be float32 \[B, Hq, N\]"),
    ("bwd dout", r"triton_mass_attention_bwd: dout must be \[B, Hq, N, dv\]"),
    ("from_lse lse", r"triton_mass_from_lse: lse must be float32 \[B, Hq, N\]"),
    ("from_lse head dim", "triton_mass_from_lse: head dim d = 8 is outside 16..128"),
])
def test_bad_arguments_are_value_errors_naming_the_problem(op, match, device):
    q, k, v, mask = inputs(2, 4, 2, 9, 11, device, torch.float32, padded=True)
    call = _bad(op, q, k, v, mask)
    with pytest.raises(ValueError, match=match):
        call()
