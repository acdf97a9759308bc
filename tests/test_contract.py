"""One table of bad arguments, run against every entry point that takes them:
the public ops (``sgattn.*``), the registered C++ ops (``torch.ops.sgattn.*``;
csrc/op_contract.h) on CPU tensors and, on a GPU, on CUDA tensors, and the
Triton custom ops (``torch.ops.sgattn.triton_*``, under the interpreter on a
machine without a GPU). Each row names the registered op its arguments are
for; every target raises the row's exception type with a message
"<its op name>: ..." matching the row's pattern. The public and Triton ops
check through one Python contract (sgattn/contract.py), the C++ twin words
it the same: a pattern allows only what must differ, the argument names of
the Triton schemas (w_cat, b_cat, dout for weights, biases, grad) and how
C++ and Python print a dtype (Float, torch.float32). A row a target cannot
express, or where a target's declared capabilities differ, says why it skips it.

Cases a single backend owns stay with it: devices and layouts reached only by
redispatch and the inputs that used to abort the process (tests/test_native_ops.py),
the CUDA device checks (tests/test_cuda_build.py), the Triton grid limits
(tests/test_triton.py).
"""
import dataclasses
import os
import re
from typing import Callable

import pytest
import torch

import sgattn
import sgattn.ops
from sgattn.backends import unavailable_reason

# -------------------------------------------------------------------- targets


