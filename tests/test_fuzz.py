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
import os
import random

import pytest
import torch

import sgattn
from sgattn.testing import aggregate_case, attention_case
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
