"""sgattn.attention_with_mass / attention_mass (and the _varlen forms): the
float64 oracle (sgattn.reference) against an explicit materialised-softmax
computation, every backend that runs the op against that oracle, gradients,
the error table, torch.compile, meta and fake tensors, and memory."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import sgattn
from sgattn import BackendError, reference
from sgattn.backends import Backend, get_backend, unavailable_reason
from tolerance import ULP, assert_close_to_reference, max_err

REDUCES = ("sum", "mean", "causal_mean")
HEADS = ("none", "group_sum", "group_mean", "mean")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------- explicit float64 computation

def eager(q, k, v, *, scale=None, causal=False, key_padding_mask=None, mass_queries=None, mass_reduce="sum",
          mass_heads="none"):
    """The whole [B, Hq, Lq, Lk] probability matrix in float64, the chosen rows
    summed one by one. Returns (out, mass, lse)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # query head h -> kv head h // G
    sees = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        sees = sees & (torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + Lk - Lq)
    if key_padding_mask is not None:
        sees = sees & ~key_padding_mask[:, None, None, :]
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~sees, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees no key: all zeros
    out, lse = p @ v, torch.logsumexp(s, -1)
    if mass_queries is None:
        rows = list(range(Lq))
    elif isinstance(mass_queries, int):
        rows = list(range(Lq - mass_queries, Lq))
    else:
        rows = mass_queries.tolist()
    mass = torch.zeros(B, Hq, Lk, dtype=torch.float64)
    count = torch.zeros(B, 1, Lk, dtype=torch.float64)
    for r in rows:
        mass += p[:, :, r]
        count += sees[:, :, r]
    if mass_reduce == "mean" and rows:
        mass = mass / len(rows)
    if mass_reduce == "causal_mean":
        mass = torch.where(count > 0, mass / count.clamp_min(1), torch.zeros(()))
    if mass_heads == "mean":
        mass = mass.mean(1)
    elif mass_heads != "none":
        mass = mass.reshape(B, Hkv, G, Lk).sum(2) / (G if mass_heads == "group_mean" else 1)
    return out, mass, lse


def eager_varlen(q, k, v, cu_q, cu_k, *, causal=False, mass_queries=None, **mass):
    """Each packed sequence through ``eager`` on its own slice."""
    Hq, Hkv = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], Hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((Hq, q.shape[0]), -math.inf, dtype=torch.float64)
    heads = {"none": Hq, "group_sum": Hkv, "group_mean": Hkv}.get(mass.get("mass_heads", "none"))
    masses = []
    for s in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if isinstance(mass_queries, int):
            rows = torch.arange(max(a, b - mass_queries), b)
        else:
            inside = None if mass_queries is None else mass_queries[(mass_queries >= a) & (mass_queries < b)]
            rows = torch.arange(a, b) if mass_queries is None else inside
        if b == a or rows.numel() == 0:  # no chosen query: no mass
            masses.append(torch.zeros(*([heads] if heads else []), d - c, dtype=torch.float64))
        if b == a:
            continue
        o, m, l = eager(*(t[None].transpose(1, 2) for t in (q[a:b], k[c:d], v[c:d])), causal=causal,
                        mass_queries=rows - a, **mass)
        out[a:b], lse[:, a:b] = o[0].transpose(0, 1), l[0]
        if rows.numel():
            masses.append(m[0])
    return out, torch.cat(masses, dim=-1), lse


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float64, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype)
            for h, n, d in ((Hq, Lq, D), (Hkv, Lk, D), (Hkv, Lk, Dv or D))]


def _padding(B, Lk, seed=0, full_row=False):
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(B, Lk, generator=g) < 0.3
    if full_row:
        mask[0] = True  # batch entry 0: every key is padding, its queries see nothing
    return mask


