"""Attention with per-key attention mass: the output and, from the same pass,
how much attention every key receives (KV-cache eviction, token pruning).

Shapes: B batch, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv;
query head h uses kv head h // (Hq // Hkv), as flash-attention and
transformers' repeat_kv do), Lq queries, Lk keys, D head dim, Dv value dim.

The mass of key j is the sum, over the chosen queries i, of the probability
P_ij = softmax_j(scale * q_i . k_j) over the keys query i sees, then reduced:

- ``mass_queries``: None (all queries), an int n (the last n queries: SnapKV's
  observation window; n = 1 for TOVA/FastV), or a 1-D integer index tensor of
  queries (EViT's CLS row: ``torch.tensor([0])``; a repeated index counts as
  often as it appears);
- ``mass_reduce`` over those queries: "sum"; "mean" (divided by the number of
  chosen queries, those that see no key included); "causal_mean" (divided, per
  key, by the number of chosen queries that see it, 0 where none does:
  kvpress's ObservedAttention normalisation);
- ``mass_heads``: "none" -> [B, Hq, Lk]; "group_sum" / "group_mean" (over the
  Hq // Hkv query heads sharing a kv head) -> [B, Hkv, Lk]; "mean" (over all
  Hq heads) -> [B, Lk].

``causal`` is bottom-right aligned (query i sees keys j <= i + Lk - Lq, as in
flash-attention >= 2.1): with Lq > Lk the first Lq - Lk queries see no key.
``key_padding_mask`` [B, Lk] bool is True for padding keys (torch's
``nn.MultiheadAttention`` convention; invert a transformers ``attention_mask``).
A query that sees no key gets output 0 and lse -inf and gives no mass.

mass (and lse) is fp32 (fp64 for fp64 inputs), detached, and the same from
run to run; out is differentiable in q, k, v. lse is the natural log of
sum_j exp(scale * q_i . k_j) over the keys query i sees, [B, Hq, Lq].
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .backends import select
from .backends.mass_kernels import MASS_HEAD_REDUCTIONS, MASS_REDUCTIONS
from .contract import check_dims as _check_tensor
from .contract import fail as _fail
from .ops import _autocast_dtype, _cast, _check_options, _check_same, _is_int


# -------------------------------------------------------------- validation

def _check_values(op, t, ok, message):
    """``ok`` (a bool tensor computed from ``t``) must hold. Eager CPU tensors are
    checked here; on an accelerator, for fake tensors and under torch.compile it is
    an asynchronous device-side assert (no host synchronisation); meta tensors
    have no values to check."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t):
        if not bool(ok):
            _fail(op, message)
    elif t.device.type != "meta":
        torch._assert_async(ok, f"sgattn.{op}: {message}")


def _check_heads_and_dims(op, q, k, v, head_axis, length_axis):
    """q, k (and v) have the same dtype and device, matching head dims, Hq % Hkv == 0."""
    named = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    _check_same(op, named)
    Hq, Hkv = q.shape[head_axis], k.shape[head_axis]
    if Hq == 0 or Hkv == 0:
        _fail(op, f"zero heads: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv:
        _fail(op, f"the query heads must be a multiple of the key/value heads, got Hq={Hq} and Hkv={Hkv}")
    if q.shape[-1] != k.shape[-1]:
        _fail(op, f"head dim mismatch: q has D={q.shape[-1]} but k has D={k.shape[-1]}")
    if v is not None and v.shape[:-1] != k.shape[:-1]:
        _fail(op, f"v {tuple(v.shape)} must match k {tuple(k.shape)} in all but the last dimension")
    sizes = (q.shape[length_axis], k.shape[length_axis], q.shape[-1]) + ((v.shape[-1],) if v is not None else ())
    if 0 in sizes:
        _fail(op, f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}"
                  + (f", v {tuple(v.shape)}" if v is not None else ""))


def _check_mass_options(op, q, n_queries, scale, causal, mass_queries, mass_reduce, mass_heads):
    _check_options(op, scale, 0.0)
    if not isinstance(causal, bool):
        _fail(op, f"causal must be a bool, got {causal!r}")
    if mass_reduce not in MASS_REDUCTIONS:
        _fail(op, f"unknown mass_reduce {mass_reduce!r}; use one of {', '.join(MASS_REDUCTIONS)}")
    if mass_heads not in MASS_HEAD_REDUCTIONS:
        _fail(op, f"unknown mass_heads {mass_heads!r}; use one of {', '.join(MASS_HEAD_REDUCTIONS)}")
    if mass_queries is None:
        return
    if isinstance(mass_queries, torch.Tensor):
        if mass_queries.dim() != 1 or mass_queries.numel() == 0:
            _fail(op, f"a mass_queries index tensor must be 1-D and non-empty, got shape {tuple(mass_queries.shape)}")
        if mass_queries.dtype not in (torch.int32, torch.int64):
            _fail(op, f"a mass_queries index tensor must be int32 or int64, got {mass_queries.dtype}")
        if mass_queries.device != q.device:
            _fail(op, f"device mismatch: q is on {q.device} but mass_queries is on {mass_queries.device}")
        in_range = ((mass_queries >= 0) & (mass_queries < n_queries)).all()
        _check_values(op, mass_queries, in_range, f"mass_queries indices must lie in [0, {n_queries})")
    elif not _is_int(mass_queries) or mass_queries < 1 or (n_queries is not None and mass_queries > n_queries):
        limit = "" if n_queries is None else f" and <= {n_queries} (the number of queries)"
        _fail(op, f"mass_queries must be None, an int >= 1{limit}, or an index tensor, got {mass_queries!r}")


