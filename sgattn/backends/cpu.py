"""Backend "cpu": OpenMP C++ kernels for CPU tensors (tile kernels in the
framework-free kernels/cpu/attention.h, bindings and partition in
csrc/cpu_ops.cpp).

Forward attention computes exact softmax rows one query block at a time
(never the N x M matrix) and the importance in the same pass; the backward
recomputes the scores and takes the probabilities from the forward's saved
row log-sum-exp, P = exp(s - lse) (``sgattn._native``). Global
attention runs its GEMMs (S = Q K^T, O = P V and the five backward products)
on the BLAS that torch links (``sgemm_``, MKL on x86 wheels, as PyTorch's own
CPU flash attention does), called sequentially inside the kernel's own
parallel partition; 7x7 windows use a register-tiled micro-kernel.
Aggregation forward and backward are C++. float32, bfloat16 and float16
inputs accumulate in fp32; float64 attention is left to the reference backend.

Every result (outputs, lse, importance, gradients) is bitwise independent of
the thread count: the work partition depends on the shapes only and every
reduction runs in a fixed order. The registered ops validate their arguments
themselves through the contract they share with the cuda ops
(csrc/op_contract.h): a direct ``torch.ops.sgattn.*`` call with bad input
raises a ValueError naming the problem; aggregation index rows must be
permutations of 0..N-1 (argsorts), which the kernels check. A window at least as large as
the grid is one window over the whole grid.

Attention mass (``sgattn.attention_with_mass``, ``attention_mass``) runs on the
same global-attention kernels, configured with causal masking (bottom-right;
tiles past a query block's last visible key are skipped), grouped-query heads
and key padding; they return each query head's column sums of P weighted by
the chosen queries, which are reduced here. The fused backward sums each kv
head's dK, dV over its query heads in a fixed order. The varlen forms run
them once per sequence on views of the packed tensors (eagerly: the
sequence lengths are read on the host).
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _native, reference
from . import FLOATS, Backend, Capabilities

# The kernels (csrc/cpu_ops.cpp) take any sizes: int64 indexing, any head dim,
# window and key count; float64 only in the aggregation.
CAPABILITIES = Capabilities(devices=("cpu",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            aggregate_dtypes=FLOATS)


class CpuBackend(Backend):
    name = "cpu"
    extension = "sgattn._C"

    def unavailable(self):
        return _native.load_extension(self.extension)  # cached after the first call

    def capabilities(self):
        return CAPABILITIES

    def attention(self, q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0, need_importance=True):
        self.refuse_dropout(dropout_p)
        return _native.attention(q, k, v, scale=scale, window=window, hw=hw, need_importance=need_importance)

    def aggregate_sorted(self, x, index, weights, biases):
        return _native.aggregate_sorted(x, index, weights, biases)

    # Attention mass: global attention's kernels with causal masking, grouped-query
    # heads and key padding (mass_attention_fwd / _bwd, mass_from_lse); they return
    # each query head's weighted column sums of P, reduced here (O(B * Hq * Lk)).

    def mass_limits(self, op, tensors, options):
        if op.endswith("_varlen") and (torch.compiler.is_compiling() or is_fake(tensors[0])):
            return [f"{op} runs the cpu kernels once per sequence, reading cu_seqlens on the host: "
                    "not under torch.compile nor on fake tensors"]
        return []

    def attention_with_mass(self, q, k, v, *, scale, causal, key_padding_mask, mass_queries, mass_reduce,
                            mass_heads, return_lse):
        weight = _query_weight(mass_queries, q)
        out, lse, colsum = _native.mass_attention(q, k, v, scale=_scale(scale, q), causal=causal,
                                                  key_padding_mask=key_padding_mask, query_weight=weight)
        return out, _reduce(colsum, q, k, weight, causal, key_padding_mask, mass_reduce, mass_heads), lse

    def attention_mass(self, q, k, lse, *, scale, causal, key_padding_mask, mass_queries, mass_reduce, mass_heads):
        weight = _query_weight(mass_queries, q)
        colsum = _native.mass_from_lse(q.detach(), k.detach(), lse.detach().float(),  # the mass has no gradient
                                       scale=_scale(scale, q), causal=causal,
                                       key_padding_mask=key_padding_mask, query_weight=weight)
        return _reduce(colsum, q, k, weight, causal, key_padding_mask, mass_reduce, mass_heads)


    # Varlen: the dense kernels once per sequence, on views of the packed tensors.

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


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _query_weight(mass_queries, q):
    """The kernels' query_weight [Lq] fp32, or None when every query counts once."""
    if mass_queries is None:
        return None
    return reference._query_weight(mass_queries, q.shape[2], None, None, torch.float32, q.device)


def _reduce(colsum, q, k, weight, causal, key_padding_mask, mass_reduce, mass_heads):
    """The kernels' column sums [B, Hq, Lk] -> mass, reduced as the reference reduces its own."""
    Lq, (B, Hq, Lk) = q.shape[2], colsum.shape
    divisor = None
    if mass_reduce != "sum":
        w = torch.ones(Lq, device=q.device) if weight is None else weight
        divisor = w.sum()
        if mass_reduce == "causal_mean":  # the chosen queries that see each key (integers: exact in fp32)
            if causal:  # key j is seen by queries i >= j - (Lk - Lq)
                tail = torch.cat([w.flip(0).cumsum(0).flip(0), w.new_zeros(1)])  # tail[t] = sum of w[t:]
                divisor = tail[(torch.arange(Lk, device=q.device) - (Lk - Lq)).clamp(0, Lq)]
            if key_padding_mask is not None:
                divisor = divisor * ~key_padding_mask
            divisor = divisor.reshape(-1, 1, 1, Lk) if divisor.dim() else divisor
    return reference._reduce_mass(colsum.unflatten(1, (k.shape[1], Hq // k.shape[1])), divisor, mass_heads)


BACKEND = CpuBackend()