def _mass_options(Lq):
    """Every mass_queries kind with every reduction; the head reductions in turn
    (each meets every reduction and every query kind)."""
    queries = [None, 1, min(3, Lq), torch.tensor([0, Lq // 2, Lq - 1, Lq - 1])]  # a repeated index counts twice
    return [dict(mass_queries=mq, mass_reduce=r, mass_heads=HEADS[(i + j) % len(HEADS)])
            for i, mq in enumerate(queries) for j, r in enumerate(REDUCES)]


def assert_close64(got, want, what=""):
    """float64 agreement: rounding of sums of at most a few hundred terms."""
    assert got.shape == want.shape, what
    assert max_err(got, want) <= 1e-13 * max(1.0, want.abs().max().item()), what


# ------------------------------------------------------------------------- oracle vs eager

# tile edges, odd lengths, Lq < Lk (prefill with a cache) and Lq > Lk (causal: queries without keys)
LENGTHS = [(1, 1), (5, 7), (15, 16), (17, 16), (16, 17), (63, 64), (65, 63), (64, 129), (129, 128),
           (127, 128), (128, 3), (3, 127)]
HEAD_PAIRS = [(1, 1), (4, 2), (6, 1)]


@pytest.mark.parametrize("Lq,Lk", LENGTHS)
@pytest.mark.parametrize("Hq,Hkv", HEAD_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_oracle_equals_eager_float64(Lq, Lk, Hq, Hkv, causal, padded, monkeypatch):
    """Every mass option; a small block budget makes the oracle cut the queries
    into chunks that do not divide Lq."""
    monkeypatch.setattr(reference, "MAX_BLOCK_ELEMENTS", 2 * Hq * Lk * 13)  # 13 queries per chunk
    q, k, v = _inputs(2, Hq, Hkv, Lq, Lk, 8, seed=Lq * 131 + Lk)
    mask = _padding(2, Lk, seed=Lq, full_row=padded and Lk % 2 == 1) if padded else None
    for options in _mass_options(Lq):
        out, mass, lse = reference.attention_with_mass(q, k, v, causal=causal, key_padding_mask=mask, **options)
        e_out, e_mass, e_lse = eager(q, k, v, causal=causal, key_padding_mask=mask, **options)
        what = f"{options}"
        assert_close64(out, e_out, what)
        assert_close64(mass, e_mass, what)
        assert torch.equal(lse.isinf(), e_lse.isinf())
        assert_close64(lse.nan_to_num(0, 0, 0), e_lse.nan_to_num(0, 0, 0), what)
        assert mass.dtype == torch.float64 and not mass.requires_grad
        if options["mass_reduce"] == "sum":  # the reductions after the column sums are shared code
            from_lse = reference.attention_mass(q, k, lse, causal=causal, key_padding_mask=mask, **options)
            assert_close64(from_lse, e_mass, what)


def _varlen_case(seed, Hq, Hkv, D=8, nseq=4):
    g = torch.Generator().manual_seed(seed)
    lq = torch.randint(0, 20, (nseq,), generator=g)
    lk = torch.randint(0, 20, (nseq,), generator=g)
    lq[0], lk[0] = 17, 16  # one sequence at a tile edge; others may be empty on either side
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long), lq.cumsum(0)]).int()
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), lk.cumsum(0)]).int()
    q = torch.randn(int(cu_q[-1]), Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), Hkv, D, generator=g, dtype=torch.float64)
    return q, k, v, cu_q, cu_k, int(lq.max()), int(lk.max())


@pytest.mark.parametrize("Hq,Hkv", HEAD_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_oracle_equals_eager_per_sequence(Hq, Hkv, causal):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(Hq * 10 + Hkv + causal, Hq, Hkv)
    total = q.shape[0]
    for mass_queries in (None, 2, 40, torch.tensor([0, 3, total - 1])):
        for r in REDUCES:
            for h in HEADS:
                options = dict(mass_queries=mass_queries, mass_reduce=r, mass_heads=h)
                out, mass, lse = sgattn.attention_with_mass_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal,
                                                                    return_lse=True, **options)
                e_out, e_mass, e_lse = eager_varlen(q, k, v, cu_q, cu_k, causal=causal, **options)
                assert_close64(out, e_out, options)
                assert_close64(mass, e_mass, options)
                assert torch.equal(lse.isinf(), e_lse.isinf())
                from_lse = sgattn.attention_mass_varlen(q, k, lse, cu_q, cu_k, mq, mk, causal=causal, **options)
                assert_close64(from_lse, e_mass, options)