def _target_device(target):
    """The device of the target's tensors, or skips with the reason it is not here."""
    if target == "public":
        return "cpu"
    why = unavailable_reason(target)
    if target == "cpu" and why is not None and os.environ.get("SGATTN_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"SGATTN_REQUIRE_NATIVE=1 but the cpu backend is unavailable: {why}")
    if why is not None:
        pytest.skip(f"backend {target} is not present here: {why}")
    if target == "triton":
        from sgattn.triton import launch
        return "cpu" if launch.INTERPRET else "cuda"
    return target


def _registered(target, op):
    from sgattn import _native
    _native.op(op)  # loads the extension that defines the ops
    return getattr(torch.ops.sgattn, f"triton_{op}" if target == "triton" else op)


def _importance_of(index):
    """A [B, N] importance whose stable ascending argsort is index[0]."""
    _, B, N = index.shape
    return torch.empty(B, N, device=index.device).scatter_(
        1, index[0], torch.arange(N, dtype=torch.float32, device=index.device).expand(B, N).contiguous())


def _public(op, args):
    """(public op name, call) taking the registered op's arguments."""
    if op == "attention_fwd":
        q, k, v, scale, window, H, W, need_importance = args
        options = dict(scale=scale, window=window or None, hw=(H, W) if window else None)
        if need_importance:
            return "attention_with_importance", lambda: sgattn.attention_with_importance(q, k, v, **options)
        assert not window
        return "attention", lambda: sgattn.ops.attention(q, k, v, scale=scale)
    assert op == "aggregate_fwd", op
    x, index, w, b, group_sizes = args
    weights = list(w.split(list(group_sizes)))
    return "reallocate_tokens", lambda: sgattn.reallocate_tokens(x, _importance_of(index), weights, list(b.split(1)))


# ---------------------------------------------------------------------- table


@dataclasses.dataclass
class Case:
    what: str
    op: str  # the registered op the arguments are for
    build: Callable  # device -> the op's arguments
    match: str  # re.search'ed in every target's message (after its "op: ")
    error: type = ValueError
    skip: dict = dataclasses.field(default_factory=dict)  # target -> why it does not take this row


def _rand(*shape, dev, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=dev)


def _qkv(dev):
    q = _rand(1, 2, 12, 16, dev=dev)  # d = 16: inside every backend's head dims
    return q, _rand(1, 2, 5, 16, dev=dev)


def _fwd(fn):
    def build(dev):
        q, k5 = _qkv(dev)
        return fn(q, k5, dev)
    return build


def _bwd(fn):
    """attention_bwd's arguments: fn(q, dout, out, lse, k5, dev) -> all of them."""
    def build(dev):
        q, k5 = _qkv(dev)
        g = torch.Generator().manual_seed(7)
        out = torch.randn(1, 2, 12, 16, generator=g).to(dev)
        lse = torch.randn(1, 2, 12, generator=g).to(dev)
        return fn(q, out.clone(), out, lse, k5, dev)
    return build


NO_BWD = "the public ops compute out, lse and dout themselves"
NO_INDEX = "the public op sorts the importance itself: it takes no index"
NO_GROUPS = "the public op takes the group sizes as the lengths of the weights"
WINDOW_ZERO = "the public ops take window=None for global attention (window 0 is refused)"
DEVICE_INDEX = "the cuda kernels check index values on the device (an asynchronous assert, tests/test_cuda_build.py)"

ATTENTION = [
    Case("q not 4-D", "attention_fwd", _fwd(lambda q, k, dev: (q[0], q, q, 0.3, 0, 0, 0, True)),
         r"q must have 4 dimensions"),
    Case("integer dtype", "attention_fwd",
         _fwd(lambda q, k, dev: (*(torch.ones(1, 2, 12, 16, dtype=torch.int32, device=dev),) * 3, 0.3, 0, 0, 0, True)),
         r"q has unsupported dtype \S*(Int|int32)\b"),
    Case("float64", "attention_fwd", _fwd(lambda q, k, dev: (q.double(), q.double(), q.double(), 0.3, 0, 0, 0, True)),
         r"q has unsupported dtype \S*(Double|float64)\b",
         skip={"public": "the public ops run float64 (on the reference backend)"}),
    Case("dtype mismatch", "attention_fwd", _fwd(lambda q, k, dev: (q, q.half(), q, 0.3, 0, 0, 0, True)),
         r"dtype mismatch: q is \S*(Float|float32) but k is \S*(Half|float16)$"),
    Case("k shape", "attention_fwd",
         _fwd(lambda q, k, dev: (q, _rand(1, 2, 5, 8, dev=dev), _rand(1, 2, 5, 8, dev=dev), 0.3, 0, 0, 0, True)),
         r"k must be \[B, h, M, d\] = \[1, 2, M, 16\] to match q"),
    Case("v shape", "attention_fwd", _fwd(lambda q, k, dev: (q, k, _rand(1, 2, 6, 16, dev=dev), 0.3, 0, 0, 0, True)),
         r"v must be \[B, h, M, dv\] matching k"),
    Case("importance over zero heads", "attention_fwd",
         _fwd(lambda q, k, dev: (*(_rand(2, 0, 12, 16, dev=dev),) * 3, 0.3, 0, 0, 0, True)),
         r"the importance is a mean over heads and h = 0 \(with B > 0\) has none; "
         r"pass need_importance=False or at least one head$"),
    Case("N = 0", "attention_fwd", _fwd(lambda q, k, dev: (q[:, :, :0], k, k, 0.3, 0, 0, 0, True)),
         r"need at least one query and one key, got N=0, M=5$"),
    Case("M = 0", "attention_fwd", _fwd(lambda q, k, dev: (q, k[:, :, :0], k[:, :, :0], 0.3, 0, 0, 0, True)),
         r"need at least one query and one key, got N=12, M=0$"),
    Case("N = 0, no importance", "attention_fwd", _fwd(lambda q, k, dev: (q[:, :, :0], k, k, 0.3, 0, 0, 0, False)),
         r"need at least one query and one key, got N=0, M=5$"),
    Case("d = 0", "attention_fwd", _fwd(lambda q, k, dev: (*(q[..., :0],) * 3, 0.3, 0, 0, 0, True)),
         r"head dim d = 0 must be >= 1$"),
    Case("dv = 0", "attention_fwd", _fwd(lambda q, k, dev: (q, k, k[..., :0], 0.3, 0, 0, 0, True)),
         r"value head dim dv = 0 must be >= 1$"),
    Case("head dim above the kernels'", "attention_fwd",
         _fwd(lambda q, k, dev: (*(_rand(1, 1, 4, 130, dev=dev),) * 3, 0.3, 0, 0, 0, True)),
         r"head dim d = 130 is outside \d+\.\.128",
         skip={"cpu": "the cpu kernels take any head dim", "public": "the public op picks a backend that runs it"}),
    Case("dv != d", "attention_fwd", _fwd(lambda q, k, dev: (q, k, k[..., :8], 0.3, 0, 0, 0, True)),
         r"the cuda kernels need the value head dim dv = 8 to equal the head dim d = 16",
         skip={t: "only the cuda kernels need dv == d" for t in ("cpu", "triton", "public")}),
    Case("scale nan", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, float("nan"), 0, 0, 0, True)),
         r"scale must be finite"),
    Case("scale beyond float32", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 1e300, 0, 0, 0, True)),
         r"scale must be finite \(in float32\), got 1e\+300",
         skip={"public": "the public ops take any finite scale (float64 inputs run on the reference backend)"}),
    Case("negative window", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, -1, 3, 4, True)),
         r"window must be >= 0 \(0: global attention\), got -1", skip={"public": WINDOW_ZERO}),
    Case("negative H in global mode", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, 0, -3, 4, True)),
         r"H and W must be >= 0 \(unused in global mode\), got H=-3, W=4",
         skip={"public": "the public ops take no grid in global mode"}),
    Case("window mode, M != N", "attention_fwd", _fwd(lambda q, k, dev: (q, k, k, 0.3, 3, 3, 4, True)),
         r"window mode needs as many keys as queries, got N=12, M=5"),
    Case("window mode, W = 0", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, 3, 12, 0, True)),
         r"window mode needs a grid H, W >= 1, got H=12, W=0$"),
    Case("window mode, negative grid", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, 3, -3, -4, True)),
         r"window mode needs a grid H, W >= 1, got H=-3, W=-4$"),
    Case("H*W overflows", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, 3, 2 ** 32, 2 ** 32, True)),
         r"H\*W = 4294967296\*4294967296 overflows int64$"),
    Case("H*W wraps to N", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, 3, 2 ** 62 + 3, 4, True)),
         r"H\*W = 4611686018427387907\*4 overflows int64$"),
    Case("H*W != N", "attention_fwd", _fwd(lambda q, k, dev: (q, q, q, 0.3, 3, 3, 5, True)),
         r"H\*W = 3\*5 = 15 does not match N = 12"),
    Case("bwd dout shape", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do[..., :8], q, q, q, o, lse, 0.3, 0, 0, 0)),
         r"dout must be \[B, h, N, dv\] = \[1, 2, 12, 16\], got", skip={"public": NO_BWD}),
    Case("bwd dout rank", "attention_bwd", _bwd(lambda q, do, o, lse, k, dev: (do[0], q, q, q, o, lse, 0.3, 0, 0, 0)),
         r"dout must have 4 dimensions", skip={"public": NO_BWD}),
    Case("bwd dout dtype", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do.bfloat16(), q, q, q, o, lse, 0.3, 0, 0, 0)),
         r"dtype mismatch: q is \S*(Float|float32) but dout is \S*(BFloat16|bfloat16)$", skip={"public": NO_BWD}),
    Case("bwd out shape", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do, q, q, q, o[:, :, :11], lse, 0.3, 0, 0, 0)),
         r"out must be \[B, h, N, dv\] = \[1, 2, 12, 16\], got", skip={"public": NO_BWD}),
    Case("bwd out dtype", "attention_bwd", _bwd(lambda q, do, o, lse, k, dev: (do, q, q, q, o.half(), lse, 0.3, 0, 0, 0)),
         r"dtype mismatch: q is \S*(Float|float32) but out is \S*(Half|float16)$", skip={"public": NO_BWD}),
    Case("bwd lse dtype", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do, q, q, q, o, lse.double(), 0.3, 0, 0, 0)),
         r"lse must be float32 \[B, h, N\] = \[1, 2, 12\] \(the forward's\), got \S*(Double|float64)",
         skip={"public": NO_BWD}),
    Case("bwd lse shape", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do, q, q, q, o, lse[:, :1], 0.3, 0, 0, 0)),
         r"lse must be float32 \[B, h, N\] = \[1, 2, 12\] \(the forward's\), got \S*(Float|float32) \S*1, 1, 12",
         skip={"public": NO_BWD}),
    Case("bwd lse rank", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do, q, q, q, o, lse[..., None], 0.3, 0, 0, 0)),
         r"lse must have 3 dimensions", skip={"public": NO_BWD}),
    Case("bwd H*W != N", "attention_bwd", _bwd(lambda q, do, o, lse, k, dev: (do, q, q, q, o, lse, 0.3, 3, 4, 4)),
         r"H\*W = 4\*4 = 16 does not match N = 12", skip={"public": NO_BWD}),
    Case("bwd window mode, M != N", "attention_bwd",
         _bwd(lambda q, do, o, lse, k, dev: (do, q, k, k, o, lse, 0.3, 3, 3, 4)),
         r"window mode needs as many keys as queries, got N=12, M=5", skip={"public": NO_BWD}),
]


