"""Seeded fuzz: every backend that runs here against the float64 reference, over
random shapes (primes, tile edges, windows larger than the grid), dtypes,
memory layouts (head views, strided last dims, broadcast batches) and value
scales (down to saturated softmax) and value structures (key tiles every query
gives a tiny but nonzero probability, fully saturated rows), forward and backward.

Each draw is a row of the agreement table's kind (``sgattn.testing``) and runs
through the same runner and rule as tests/test_backend_agreement.py. The case
list is drawn from a fixed seed so a failure reproduces; ``SGATTN_FUZZ_SEED``
and ``SGATTN_FUZZ_CASES`` draw other or more cases locally.
"""
import math
import os
import random

import pytest
import torch

import sgattn
from sgattn.testing import aggregate_case, assert_close_to_reference, attention_case, flash_row_errors
from test_backend_agreement import check_row

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


def _attention_draw(rng):
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


def _attention_row(c):
    name = _case_id(c)

    def values(gen):
        qkv = [torch.randn(c["B"], c["h"], L, c["d"], dtype=torch.float64, generator=gen) * c["scale"]
               for L in (c["N"], c["M"], c["M"])]
        _structure(qkv[0], qkv[1], c, random.Random(name))
        return qkv
    return attention_case(name, None, values=values, window=c["window"], hw=c["hw"], dtypes=(c["dtype"],),
                          layout=c["layout"])


def _realloc_row(rng):
    N = rng.choice(EDGES[3:] + (196, 300, 784))
    parts = rng.choice((2, 3))
    c = dict(B=rng.choice((1, 2, 3)), N=N, C=rng.choice((1, 8, 24, 64, 100)),
             sizes=tuple(rng.randint(1, max(1, N // 4)) for _ in range(parts)),
             ties=rng.random() < 0.4, dtype=rng.choice(DTYPES), strided=rng.random() < 0.5)
    # strided: tokens as a transposed view of a [B, C, N] tensor
    return aggregate_case(_case_id(c), c["B"], N, c["C"], c["sizes"], 1, public=True, ties=c["ties"],
                          dtypes=(c["dtype"],), layout="transposed" if c["strided"] else "contiguous")


def _rows(kind):
    rng = random.Random(f"{SEED}-{kind}")
    if kind == "attention":
        return [_attention_row(dict(_attention_draw(rng), values=VALUES[i % len(VALUES)])) for i in range(CASES)]
    return [_realloc_row(rng) for _ in range(CASES)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _rows("attention") + _rows("reallocation"), ids=lambda c: c.name)
def test_fuzz(backend, case, poison):
    check_row(backend, case, case.dtypes[0], poison)


# ------------------------------------------------------------------ attention mass
# Random draws of sgattn.attention_with_mass (dense or packed) through every backend that
# runs the op here, against the float64 oracle: causal or not, grouped-query heads, key
# padding (sometimes a batch entry padded whole), lengths at tile edges with Lq above and
# below Lk, every mass option, out, mass and lse, and dq, dk, dv (dense draws).
MASS_HEADS = ((1, 1), (2, 2), (4, 2), (6, 3), (8, 1))
MASS_EDGES = (1, 2, 7, 15, 16, 17, 31, 63, 64, 65, 127, 129)


def _mass_draw(rng, i):
    Hq, Hkv = rng.choice(MASS_HEADS)
    Lq, Lk = rng.choice(MASS_EDGES), rng.choice(MASS_EDGES)
    kind = rng.choice(("all", "last", "index"))
    mass_queries = {"all": None, "last": rng.randint(1, Lq), "index": tuple(rng.randrange(Lq) for _ in range(3))}[kind]
    return dict(i=i, B=rng.choice((1, 2)), Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=rng.choice((16, 24, 64)),
                causal=rng.random() < 0.6, padded=rng.choice((None, "some", "whole_row")),
                mass_queries=mass_queries, mass_reduce=rng.choice(("sum", "mean", "causal_mean")),
                mass_heads=rng.choice(("none", "group_sum", "group_mean", "mean")),
                scale=rng.choice((0.3, 1.0, 2.0)), dtype=rng.choice(DTYPES), varlen=i % 4 == 3)


MASS_DRAWS = [_mass_draw(random.Random(f"{SEED}-mass-{i}"), i) for i in range(CASES)]


def _mass_options(c, Lq):
    mq = c["mass_queries"]
    if isinstance(mq, tuple):  # indices past a packed batch's queries wrap into it
        mq = torch.tensor(mq) % Lq
    elif mq is not None:
        mq = min(mq, Lq)
    return dict(causal=c["causal"], mass_queries=mq, mass_reduce=c["mass_reduce"], mass_heads=c["mass_heads"])


def _mass_inputs(c):
    g = torch.Generator().manual_seed(1000 + c["i"])
    scale = c["scale"]
    q, k, v = (torch.randn(c["B"], H, L, c["D"], generator=g, dtype=torch.float64) * scale
               for H, L in ((c["Hq"], c["Lq"]), (c["Hkv"], c["Lk"]), (c["Hkv"], c["Lk"])))
    mask = None
    if c["padded"]:
        mask = torch.rand(c["B"], c["Lk"], generator=g) < 0.3
        if c["padded"] == "whole_row":
            mask[0] = True
    dout = torch.randn(c["B"], c["Hq"], c["Lq"], c["D"], generator=g, dtype=torch.float64)
    return q, k, v, mask, dout


def _mass_run(backend, q, k, v, mask, dout, options):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sgattn.use_backend(backend):
        out, mass, lse = sgattn.attention_with_mass(q, k, v, key_padding_mask=mask, return_lse=True, **options)
    return (out, mass, lse) + torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


def _packed(c, q, k, v):
    """The draw's batch as packed sequences: batch entry b's first len_b queries and
    keys (lengths drawn; the later sequences may be empty on either side)."""
    g = torch.Generator().manual_seed(2000 + c["i"])
    lq = torch.randint(0, c["Lq"] + 1, (c["B"],), generator=g)
    lk = torch.randint(0, c["Lk"] + 1, (c["B"],), generator=g)
    lq[0], lk[0] = max(int(lq[0]), 1), max(int(lk[0]), 1)  # one non-empty sequence; others may be empty
    cu = [torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]).int() for n in (lq, lk)]
    pack = [torch.cat([t[b, :, :int(n[b])].transpose(0, 1) for b in range(c["B"])])
            for t, n in ((q, lq), (k, lk), (v, lk))]
    return pack, cu, int(lq.max()), int(lk.max())


def _mass_backends():
    names = []
    for name in BACKENDS:
        backend = sgattn.backends.get_backend(name)
        q = torch.zeros(1, 2, 4, 16)
        if backend.unsupported("attention_with_mass", (q, q[:, :1], q[:, :1]), scale=None, causal=True,
                               key_padding_mask=None, mass_queries=2, mass_reduce="sum", mass_heads="none",
                               return_lse=True) is None:
            names.append(name)
    return names


@pytest.mark.parametrize("backend", _mass_backends())
@pytest.mark.parametrize("c", MASS_DRAWS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                                   if k not in ("dtype", "mass_queries"))
                         + f"-{str(c['dtype'])[6:]}")