# Measured (float64 eager vs the oracle on the same dtype-T inputs, this table's
# shapes): out within 0.5 ulp of T at max|out| (its final rounding) plus at most
# 3e-7 max|out| of fp32 accumulation; mass within 2e-7 of max|mass|. Bounds: 1 ulp + 2e-6.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(17, 16), (65, 129), (129, 64)])
def test_oracle_in_each_dtype_is_eager_float64_to_rounding(dtype, Lq, Lk):
    q, k, v = _inputs(2, 4, 2, Lq, Lk, 16, dtype=dtype, seed=Lq + Lk)
    mask = _padding(2, Lk)
    for causal in (False, True):
        out, mass, lse = reference.attention_with_mass(q, k, v, causal=causal, key_padding_mask=mask,
                                                       mass_reduce="causal_mean", mass_heads="group_sum")
        e_out, e_mass, _ = eager(q, k, v, causal=causal, key_padding_mask=mask, mass_reduce="causal_mean",
                                 mass_heads="group_sum")
        assert out.dtype == dtype and mass.dtype == reference.compute_dtype(dtype)
        out_scale, mass_scale = e_out.abs().max().item(), e_mass.abs().max().item()
        assert max_err(out, e_out) <= (ULP[dtype] + 2e-6) * out_scale
        assert max_err(mass, e_mass) <= (1e-13 if dtype == torch.float64 else 2e-6) * mass_scale


def test_fuzz_oracle_against_eager():
    """Seeded random shapes and options, dense and packed."""
    g = torch.Generator().manual_seed(1234)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    for trial in range(40):
        Hkv = pick([1, 2, 3])
        Hq = Hkv * pick([1, 2, 4])
        Lq, Lk, D = (int(torch.randint(1, 70, (1,), generator=g)) for _ in range(3))
        causal = bool(trial % 2)
        options = dict(mass_reduce=pick(REDUCES), mass_heads=pick(HEADS),
                       mass_queries=pick([None, int(torch.randint(1, Lq + 1, (1,), generator=g)),
                                          torch.randint(Lq, (3,), generator=g)]))
        q, k, v = _inputs(pick([1, 2, 3]), Hq, Hkv, Lq, Lk, D, seed=trial, Dv=pick([D, 5]))
        mask = _padding(q.shape[0], Lk, seed=trial) if trial % 3 == 0 else None
        scale = pick([None, 0.3])
        out, mass, lse = sgattn.attention_with_mass(q, k, v, scale=scale, causal=causal, key_padding_mask=mask,
                                                    return_lse=True, **options)
        e_out, e_mass, _ = eager(q, k, v, scale=scale, causal=causal, key_padding_mask=mask, **options)
        assert_close64(out, e_out, (trial, options))
        assert_close64(mass, e_mass, (trial, options))
    for trial in range(10):
        q, k, v, cu_q, cu_k, mq, mk = _varlen_case(100 + trial, 4, pick([1, 2, 4]), nseq=pick([1, 3, 5]))
        options = dict(mass_reduce=pick(REDUCES), mass_heads=pick(HEADS), mass_queries=pick([None, 1, 5]))
        out, mass = sgattn.attention_with_mass_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=bool(trial % 2), **options)
        e_out, e_mass, _ = eager_varlen(q, k, v, cu_q, cu_k, causal=bool(trial % 2), **options)
        assert_close64(out, e_out, (trial, options))
        assert_close64(mass, e_mass, (trial, options))


# ------------------------------------------------------------------------------ semantics

