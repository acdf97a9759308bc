"""The argument contract of sgattn's ops in Python, shared by the public ops
(``sgattn.ops``) and the Triton custom ops (``sgattn.triton.ops``); the
native ops' bindings have its C++ twin (csrc/op_contract.h), worded the same.
Every failure is a ValueError "op: problem" (tests/test_contract.py runs one
table of bad arguments against all of them).

The attention checks take the registered ops' arguments (window 0 is global
attention, the grid as H, W); a public op checks its own options (``hw`` a
pair, ``window`` None or >= 1) before handing them on.
"""
from __future__ import annotations

import torch

from .composition import reallocated_length

INT64_MAX = 2 ** 63 - 1
FLOAT32_MAX = torch.finfo(torch.float32).max

NO_HEADS = ("the importance is a mean over heads and h = 0 (with B > 0) has none; "
            "pass need_importance=False or at least one head")


def fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _names(dtypes) -> str:
    names = [str(t).removeprefix("torch.") for t in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_dims(op, name, t, ndim):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_dtypes(op, named, allowed):
    """The first named tensor has a dtype in ``allowed``, the others the same one."""
    (first_name, first), *rest = named
    if first.dtype not in allowed:
        fail(op, f"{first_name} has unsupported dtype {first.dtype}; use {_names(allowed)}")
    for name, t in rest:
        if t.dtype != first.dtype:
            fail(op, f"dtype mismatch: {first_name} is {first.dtype} but {name} is {t.dtype}")


def check_devices(op, named):
    (first_name, first), *rest = named
    for name, t in rest:
        if t.device != first.device:
            fail(op, f"device mismatch: {first_name} is on {first.device} but {name} is on {t.device}")


def check_grid_size(op, H, W, n, what="N"):
    """H*W equals the n tokens of ``what``. A product beyond int64 is named as
    the kernels name it (it would wrap there; a Python int cannot equal n)."""
    if H * W != n:
        if H * W > INT64_MAX:
            fail(op, f"H*W = {H}*{W} overflows int64")
        fail(op, f"H*W = {H}*{W} = {H * W} does not match {what} = {n}")


def check_attention(op, q, k, v, window, H, W, need_importance, dtypes):
    """q [B, h, N, d], k [B, h, M, d], v [B, h, M, dv] of one dtype in
    ``dtypes`` and one device; window 0 is global attention (H, W unused),
    window > 0 needs M == N == H*W. Returns (B, h, N, M, d, dv)."""
    named = (("q", q), ("k", k), ("v", v))
    for name, t in named:
        check_dims(op, name, t, 4)
    check_dtypes(op, named, dtypes)
    check_devices(op, named)
    B, h, N, d = q.shape
    M, dv = k.shape[2], v.shape[3]
    if tuple(k.shape[:2]) != (B, h) or k.shape[3] != d:
        fail(op, f"k must be [B, h, M, d] = [{B}, {h}, M, {d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        fail(op, f"v must be [B, h, M, dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if need_importance and h == 0 and B > 0:
        fail(op, NO_HEADS)
    if N < 1 or M < 1:  # a softmax over no keys, or of no queries, is undefined
        fail(op, f"need at least one query and one key, got N={N}, M={M}")
    for name, n in (("head dim d", d), ("value head dim dv", dv)):
        if n < 1:
            fail(op, f"{name} = {n} must be >= 1")
    if window < 0:
        fail(op, f"window must be >= 0 (0: global attention), got {window}")
    if not window:
        if H < 0 or W < 0:
            fail(op, f"H and W must be >= 0 (unused in global mode), got H={H}, W={W}")
    else:
        if M != N:
            fail(op, f"window mode needs as many keys as queries, got N={N}, M={M}")
        if H < 1 or W < 1:
            fail(op, f"window mode needs a grid H, W >= 1, got H={H}, W={W}")
        check_grid_size(op, H, W, N)
    return B, h, N, M, d, dv


def check_scale(op, scale):
    """A registered op's scale: the kernels scale in float32."""
    if not abs(scale) <= FLOAT32_MAX:  # also false for NaN
        fail(op, f"scale must be finite (in float32), got {scale}")


def check_attention_grads(op, q, v, dout, out, lse):
    """The backward's dout and the forward's out [B, h, N, dv] (q's dtype) and
    lse (float32 [B, h, N]); after ``check_attention``."""
    B, h, N, _ = q.shape
    want = (B, h, N, v.shape[3])
    for name, t in (("dout", dout), ("out", out)):
        check_dims(op, name, t, 4)
        if tuple(t.shape) != want:
            fail(op, f"{name} must be [B, h, N, dv] = {list(want)}, got {tuple(t.shape)}")
    check_dtypes(op, (("q", q), ("dout", dout), ("out", out)), (q.dtype,))
    check_dims(op, "lse", lse, 3)
    if tuple(lse.shape) != (B, h, N) or lse.dtype != torch.float32:
        fail(op, f"lse must be float32 [B, h, N] = [{B}, {h}, {N}] (the forward's), got {lse.dtype} {tuple(lse.shape)}")


def check_tokens(op, x):
    """x [B, N, C] holds at least one token and one channel."""
    if x.shape[1] < 1 or x.shape[2] < 1:
        fail(op, f"need at least one token and one channel, got x {tuple(x.shape)}")


def check_aggregate(op, x, index, weights, biases, group_sizes, dtypes, names=("weights", "biases")):
    """x [B, N, C], index [G, B, N] int64, ``weights`` the parts' r_p weights
    concatenated, ``biases`` [P] (None for the backward), named as the op's
    arguments are."""
    w_name, b_name = names
    check_dims(op, "x", x, 3)
    check_dims(op, "index", index, 3)
    check_dims(op, w_name, weights, 1)
    named = [("x", x), (w_name, weights)]
    if biases is not None:
        check_dims(op, b_name, biases, 1)
        named.append((b_name, biases))
    check_dtypes(op, named, dtypes)
    sizes = list(group_sizes)
    if len(sizes) not in (2, 3) or any(r < 1 for r in sizes):
        fail(op, f"group_sizes must be 2 or 3 positive ints, got {sizes}")
    N = x.shape[1]
    if sum(sizes) > INT64_MAX or max(sizes) + N > INT64_MAX:  # the kernels' plan sums them in int64
        fail(op, f"group_sizes {sizes} overflow int64")
    if weights.shape[0] != sum(sizes):
        fail(op, f"{w_name} must hold sum(group_sizes) = {sum(sizes)} weights, got {weights.shape[0]}")
    if biases is not None and biases.shape[0] != len(sizes):
        fail(op, f"{b_name} must hold one bias per part ({len(sizes)}), got {biases.shape[0]}")
    if index.dtype != torch.int64:
        fail(op, f"index must be int64, got {index.dtype}")
    G, B, N = index.shape
    if tuple(x.shape[:2]) != (B, N):
        fail(op, f"x must be [B, N, C] = [{B}, {N}, C] to match index {tuple(index.shape)}, got {tuple(x.shape)}")


def check_permutations(op, index):
    """Every row index[g, b, :] is a permutation of 0..N-1 (an argsort). Reads
    the values: only for tensors on the host."""
    G, B, N = index.shape
    rows = index.reshape(G * B, N)
    bad = (rows.sort(dim=1).values != torch.arange(N, device=index.device)).any(dim=1).nonzero()
    if not len(bad):
        return
    r = int(bad[0])
    g, b, row = r // B, r % B, rows[r].tolist()
    for i, t in enumerate(row):
        if not 0 <= t < N:
            fail(op, f"index values must lie in [0, N) = [0, {N}), got index[{g}, {b}, {i}] = {t}")
    seen = set()
    for i, t in enumerate(row):
        if t in seen:
            fail(op, f"index[{g}, {b}] is not a permutation of 0..N-1 (value {t} repeats at position {i}); "
                     "each row must be the argsort of an importance vector")
        seen.add(t)


def check_aggregate_grad(op, x, index, grad, group_sizes, name="grad"):
    """The backward's incoming gradient [G, B, M, C] in x's dtype; after ``check_aggregate``."""
    check_dims(op, name, grad, 4)
    G, B, N = index.shape
    want = (G, B, reallocated_length(N, list(group_sizes)), x.shape[2])
    if tuple(grad.shape) != want:
        fail(op, f"{name} must be [G, B, M, C] = {list(want)}, got {tuple(grad.shape)}")
    check_dtypes(op, (("x", x), (name, grad)), (x.dtype,))
