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

from .. import _native
from . import FLOATS, Backend, Capabilities
from .mass_kernels import KernelMass

# The kernels (csrc/cpu_ops.cpp) take any sizes: int64 indexing, any head dim,
# window and key count; float64 only in the aggregation.
CAPABILITIES = Capabilities(devices=("cpu",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            aggregate_dtypes=FLOATS)


class CpuBackend(KernelMass, Backend):
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
    # each query head's weighted column sums of P, which KernelMass reduces.

    def mass_forward(self, q, k, v, *, scale, causal, key_padding_mask, query_weight, first_query=0):
        return _native.mass_attention(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                      query_weight=query_weight)

    def mass_from_lse(self, q, k, lse, *, scale, causal, key_padding_mask, query_weight, first_query=0):
        return _native.mass_from_lse(q, k, lse, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                     query_weight=query_weight)


BACKEND = CpuBackend()