def test_queries_that_see_no_key():
    """Causal with Lq > Lk: the first Lq - Lk queries see nothing; a batch entry
    whose keys are all padding: none of its queries see anything."""
    q, k, v = _inputs(2, 2, 2, 9, 4, 8)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    out, mass, lse = sgattn.attention_with_mass(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isneginf(lse[1]).all() and torch.isfinite(lse[0, :, 5:]).all()
    assert torch.equal(mass[1], torch.zeros_like(mass[1]))
    # the 4 queries that see keys each give mass 1 per head, spread over the keys they see
    assert torch.allclose(mass[0].sum(-1), torch.full((2,), 4.0, dtype=torch.float64))
    # "mean" divides by all 9 chosen queries, "causal_mean" by those that see each key
    mean = sgattn.attention_with_mass(q, k, v, causal=True, mass_reduce="mean")[1]
    assert torch.allclose(mean * 9, sgattn.attention_with_mass(q, k, v, causal=True)[1])
    cm = sgattn.attention_with_mass(q, k, v, causal=True, mass_reduce="causal_mean")[1]
    seen_by = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # key j: queries 5+j..8
    assert torch.allclose(cm * seen_by, sgattn.attention_with_mass(q, k, v, causal=True)[1])


def test_empty_batch_gives_empty_results():
    q, k, v = _inputs(0, 4, 2, 5, 7, 8)
    out, mass, lse = sgattn.attention_with_mass(q, k, v, causal=True, mass_heads="group_sum", return_lse=True)
    assert out.shape == (0, 4, 5, 8) and mass.shape == (0, 2, 7) and lse.shape == (0, 4, 5)


def test_group_and_head_reductions_are_explicit():
    """group_sum is group_mean times the group size; mean over all heads is their mean."""
    q, k, v = _inputs(1, 8, 2, 11, 13, 8)
    none = sgattn.attention_with_mass(q, k, v, causal=True)[1]
    gsum = sgattn.attention_with_mass(q, k, v, causal=True, mass_heads="group_sum")[1]
    gmean = sgattn.attention_with_mass(q, k, v, causal=True, mass_heads="group_mean")[1]
    mean = sgattn.attention_with_mass(q, k, v, causal=True, mass_heads="mean")[1]
    assert none.shape == (1, 8, 13) and gsum.shape == (1, 2, 13) and mean.shape == (1, 13)
    assert torch.allclose(gsum[:, 0], none[:, :4].sum(1))  # query heads 0-3 share kv head 0
    assert torch.allclose(gsum[:, 1], none[:, 4:].sum(1)) and torch.allclose(gmean * 4, gsum)
    assert torch.allclose(mean, none.mean(1))


def test_mass_is_detached_and_deterministic():
    q, k, v = (t.float().requires_grad_() for t in _inputs(2, 4, 2, 40, 50, 16))
    first = sgattn.attention_with_mass(q, k, v, causal=True, return_lse=True)
    second = sgattn.attention_with_mass(q, k, v, causal=True, return_lse=True)
    assert first[0].requires_grad and not first[1].requires_grad and not first[2].requires_grad
    assert first[1].dtype == first[2].dtype == torch.float32
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_mass_from_sdpa_cpu_flash_lse():
    """attention_mass with the lse of PyTorch's own CPU flash attention (natural
    log) gives the mass attention_with_mass computes."""
    q, k, v = (t.float() for t in _inputs(2, 4, 4, 33, 33, 16))
    for causal in (False, True):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]
        want_out, want = sgattn.attention_with_mass(q, k, v, causal=causal, mass_reduce="causal_mean")
        got = sgattn.attention_mass(q, k, lse, causal=causal, mass_reduce="causal_mean")
        assert torch.allclose(out, want_out, atol=1e-5)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_autocast_casts_qkv():
    q, k, v = (t.float() for t in _inputs(1, 2, 1, 8, 8, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, mass = sgattn.attention_with_mass(q, k, v, causal=True)
    want_out, want = sgattn.attention_with_mass(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16 and mass.dtype == torch.float32
    assert torch.equal(out, want_out) and torch.equal(mass, want)


# ------------------------------------------------------------------------------ gradients

def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _inputs(2, 4, 2, 6, 5, 4, Dv=3))
    mask = _padding(2, 5, full_row=True)
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v: sgattn.attention_with_mass(q, k, v, causal=causal, key_padding_mask=mask)[0], (q, k, v),
            fast_mode=True)
    qv, kv, vv, cu_q, cu_k, mq, mk = _varlen_case(5, 2, 1, D=4, nseq=3)
    qv, kv, vv = (t[:int(c[-1])].requires_grad_() for t, c in ((qv, cu_q), (kv, cu_k), (vv, cu_k)))
    assert torch.autograd.gradcheck(
        lambda q, k, v: sgattn.attention_with_mass_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=True)[0], (qv, kv, vv),
        fast_mode=True)