def _check_dense(op, q, k, v, lse, key_padding_mask):
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        _check_tensor(op, name, t, 4)
    _check_heads_and_dims(op, q, k, v, head_axis=1, length_axis=2)
    B, Hq, Lq, _ = q.shape
    if k.shape[0] != B:
        _fail(op, f"batch mismatch: q has B={B} but k has B={k.shape[0]}")
    Lk = k.shape[2]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            _fail(op, f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            _fail(op, f"key_padding_mask must be bool (True for padding), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, Lk):
            _fail(op, f"key_padding_mask must be [B, Lk] = [{B}, {Lk}], got {list(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            _fail(op, f"device mismatch: q is on {q.device} but key_padding_mask is on {key_padding_mask.device}")
    if lse is not None:
        _check_lse(op, q, lse, (B, Hq, Lq), "[B, Hq, Lq]")


def _check_lse(op, q, lse, shape, names):
    _check_tensor(op, "lse", lse, len(shape))
    if not lse.is_floating_point():
        _fail(op, f"lse must be a floating-point tensor, got {lse.dtype}")
    if lse.shape != shape:
        _fail(op, f"lse must be {names} = {list(shape)}, got {list(lse.shape)}")
    if lse.device != q.device:
        _fail(op, f"device mismatch: q is on {q.device} but lse is on {lse.device}")


def _check_varlen(op, q, k, v, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        _check_tensor(op, name, t, 3)
    _check_heads_and_dims(op, q, k, v, head_axis=1, length_axis=0)
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            _fail(op, f"{name} must be int32 (flash-attention's layout), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            _fail(op, f"{name} must be 1-D [B + 1] with B >= 1, got shape {list(cu.shape)}")
        if cu.device != q.device:
            _fail(op, f"device mismatch: q is on {q.device} but {name} is on {cu.device}")
        if not _is_int(longest) or longest < 0:
            _fail(op, f"max_seqlen{name[-2:]} must be an int >= 0, got {longest!r}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        _fail(op, f"cu_seqlens_q {list(cu_seqlens_q.shape)} and cu_seqlens_k {list(cu_seqlens_k.shape)} "
                  "must describe the same number of sequences")
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        lengths = cu[1:] - cu[:-1]
        ok = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (lengths <= longest).all()
        _check_values(op, cu, ok, f"{name} must rise from 0 to {total} (the packed length) in steps of at most "
                                  f"max_seqlen{name[-2:]} = {longest}")
    if lse is not None:
        _check_lse(op, q, lse, (q.shape[1], q.shape[0]), "[Hq, total_q]")


# ------------------------------------------------------------------ the ops

def _run(op, tensors, method, **options):
    backend = select(op, tensors, **options)
    return getattr(backend, method)(*tensors, **options)


def attention_with_mass(q, k, v, *, scale=None, causal=False, key_padding_mask=None, mass_queries=None,
                        mass_reduce="sum", mass_heads="none", return_lse=False):
    """Attention output and the attention mass of every key (see the module docstring).

    q [B, Hq, Lq, D]; k [B, Hkv, Lk, D]; v [B, Hkv, Lk, Dv]; same dtype and device.
    ``scale`` defaults to D**-0.5. Under ``torch.autocast`` q, k, v are cast to the
    autocast dtype first. Returns (out [B, Hq, Lq, Dv] in q's dtype, mass), or
    (out, mass, lse [B, Hq, Lq]) with ``return_lse=True``. SG-Former's importance
    (``attention_with_importance``, global mode) is ``mass_reduce="mean", mass_heads="mean"``.
    """
    op = "attention_with_mass"
    _check_dense(op, q, k, v, None, key_padding_mask)
    _check_mass_options(op, q, q.shape[2], scale, causal, mass_queries, mass_reduce, mass_heads)
    if not isinstance(return_lse, bool):
        _fail(op, f"return_lse must be a bool, got {return_lse!r}")
    dtype = _autocast_dtype(q)
    if dtype is not None:
        with torch.autocast(q.device.type, enabled=False):
            return attention_with_mass(*_cast(dtype, (q, k, v)), scale=scale, causal=causal,
                                       key_padding_mask=key_padding_mask, mass_queries=mass_queries,
                                       mass_reduce=mass_reduce, mass_heads=mass_heads, return_lse=return_lse)
    out, mass, lse = _run(op, (q, k, v), "attention_with_mass", scale=scale, causal=causal,
                          key_padding_mask=key_padding_mask, mass_queries=mass_queries, mass_reduce=mass_reduce,
                          mass_heads=mass_heads, return_lse=return_lse)
    return (out, mass, lse) if return_lse else (out, mass)


def attention_mass(q, k, lse, *, scale=None, causal=False, key_padding_mask=None, mass_queries=None,
                   mass_reduce="sum", mass_heads="none"):
    """The mass of ``attention_with_mass`` from the row log-sum-exp ``lse``
    [B, Hq, Lq] that another attention kernel returned (natural log, the same
    scale, mask and causality): one pass over q and k, no v. Returns mass."""
    op = "attention_mass"
    _check_dense(op, q, k, None, lse, key_padding_mask)
    _check_mass_options(op, q, q.shape[2], scale, causal, mass_queries, mass_reduce, mass_heads)
    dtype = _autocast_dtype(q)
    if dtype is not None:
        with torch.autocast(q.device.type, enabled=False):
            return attention_mass(*_cast(dtype, (q, k)), lse, scale=scale, causal=causal,
                                  key_padding_mask=key_padding_mask, mass_queries=mass_queries,
                                  mass_reduce=mass_reduce, mass_heads=mass_heads)
    return _run(op, (q, k, lse), "attention_mass", scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                mass_queries=mass_queries, mass_reduce=mass_reduce, mass_heads=mass_heads)


def attention_with_mass_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None,
                               causal=False, mass_queries=None, mass_reduce="sum", mass_heads="none",
                               return_lse=False):
    """``attention_with_mass`` over packed sequences, in flash-attention's varlen layout.

    q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]; cu_seqlens_q /
    cu_seqlens_k int32 [B + 1], the cumulative lengths (sequence s owns queries
    cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys cu_seqlens_k[s]:cu_seqlens_k[s+1]);
    max_seqlen_q / max_seqlen_k bound the lengths. ``causal`` is bottom-right
    aligned per sequence. ``mass_queries``: an int n takes the last n queries of
    every sequence (all of a shorter one); an index tensor holds packed query
    positions in [0, total_q); "mean" divides by the chosen queries of the key's
    own sequence. Mass is per packed key: [Hq, total_k] ("none"), [Hkv, total_k]
    ("group_sum", "group_mean") or [total_k] ("mean"). Returns (out [total_q, Hq, Dv],
    mass), or (out, mass, lse [Hq, total_q]) with ``return_lse=True``.
    """
    op = "attention_with_mass_varlen"
    _check_varlen(op, q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_mass_options(op, q, None if _is_int(mass_queries) else q.shape[0], scale, causal, mass_queries,
                        mass_reduce, mass_heads)
    if not isinstance(return_lse, bool):
        _fail(op, f"return_lse must be a bool, got {return_lse!r}")
    dtype = _autocast_dtype(q)
    if dtype is not None:
        with torch.autocast(q.device.type, enabled=False):
            return attention_with_mass_varlen(*_cast(dtype, (q, k, v)), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, scale=scale, causal=causal, mass_queries=mass_queries,
                                              mass_reduce=mass_reduce, mass_heads=mass_heads, return_lse=return_lse)
    out, mass, lse = _run(op, (q, k, v), "attention_with_mass_varlen", cu_seqlens_q=cu_seqlens_q,
                          cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                          scale=scale, causal=causal, mass_queries=mass_queries, mass_reduce=mass_reduce,
                          mass_heads=mass_heads, return_lse=return_lse)
    return (out, mass, lse) if return_lse else (out, mass)


def attention_mass_varlen(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None,
                          causal=False, mass_queries=None, mass_reduce="sum", mass_heads="none"):
    """``attention_mass`` over packed sequences: lse [Hq, total_q] (flash-attention's
    varlen lse layout); the rest as ``attention_with_mass_varlen``. Returns mass."""
    op = "attention_mass_varlen"
    _check_varlen(op, q, k, None, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_mass_options(op, q, None if _is_int(mass_queries) else q.shape[0], scale, causal, mass_queries,
                        mass_reduce, mass_heads)
    dtype = _autocast_dtype(q)
    if dtype is not None:
        with torch.autocast(q.device.type, enabled=False):
            return attention_mass_varlen(*_cast(dtype, (q, k)), lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, scale=scale, causal=causal, mass_queries=mass_queries,
                                         mass_reduce=mass_reduce, mass_heads=mass_heads)
    return _run(op, (q, k, lse), "attention_mass_varlen", cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale, causal=causal,
                mass_queries=mass_queries, mass_reduce=mass_reduce, mass_heads=mass_heads)
