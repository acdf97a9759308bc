"""Attention mass on kernels that return per-head weighted column sums.

A kernel backend implements two primitives (``KernelMass``):

- ``mass_forward(q, k, v, scale, causal, key_padding_mask, query_weight, first_query)`` ->
  (out [B, Hq, Lq, Dv], lse [B, Hq, Lq] natural log, colsum [B, Hq, Lk] fp32),
  out differentiable in q, k, v;
- ``mass_from_lse(q, k, lse, scale, causal, key_padding_mask, query_weight, first_query)`` ->
  colsum [B, Hq, Lk] fp32,

where colsum[b, h, j] = sum_i w_i P[b, h, i, j] (w = query_weight [Lq] fp32,
None for all ones; every weight before query ``first_query`` is 0, which a
kernel may use to skip those queries) over the keys each query sees (causal
bottom-right, key padding True for padding keys; a query that sees no key has
out 0, lse -inf and adds nothing). Everything the mass options add on top (which queries
count, the division over queries, the reduction over heads, packed
sequences) is done here once, in O(B * Hq * Lk), for every kernel backend.
``sgattn.reference`` defines the same quantities on its own (the oracle).
"""
from __future__ import annotations

import torch

MASS_REDUCTIONS = ("sum", "mean", "causal_mean")
MASS_HEAD_REDUCTIONS = ("none", "group_sum", "group_mean", "mean")


def query_weight(mass_queries, Lq: int, device):
    """How often each query counts, [Lq] fp32, or None when every query counts
    once: an int n chooses the last n; an index tensor counts a repeated index
    as often as it appears."""
    if mass_queries is None:
        return None
    if isinstance(mass_queries, torch.Tensor):
        index = mass_queries.reshape(-1).long()
        return torch.zeros(Lq, device=device).index_add_(0, index, torch.ones(index.shape[0], device=device))
    return (torch.arange(Lq, device=device) >= Lq - mass_queries).float()


def first_query(mass_queries, Lq: int) -> int:
    """The first query with a nonzero weight where it is known without reading
    device memory (the last n of an int n), else 0."""
    return 0 if mass_queries is None or isinstance(mass_queries, torch.Tensor) else max(Lq - int(mass_queries), 0)