def test_chunked_gradients_equal_eager_autograd(monkeypatch):
    """fp64: the chunked backward (several chunks) equals autograd through the
    materialised softmax; fp32: within the fp32 rounding a float64 run measures
    (at most 2e-6 of the largest gradient here; bound 2e-5)."""
    monkeypatch.setattr(reference, "MAX_BLOCK_ELEMENTS", 4 * 70 * 5)  # 5 queries per chunk
    mask = _padding(2, 70)
    for dtype in (torch.float64, torch.float32):
        q, k, v = (t.requires_grad_() for t in _inputs(2, 4, 2, 37, 70, 16, dtype=dtype))
        dout = torch.randn(2, 4, 37, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out = sgattn.attention_with_mass(q, k, v, causal=True, key_padding_mask=mask)[0]
        grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(eager(q64, k64, v64, causal=True, key_padding_mask=mask)[0], (q64, k64, v64), dout)
        for g, w in zip(grads, want):
            assert g.dtype == dtype
            assert max_err(g, w) <= (1e-12 if dtype == torch.float64 else 2e-5) * w.abs().max().item()


# ------------------------------------------------------------------------------ backends

BACKENDS = ("reference", "cpu", "triton", "cuda")
KERNEL_BACKENDS = BACKENDS[1:]


def _present(name):
    why = unavailable_reason(name)
    if why is not None:
        pytest.skip(f"backend {name} is not present here: {why}")
    backend = get_backend(name)
    caps = backend.capabilities()
    return backend, caps, caps.devices[0] if caps.devices else "cpu"


def _backend_cases():
    """(sizes, options) a backend may run or decline."""
    for Lq, Lk in ((17, 16), (16, 65), (33, 7)):
        for Hq, Hkv in ((2, 2), (4, 2)):
            for causal in (False, True):
                for padded in (False, True):
                    for mass_queries in (None, 3):
                        for mass_reduce, mass_heads in (("mean", "mean"), ("sum", "none"),
                                                        ("causal_mean", "group_sum")):
                            yield (Hq, Hkv, Lq, Lk), dict(causal=causal, padded=padded, mass_queries=mass_queries,
                                                          mass_reduce=mass_reduce, mass_heads=mass_heads)


def flash_mass_error(q, k, mass64, scale=None):
    """What a correct flash-style kernel may add to the mass beyond the oracle's
    own error (``sgattn.testing.flash_row_errors``' importance term): P = exp(s -
    lse) from a recomputed fp32 score and a stored fp32 lse is off by one ulp of
    max|s| + ln Lk, relative rho, on every P of a row; the mass is a positive
    combination of P, so it moves by at most rho max|mass|."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_max = (q @ k.transpose(-1, -2)).abs().max().item() * scale
    return 2.0 ** -23 * (s_max + math.log(k.shape[2])) * mass64.abs().max().item()


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_every_backend_agrees_with_the_float64_oracle(name):
    """(The reference is the oracle: the tests above hold it to the eager float64
    computation.) Each case the backend accepts, in each of its dtypes, within
    tolerance.assert_close_to_reference's bound (2x the oracle's own error on
    the same dtype-T inputs vs float64, plus 2 ulp, plus for the mass the flash
    allowance of ``flash_mass_error``); each case it declines names a reason.
    A backend must accept at least SG-Former's case."""
    backend, caps, device = _present(name)
    ran = 0
    for (Hq, Hkv, Lq, Lk), options in _backend_cases():
        options = dict(options)
        padded = options.pop("padded")
        q64, k64, v64 = _inputs(2, Hq, Hkv, Lq, Lk, 16, seed=Lq * Lk + Hq)
        mask = _padding(2, Lk) if padded else None
        ref64 = reference.attention_with_mass(q64, k64, v64, key_padding_mask=mask, **options)
        for dtype in caps.dtypes:
            q, k, v = (t.to(device, dtype) for t in (q64, k64, v64))
            dmask = None if mask is None else mask.to(device)
            call = dict(options, key_padding_mask=dmask, return_lse=False)
            why = backend.unsupported("attention_with_mass", (q, k, v), scale=None, **call)
            if why is not None:
                assert "not implemented" in why, why
                continue
            with sgattn.use_backend(name):
                out, mass = sgattn.attention_with_mass(q, k, v, **call)
            ref_out, ref_mass, _ = reference.attention_with_mass(q.cpu(), k.cpu(), v.cpu(), key_padding_mask=mask,
                                                                 **options)
            what = f"{name} {dtype} {(Hq, Hkv, Lq, Lk)} {options}"
            assert mass.dtype == reference.compute_dtype(dtype) and mass.shape == ref64[1].shape, what
            assert_close_to_reference(out.cpu(), ref_out, ref64[0], what=what)
            assert_close_to_reference(mass.cpu(), ref_mass, ref64[1], what=f"{what} mass",
                                      extra=flash_mass_error(q.cpu(), k.cpu(), ref64[1]))
            ran += 1
    assert ran > 0