def _agg(fn, G=1):
    """Aggregation arguments from fn(x, index, w, b, grad, dev): x [2, 12, 16],
    an index of G orderings, group sizes (2, 1) (M = 3 + 6)."""
    def build(dev):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 12, 16, generator=g).to(dev)
        index = torch.stack([torch.randperm(12, generator=g) for _ in range(G * 2)]).reshape(G, 2, 12).to(dev)
        w, b = torch.randn(3, generator=g).to(dev), torch.randn(2, generator=g).to(dev)
        grad = torch.randn(G, 2, 9, 16, generator=g).to(dev)
        return fn(x, index, w, b, grad, dev)
    return build


def _set(index, at, value):
    index = index.clone()
    index[at] = value
    return index


AGGREGATION = [
    Case("x not 3-D", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x[0], i, w, b, [2, 1])),
         r"x must have 3 dimensions"),
    Case("x integer", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x.long(), i, w.long(), b.long(), [2, 1])),
         r"x has unsupported dtype \S*(Long|int64)\b"),
    Case("index int32", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i.int(), w, b, [2, 1])),
         r"index must be int64, got \S*(Int|int32)\b", skip={"public": NO_INDEX}),
    Case("index shape", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i[:, :, :11], w, b, [2, 1])),
         r"x must be \[B, N, C\] = \[2, 11, C\] to match index", skip={"public": NO_INDEX}),
    Case("index 2-D", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i[0], w, b, [2, 1])),
         r"index must have 3 dimensions", skip={"public": NO_INDEX}),
    Case("one part", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w[:2], b[:1], [2])),
         r"group_sizes must be 2 or 3 positive ints, got \[2\]", skip={"public": NO_GROUPS}),
    Case("four parts", "aggregate_fwd",
         _agg(lambda x, i, w, b, gr, dev: (x, i, _rand(4, dev=dev), _rand(4, dev=dev), [1, 1, 1, 1])),
         r"group_sizes must be 2 or 3 positive ints, got \[1, 1, 1, 1\]", skip={"public": NO_GROUPS}),
    Case("zero group", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w[:2], b, [2, 0])),
         r"group_sizes must be 2 or 3 positive ints, got \[2, 0\]", skip={"public": NO_GROUPS}),
    Case("negative group", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w, _rand(3, dev=dev), [5, -3, 1])),
         r"group_sizes must be 2 or 3 positive ints, got \[5, -3, 1\]", skip={"public": NO_GROUPS}),
    Case("group sizes overflow", "aggregate_fwd",
         _agg(lambda x, i, w, b, gr, dev: (x, i, w, _rand(3, dev=dev), [2 ** 62, 2 ** 62, 1])),
         r"group_sizes \[4611686018427387904, 4611686018427387904, 1\] overflow int64$", skip={"public": NO_GROUPS}),
    Case("group size + N overflows", "aggregate_fwd",
         _agg(lambda x, i, w, b, gr, dev: (x, i, w, b, [2 ** 63 - 5, 1])),
         r"group_sizes \[9223372036854775803, 1\] overflow int64$", skip={"public": NO_GROUPS}),
    Case("weights count", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w, b, [3, 1])),
         r"(weights|w_cat) must hold sum\(group_sizes\) = 4 weights, got 3", skip={"public": NO_GROUPS}),
    Case("weights 2-D", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w.reshape(1, 3), b, [2, 1])),
         r"(weights|w_cat) must have 1 dimensions", skip={"public": NO_GROUPS}),
    Case("weights dtype", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w.double(), b, [2, 1])),
         r"dtype mismatch: x is \S*(Float|float32) but (weights|w_cat|part 0's weight) is \S*(Double|float64)$"),
    Case("biases count", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w, _rand(3, dev=dev), [2, 1])),
         r"(biases|b_cat) must hold one bias per part \(2\), got 3",
         skip={"public": "the public op takes one bias tensor per part"}),
    Case("biases dtype", "aggregate_fwd", _agg(lambda x, i, w, b, gr, dev: (x, i, w, b.half(), [2, 1])),
         r"dtype mismatch: x is \S*(Float|float32) but (biases|b_cat|part 0's bias) is \S*(Half|float16)$"),
    Case("index value too big", "aggregate_fwd",
         _agg(lambda x, i, w, b, gr, dev: (x, _set(i, (0, 1, 2), 12), w, b, [2, 1])),
         r"index values must lie in \[0, N\) = \[0, 12\), got index\[0, 1, 2\] = 12$",
         skip={"public": NO_INDEX, "cuda": DEVICE_INDEX}),
    Case("index value negative", "aggregate_fwd",
         _agg(lambda x, i, w, b, gr, dev: (x, _set(i, (0, 1, 11), -5), w, b, [2, 1])),
         r"index values must lie in \[0, N\) = \[0, 12\), got index\[0, 1, 11\] = -5$",
         skip={"public": NO_INDEX, "cuda": DEVICE_INDEX}),
    Case("index repeats", "aggregate_fwd",
         _agg(lambda x, i, w, b, gr, dev: (x, _set(i, (0, 0, 4), i[0, 0, 7]), w, b, [2, 1])),
         r"index\[0, 0\] is not a permutation of 0\.\.N-1 \(value \d+ repeats at position 7\); "
         r"each row must be the argsort of an importance vector$", skip={"public": NO_INDEX, "cuda": DEVICE_INDEX}),
    Case("bwd grad shape", "aggregate_bwd", _agg(lambda x, i, w, b, gr, dev: (gr[:, :, :8], x, i, w, [2, 1]), G=2),
         r"(grad|dout) must be \[G, B, M, C\] = \[2, 2, 9, 16\], got", skip={"public": NO_BWD}),
    Case("bwd grad rank", "aggregate_bwd", _agg(lambda x, i, w, b, gr, dev: (gr[0], x, i, w, [2, 1]), G=2),
         r"(grad|dout) must have 4 dimensions", skip={"public": NO_BWD}),
    Case("bwd grad dtype", "aggregate_bwd", _agg(lambda x, i, w, b, gr, dev: (gr.double(), x, i, w, [2, 1]), G=2),
         r"dtype mismatch: x is \S*(Float|float32) but (grad|dout) is \S*(Double|float64)$", skip={"public": NO_BWD}),
    Case("bwd group sizes", "aggregate_bwd", _agg(lambda x, i, w, b, gr, dev: (gr, x, i, w, [2, 1, 0]), G=2),
         r"group_sizes must be 2 or 3 positive ints, got \[2, 1, 0\]", skip={"public": NO_BWD}),
    Case("bwd weights dtype", "aggregate_bwd", _agg(lambda x, i, w, b, gr, dev: (gr, x, i, w.half(), [2, 1]), G=2),
         r"dtype mismatch: x is \S*(Float|float32) but (weights|w_cat) is \S*(Half|float16)$", skip={"public": NO_BWD}),
    Case("bwd index repeats", "aggregate_bwd",
         _agg(lambda x, i, w, b, gr, dev: (gr, x, _set(i, (1, 0, 4), i[1, 0, 7]), w, [2, 1]), G=2),
         r"index\[1, 0\] is not a permutation of 0\.\.N-1 \(value \d+ repeats at position 7\); "
         r"each row must be the argsort of an importance vector$", skip={"public": NO_BWD, "cuda": DEVICE_INDEX}),
]