def test_fuzz_attention_mass(backend, c):
    caps = sgattn.backends.get_backend(backend).capabilities()
    device = caps.devices[0] if caps.devices else "cpu"
    q64, k64, v64, mask, dout = _mass_inputs(c)
    low = [t.to(c["dtype"]) for t in (q64, k64, v64)]
    what = f"{backend} {c}"
    if c["varlen"]:
        (qp, kp, vp), (cu_q, cu_k), mq, mk = _packed(c, *low)
        options = _mass_options(c, qp.shape[0])

        def run(name, *qkv):
            with sgattn.use_backend(name):
                return sgattn.attention_with_mass_varlen(*qkv, cu_q.to(qkv[0].device), cu_k.to(qkv[0].device),
                                                         mq, mk, return_lse=True, **{
                                                             k: (v.to(qkv[0].device) if torch.is_tensor(v) else v)
                                                             for k, v in options.items()})
        got = run(backend, *(t.to(device) for t in (qp, kp, vp)))
        want = run("reference", qp, kp, vp)
        want64 = run("reference", *(t.double() for t in (qp, kp, vp)))
        names, extra = ("out", "mass", "lse"), {}
    else:
        options = _mass_options(c, c["Lq"])
        dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in options.items()}
        got = _mass_run(backend, *(t.to(device) for t in low), None if mask is None else mask.to(device), dout, dev)
        want = _mass_run("reference", *low, mask, dout, options)
        want64 = _mass_run("reference", q64, k64, v64, mask, dout, options)
        names = ("out", "mass", "lse", "dq", "dk", "dv")
        # a flash-style backward takes P from the stored fp32 lse and delta from fp32 rows: the
        # allowance the attention fuzz gives it, on the kv heads expanded to the query heads
        G = c["Hq"] // c["Hkv"]
        k_all, v_all = (t.repeat_interleave(G, 1) for t in (k64, v64))
        col_mean = sgattn.reference.attention_with_mass(q64, k64, v64, causal=c["causal"], key_padding_mask=mask,
                                                        mass_reduce="mean", mass_heads="mean")[1]
        extra = flash_row_errors(q64, k_all, v_all, dout, want64[0], col_mean, want64[3], c["D"] ** -0.5)
    # one more fp32 ulp of the scores, on every P of a row (the lse and each probability of the mass)
    G = c["Hq"] // c["Hkv"]
    s_max = (q64 @ k64.repeat_interleave(G, 1).transpose(-1, -2)).abs().max().item() * c["D"] ** -0.5
    rho = 2.0 ** -23 * (s_max + math.log(c["Lk"]))
    extra.setdefault("lse", rho)
    extra.setdefault("mass", rho * want64[1].abs().max().item())
    for name, g, w, w64 in zip(names, got, want, want64):
        g = g.cpu()
        assert g.shape == w64.shape, (name, what)
        assert torch.isfinite(g).all() or name == "lse", (name, what)
        if name == "lse":  # -inf exactly where the query sees no key
            assert torch.equal(g.isinf(), w64.isinf()), what
            g, w, w64 = (t.nan_to_num(0, 0, 0) for t in (g, w, w64))
        assert_close_to_reference(g, w, w64, what=f"{name} {what}", extra=extra.get(name, 0.0))