@pytest.mark.parametrize("name", BACKENDS)
def test_sgformer_importance_is_one_mass_configuration(name):
    """attention_with_mass(mass_reduce="mean", mass_heads="mean") is
    attention_with_importance's importance (global mode), on each backend."""
    backend, caps, device = _present(name)
    for dtype in caps.dtypes:
        q, k, v = (t.to(device, dtype) for t in _inputs(2, 3, 3, 50, 20, 16))
        with sgattn.use_backend(name):
            out, mass = sgattn.attention_with_mass(q, k, v, mass_reduce="mean", mass_heads="mean")
            want_out, importance = sgattn.attention_with_importance(q, k, v)
        assert mass.shape == importance.shape == (2, 20)
        bound = 1e-13 if dtype == torch.float64 else 1e-6  # fp32 accumulation, different summation orders
        assert max_err(mass, importance) <= bound * importance.abs().max().item(), (name, dtype)
        # out: the same plus its rounding to dtype (either side may round the other way: 2 ulp)
        assert max_err(out, want_out) <= (2 * ULP[dtype] + bound) * want_out.abs().max().item(), (name, dtype)


MASS_KERNELS = ("cpu", "triton")  # the backends with mass kernels (KernelMass)


def test_kernel_backends_decline_with_reasons_and_dispatch_falls_back():
    """A forced backend without mass kernels names every reason; automatic
    dispatch then runs one that has them (the cpu kernels, or the reference)."""
    q, k, v = (t.float() for t in _inputs(1, 4, 2, 8, 8, 16))
    for name in ("cpu", "cuda", "triton"):
        if unavailable_reason(name) is not None:
            continue
        device = get_backend(name).capabilities().devices[0]
        qd, kd, vd = (t.to(device) for t in (q, k, v))
        why = get_backend(name).unsupported("attention_with_mass", (qd, kd, vd), scale=None, causal=True,
                                            key_padding_mask=None, mass_queries=2, mass_reduce="sum",
                                            mass_heads="none", return_lse=True)
        if name in MASS_KERNELS:  # the mass kernels run every dense option
            assert why is None, why
        varlen = get_backend(name).unsupported("attention_mass_varlen", (qd[0], kd[0], qd[0, :, :, 0]))
        assert (varlen is None) == (name in MASS_KERNELS), (name, varlen)  # per sequence on their dense kernels
    # a backend without mass kernels (the base class) names every reason
    base = "; ".join(Backend.mass_limits(None, "attention_with_mass", (q, k, v), dict(
        causal=True, key_padding_mask=None, mass_queries=2, return_lse=True)))
    for part in ("causal masking", "mass_queries", "grouped-query", "return_lse"):
        assert part in base, base
    out, mass = sgattn.attention_with_mass(q, k, v, causal=True, mass_queries=2)
    assert torch.allclose(mass, reference.attention_with_mass(q, k, v, causal=True, mass_queries=2)[1])


# ------------------------------------------------------------------------------ bad input