def reduce_column_sums(colsum, Lq: int, Hkv: int, weight, causal: bool, key_padding_mask, mass_reduce: str,
                       mass_heads: str):
    """colsum [B, Hq, Lk] -> mass: divided over the chosen queries ("mean") or,
    per key, over the chosen queries that see it ("causal_mean"; 0 where none
    does), then reduced over heads by ``mass_heads``."""
    B, Hq, Lk = colsum.shape
    device = colsum.device
    grouped = colsum.unflatten(1, (Hkv, Hq // Hkv))
    if mass_reduce != "sum":
        w = torch.ones(Lq, device=device) if weight is None else weight
        divisor = w.sum()
        if mass_reduce == "causal_mean":  # counts of chosen queries: integers, exact in fp32
            if causal:  # key j is seen by the queries i >= j - (Lk - Lq)
                tail = torch.cat([w.flip(0).cumsum(0).flip(0), w.new_zeros(1)])  # tail[t] = sum of w[t:]
                divisor = tail[(torch.arange(Lk, device=device) - (Lk - Lq)).clamp(0, Lq)]
            if key_padding_mask is not None:
                divisor = divisor * ~key_padding_mask
            if divisor.dim():
                divisor = divisor.reshape(-1, 1, 1, Lk)
        safe = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
        grouped = torch.where(divisor > 0, grouped / safe, torch.zeros_like(grouped))
    if mass_heads == "none":
        return grouped.reshape(B, Hq, Lk)
    if mass_heads == "mean":
        return grouped.mean(dim=(1, 2))
    per_kv = grouped.sum(2)
    return per_kv if mass_heads == "group_sum" else per_kv / (Hq // Hkv)


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _sequences(cu_seqlens_q, cu_seqlens_k, mass_queries):
    """((query range), (key range), that sequence's mass_queries) per packed sequence:
    an int n is the last n queries of each (all of a shorter one); an index
    tensor of packed positions keeps those in the sequence, shifted to it."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        a, b = cq[s], cq[s + 1]
        mq = mass_queries
        if isinstance(mq, torch.Tensor):
            mq = mq[(mq >= a) & (mq < b)] - a
        elif mq is not None:
            mq = min(mq, b - a)
        yield (a, b), (ck[s], ck[s + 1]), mq


def _no_mass(q, k, Lk, mass_heads):
    """The zero mass [1, heads, Lk] (or [1, Lk]) of a sequence without queries or keys."""
    heads = {"none": (q.shape[1],), "mean": ()}.get(mass_heads, (k.shape[1],))
    return torch.zeros(1, *heads, Lk, device=q.device)


class KernelMass:
    """The four mass ops of ``sgattn.backends.Backend`` on a backend's two
    column-sum primitives. The varlen forms run them once per sequence on views
    of the packed tensors (eagerly: the sequence lengths are read on the host,
    so ``mass_limits`` declines them under torch.compile and on fake tensors)."""

    def mass_forward(self, q, k, v, *, scale, causal, key_padding_mask, query_weight, first_query=0):
        raise NotImplementedError

    def mass_from_lse(self, q, k, lse, *, scale, causal, key_padding_mask, query_weight, first_query=0):
        raise NotImplementedError

    def mass_limits(self, op, tensors, options):
        from torch._subclasses.fake_tensor import is_fake

        if op.endswith("_varlen") and (torch.compiler.is_compiling() or is_fake(tensors[0])):
            return [f"{op} runs the {self.name} kernels once per sequence, reading cu_seqlens on the host: "
                    "not under torch.compile nor on fake tensors"]
        return []

    def attention_with_mass(self, q, k, v, *, scale, causal, key_padding_mask, mass_queries, mass_reduce,
                            mass_heads, return_lse):
        weight = query_weight(mass_queries, q.shape[2], q.device)
        out, lse, colsum = self.mass_forward(q, k, v, scale=_scale(scale, q), causal=causal,
                                             key_padding_mask=key_padding_mask, query_weight=weight,
                                             first_query=first_query(mass_queries, q.shape[2]))
        mass = reduce_column_sums(colsum, q.shape[2], k.shape[1], weight, causal, key_padding_mask, mass_reduce,
                                  mass_heads)
        return out, mass, lse

    def attention_mass(self, q, k, lse, *, scale, causal, key_padding_mask, mass_queries, mass_reduce, mass_heads):
        weight = query_weight(mass_queries, q.shape[2], q.device)
        colsum = self.mass_from_lse(q.detach(), k.detach(), lse.detach().float(),  # the mass has no gradient
                                    scale=_scale(scale, q), causal=causal, key_padding_mask=key_padding_mask,
                                    query_weight=weight, first_query=first_query(mass_queries, q.shape[2]))
        return reduce_column_sums(colsum, q.shape[2], k.shape[1], weight, causal, key_padding_mask, mass_reduce,
                                  mass_heads)

    def attention_with_mass_varlen(self, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   return_lse, mass_heads, **options):
        outs, masses, lses = [], [], []
        for (a, b), (c, e), mq in _sequences(cu_seqlens_q, cu_seqlens_k, options.pop("mass_queries")):
            qs, ks, vs = (t[i:j].transpose(0, 1)[None] for t, i, j in ((q, a, b), (k, c, e), (v, c, e)))
            if b == a or e == c:  # no queries, or no keys: out 0, lse -inf, no mass
                out = q.new_zeros(1, q.shape[1], b - a, v.shape[2])
                lse = torch.full((1, q.shape[1], b - a), float("-inf"), device=q.device)
                mass = _no_mass(q, k, e - c, mass_heads)
            else:
                out, mass, lse = self.attention_with_mass(qs, ks, vs, key_padding_mask=None, mass_queries=mq,
                                                          mass_heads=mass_heads, return_lse=True, **options)
            outs.append(out[0].transpose(0, 1))
            masses.append(mass[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(masses, -1), torch.cat(lses, -1)

    def attention_mass_varlen(self, q, k, lse, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              mass_heads, **options):
        masses = []
        for (a, b), (c, e), mq in _sequences(cu_seqlens_q, cu_seqlens_k, options.pop("mass_queries")):
            if b == a or e == c:
                masses.append(_no_mass(q, k, e - c, mass_heads)[0])
                continue
            qs, ks = (t[i:j].transpose(0, 1)[None] for t, i, j in ((q, a, b), (k, c, e)))
            masses.append(self.attention_mass(qs, ks, lse[:, a:b][None], key_padding_mask=None, mass_queries=mq,
                                              mass_heads=mass_heads, **options)[0])
        return torch.cat(masses, -1)
