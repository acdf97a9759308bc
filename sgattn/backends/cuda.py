"""Backend "cuda": the CUDA C++ kernels of ``kernels/`` (extension ``sgattn._C_cuda``).

- Attention with importance: one fused kernel per call for short key rows
  (global M <= 256 keys, or windows of w*w <= 256), fp16/bf16 on tensor cores
  (WMMA, fp32 accumulation) and an fp32 SIMT path; head dims up to 128 (any d,
  padded), value dim equal to the head dim. The importance comes from per-tile
  column sums reduced in a fixed order (deterministic).
- Token reallocation forward and backward: CUDA kernels (both orderings in one
  launch), deterministic (no atomics); the index rows must be permutations
  (argsort output), which ``aggregate_sorted`` checks.
- Self-guided attention (inference and training): reallocation kernel ->
  kv projections (cuBLAS through torch) -> fused attention kernel.
- Attention backward: recomputation with torch ops in query chunks
  (``sgattn._native.attention_backward``); the forward saves q, k, v only.
- Probability dropout is not implemented (``unsupported`` says so).
"""
from __future__ import annotations

import torch

from .. import _native, reference
from . import Backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KEYS = 256
MAX_HEAD_DIM = 128
ATTENTION_OPS = ("attention_with_importance", "attention", "hybrid_scale_attention")


class CudaBackend(Backend):
    name = "cuda"
    extension = "sgattn._C_cuda"

    def __init__(self):
        self._why: str | None = None
        self._checked = False

    def unavailable(self):
        if not self._checked:  # called on every op: decide once
            self._why = _native.load_extension(self.extension)
            if self._why is None and not torch.cuda.is_available():
                self._why = "no CUDA device is available"
            self._checked = True
        return self._why

    def unsupported(self, op, tensors, **options):
        for t in tensors:
            if t.device.type != "cuda":
                return f"the cuda backend runs CUDA tensors only, got a tensor on {t.device}"
            if t.dtype not in DTYPES:
                return f"dtype {t.dtype} is not supported (float16, bfloat16 or float32)"
        if options.get("dropout_p", 0.0) > 0:
            return "probability dropout is not implemented"
        if op in ATTENTION_OPS or op == "self_guided_attention":
            q = tensors[0]
            if q.shape[-1] > MAX_HEAD_DIM:
                return f"head dim {q.shape[-1]} is above {MAX_HEAD_DIM}"
        window = options.get("window")
        if window is not None and int(window) ** 2 > MAX_KEYS:
            return f"window {window}: {int(window) ** 2} keys per window exceed the kernel's {MAX_KEYS}"
        if op in ATTENTION_OPS:
            groups = [tensors[i:i + 3] for i in range(0, len(tensors), 3)]
            # The first triple of hybrid-scale attention (and plain attention) is global.
            q, k, v = groups[0]
            if options.get("window") is None or op == "hybrid_scale_attention":
                if k.shape[2] > MAX_KEYS:
                    return f"{k.shape[2]} global keys exceed the fused kernel's {MAX_KEYS} (shared memory)"
            for q, k, v in groups:
                if v.shape[-1] != q.shape[-1]:
                    return "value dim differs from head dim"
        return None

    def attention(self, q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0, need_importance=True):
        if dropout_p > 0:
            raise ValueError("the cuda backend does not implement probability dropout")
        return _native.attention(q, k, v, scale=scale, window=window, hw=hw, need_importance=need_importance)

    def aggregate_sorted(self, x, index, weights, biases):
        idx = index if index.dim() == 3 else index[None]
        if not torch.compiler.is_compiling():
            # The backward gathers dx through the inverse permutation: refuse
            # anything else (also out-of-range rows, which would fault).
            ar = torch.arange(idx.shape[-1], device=idx.device)
            if not torch.equal(idx.sort(dim=-1).values, ar.expand_as(idx)):
                raise ValueError("cuda backend: every index row must be a permutation of 0..N-1 "
                                 "(the argsort of an importance vector)")
        return _native.aggregate_sorted(x, index, weights, biases)

    def self_guided_attention(self, q, x, importance, kv1_weight, kv1_bias, kv2_weight, kv2_bias,
                              agg_weights, agg_biases, *, hw, scale=None, dropout_p=0.0):
        seq = self.aggregate_sorted(x, reference.self_guided_index(importance, hw), agg_weights, agg_biases)
        # Long reallocated sequences (high resolutions) exceed the fused kernel's
        # key limit: their attention runs as chunked torch ops (reference path).
        attend = self.attention if seq.shape[2] <= MAX_KEYS else reference.attention
        return reference.attention_over_reallocated(
            q, seq, kv1_weight, kv1_bias, kv2_weight, kv2_bias, attend, scale=scale, dropout_p=dropout_p)


BACKEND = CudaBackend()