def _q(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


Q, K, V = _q(2, 4, 5, 8), _q(2, 2, 7, 8), _q(2, 2, 7, 8)
QV, KV, VV = _q(9, 4, 8), _q(11, 2, 8), _q(11, 2, 8)
CU_Q, CU_K = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
LSE, LSE_V = _q(2, 4, 5), _q(4, 9)


def dense(**kw):
    return lambda: sgattn.attention_with_mass(kw.pop("q", Q), kw.pop("k", K), kw.pop("v", V), **kw)


def from_lse(**kw):
    return lambda: sgattn.attention_mass(kw.pop("q", Q), kw.pop("k", K), kw.pop("lse", LSE), **kw)


def varlen(**kw):
    args = [kw.pop(n, d) for n, d in (("q", QV), ("k", KV), ("v", VV), ("cu_q", CU_Q), ("cu_k", CU_K),
                                      ("max_q", 5), ("max_k", 6))]
    return lambda: sgattn.attention_with_mass_varlen(*args, **kw)


def varlen_lse(**kw):
    return lambda: sgattn.attention_mass_varlen(QV, KV, kw.pop("lse", LSE_V), CU_Q, CU_K, 5, 6, **kw)


ERRORS = [
    ("attention_with_mass", dense(k=_q(2, 3, 7, 8), v=_q(2, 3, 7, 8)), "multiple of the key/value heads"),
    ("attention_with_mass", dense(k=_q(2, 2, 7, 4)), "head dim mismatch"),
    ("attention_with_mass", dense(v=_q(2, 2, 6, 8)), "v .* must match k"),
    ("attention_with_mass", dense(k=_q(3, 2, 7, 8), v=_q(3, 2, 7, 8)), "batch mismatch"),
    ("attention_with_mass", dense(k=_q(2, 2, 7, 8, dtype=torch.float64)), "dtype mismatch"),
    ("attention_with_mass", dense(q=_q(2, 4, 5, 8, dtype=torch.int32)), "unsupported dtype"),
    ("attention_with_mass", dense(q=_q(4, 5, 8)), "q must have 4 dimensions"),
    ("attention_with_mass", dense(q=_q(2, 4, 0, 8)), "empty input"),
    ("attention_with_mass", dense(key_padding_mask=torch.zeros(2, 7)), "must be bool"),
    ("attention_with_mass", dense(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), r"\[B, Lk\] = \[2, 7\]"),
    ("attention_with_mass", dense(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device="meta")),
     "device mismatch"),
    ("attention_with_mass", dense(mass_queries=0), "mass_queries must be None, an int >= 1 and <= 5"),
    ("attention_with_mass", dense(mass_queries=6), "mass_queries must be"),
    ("attention_with_mass", dense(mass_queries=True), "mass_queries must be"),
    ("attention_with_mass", dense(mass_queries=torch.tensor([0, 5])), r"must lie in \[0, 5\)"),
    ("attention_with_mass", dense(mass_queries=torch.tensor([-1])), r"must lie in \[0, 5\)"),
    ("attention_with_mass", dense(mass_queries=torch.tensor([0.0])), "int32 or int64"),
    ("attention_with_mass", dense(mass_queries=torch.tensor([[0]])), "1-D and non-empty"),
    ("attention_with_mass", dense(mass_reduce="avg"), "unknown mass_reduce 'avg'"),
    ("attention_with_mass", dense(mass_heads="sum"), "unknown mass_heads 'sum'"),
    ("attention_with_mass", dense(causal=1), "causal must be a bool"),
    ("attention_with_mass", dense(return_lse="yes"), "return_lse must be a bool"),
    ("attention_with_mass", dense(scale=math.inf), "scale must be finite"),
    ("attention_mass", from_lse(lse=_q(2, 4, 6)), r"lse must be \[B, Hq, Lq\] = \[2, 4, 5\]"),
    ("attention_mass", from_lse(lse=torch.zeros(2, 4, 5, dtype=torch.int64)), "floating-point"),
    ("attention_mass", from_lse(mass_heads="max"), "unknown mass_heads"),
    ("attention_with_mass_varlen", varlen(cu_q=CU_Q.long()), "cu_seqlens_q must be int32"),
    ("attention_with_mass_varlen", varlen(cu_k=CU_K[None]), "cu_seqlens_k must be 1-D"),
    ("attention_with_mass_varlen", varlen(cu_q=torch.tensor([0, 4, 8], dtype=torch.int32)), "rise from 0 to 9"),
    ("attention_with_mass_varlen", varlen(cu_k=torch.tensor([0, 7, 6, 11], dtype=torch.int32)),
     "same number of sequences"),
    ("attention_with_mass_varlen", varlen(cu_k=torch.tensor([0, 12, 11], dtype=torch.int32), max_k=20),
     "cu_seqlens_k must rise from 0 to 11"),
    ("attention_with_mass_varlen", varlen(max_q=4), "max_seqlen_q = 4"),
    ("attention_with_mass_varlen", varlen(max_k=-1), "max_seqlen_k must be an int >= 0"),
    ("attention_with_mass_varlen", varlen(cu_q=CU_Q.to("meta")), "device mismatch"),
    ("attention_with_mass_varlen", varlen(q=_q(2, 9, 4, 8)), "q must have 3 dimensions"),
    ("attention_with_mass_varlen", varlen(mass_queries=torch.tensor([9])), r"must lie in \[0, 9\)"),
    ("attention_with_mass_varlen", varlen(mass_queries=0), "mass_queries must be None, an int >= 1, or"),
    ("attention_mass_varlen", varlen_lse(lse=_q(9, 4)), r"lse must be \[Hq, total_q\] = \[4, 9\]"),
]