CASES = ATTENTION + AGGREGATION
TARGETS = ("public", "cpu", "triton", "cuda")


def test_every_row_names_a_registered_op():
    from sgattn._schemas import SCHEMAS
    assert {c.op for c in CASES} == set(SCHEMAS)
    assert len({(c.op, c.what) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.what}" for c in CASES])
def test_bad_argument_table(case, target):
    if target in case.skip:
        pytest.skip(case.skip[target])
    device = _target_device(target)
    torch.manual_seed(0)
    args = case.build(device)
    if target == "public":
        if case.op not in ("attention_fwd", "aggregate_fwd"):
            pytest.fail(f"row {case.what!r} of {case.op} has no public op: give the reason in skip")
        name, call = _public(case.op, args)
    else:
        name = f"triton_{case.op}" if target == "triton" else case.op
        op = _registered(target, case.op)
        call = lambda: op(*args)  # noqa: E731
    with pytest.raises(Exception) as info:
        call()
    exc = info.value
    message = str(exc).splitlines()[0]
    assert type(exc) is case.error, f"{target} raised {type(exc).__name__}, not {case.error.__name__}: {message}"
    assert message.startswith(f"{name}: "), f"{target}: {message!r} does not start with '{name}: '"
    assert re.search(case.match, message[len(name) + 2:]), f"{target}: {message!r} does not match {case.match!r}"