@pytest.mark.parametrize("op,call,match", ERRORS, ids=[f"{i}-{e[0]}" for i, e in enumerate(ERRORS)])
def test_bad_input_is_a_value_error_naming_the_problem(op, call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert str(info.value).startswith(f"{op}: ")


# --------------------------------------------------------------- compile, meta, fake, memory

def test_compiles_fullgraph_with_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    q, k, v = (t.float().requires_grad_() for t in _inputs(1, 4, 2, 17, 23, 16))
    mask = _padding(1, 23)
    mq = torch.tensor([0, 16])

    def fn(q, k, v, mask, mq):
        return sgattn.attention_with_mass(q, k, v, causal=True, key_padding_mask=mask, mass_queries=mq,
                                          mass_reduce="causal_mean", mass_heads="group_mean", return_lse=True)

    for compiler in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend=compiler)(q, k, v, mask, mq)
        want = fn(q, k, v, mask, mq)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-6)
        g_got = torch.autograd.grad(got[0].sum(), (q, k, v))
        g_want = torch.autograd.grad(want[0].sum(), (q, k, v))
        for a, b in zip(g_got, g_want):
            assert torch.allclose(a, b, atol=1e-5)
    qv, kv, vv, cu_q, cu_k, mxq, mxk = _varlen_case(9, 4, 2)
    fv = lambda *t: sgattn.attention_with_mass_varlen(*t, mxq, mxk, causal=True, mass_queries=2)  # noqa: E731
    torch._dynamo.reset()
    got = torch.compile(fv, fullgraph=True, backend="aot_eager")(qv, kv, vv, cu_q, cu_k)
    for a, b in zip(got, fv(qv, kv, vv, cu_q, cu_k)):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("mass_heads,shape", [("none", (2, 4, 7)), ("group_sum", (2, 2, 7)), ("mean", (2, 7))])
def test_meta_and_fake_tensors(mass_heads, shape):
    for mode in ("meta", "fake"):
        with FakeTensorMode() if mode == "fake" else torch.device("meta"):
            q, k, v = torch.empty(2, 4, 5, 8), torch.empty(2, 2, 7, 8), torch.empty(2, 2, 7, 6)
            mask, mq = torch.zeros(2, 7, dtype=torch.bool), torch.tensor([0, 4])
            out, mass, lse = sgattn.attention_with_mass(q, k, v, causal=True, key_padding_mask=mask, mass_queries=mq,
                                                        mass_heads=mass_heads, return_lse=True)
            again = sgattn.attention_mass(q, k, lse, mass_heads=mass_heads)
            qv, kv, vv = torch.empty(9, 4, 8), torch.empty(11, 2, 8), torch.empty(11, 2, 6)
            cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 6, 11], dtype=torch.int32)
            out_v, mass_v, lse_v = sgattn.attention_with_mass_varlen(qv, kv, vv, cu_q, cu_k, 5, 6, causal=True,
                                                                     mass_heads=mass_heads, return_lse=True)
        assert out.shape == (2, 4, 5, 6) and mass.shape == again.shape == shape and lse.shape == (2, 4, 5)
        assert out_v.shape == (9, 4, 6) and mass_v.shape == shape[1:-1] + (11,) and lse_v.shape == (4, 9)
        assert mass.dtype == lse.dtype == torch.float32 and out.device.type == ("meta" if mode == "meta" else "cpu")


def _peak_bytes(fn):
    """Peak of the CPU bytes allocated while ``fn`` runs, over what was allocated
    at its start (the profiler's allocation events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_oracle_memory_is_linear_in_length(monkeypatch):
    """Forward and backward at Lq = Lk = 4096, causal: peak memory beyond the
    inputs is a few query-chunk blocks, never Lq x Lk. Measured with a block
    budget of 2**19 elements (2 MiB fp32): 8.4 MiB, against 64 MiB for the
    4096 x 4096 fp32 probabilities. (With the default 2**24-element budget at
    Hq = 8, Hkv = 2, D = 32: 210 MiB, against 512 MiB for all heads' probabilities.)"""
    budget = 1 << 19
    monkeypatch.setattr(reference, "MAX_BLOCK_ELEMENTS", budget)
    L = 4096
    q, k, v = (t.float().requires_grad_() for t in _inputs(1, 1, 1, L, L, 16))

    def step():
        out, mass = sgattn.attention_with_mass(q, k, v, causal=True, mass_reduce="causal_mean")
        out.backward(torch.ones_like(out))

    peak = _peak_bytes(step)
    inputs = sum(t.numel() * 4 for t in (q, k, v))  # out and the gradients are as large again
    assert peak <= 4 * inputs + 6 * budget * 4, f"peak {peak / 2**20:.1f} MiB"
    assert peak < L * L * 4 / 4, f"peak {peak / 2**20:.1f} MiB"
