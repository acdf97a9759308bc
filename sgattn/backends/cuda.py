"""Backend "cuda": the CUDA C++ kernels of ``kernels/`` (extension ``sgattn._C_cuda``).

- Attention with importance, any number of keys: a flash-style forward (online
  softmax over 64-key tiles; fp16/bf16 on tensor cores with WMMA and fp32
  accumulation, fp32 on a SIMT path; head dims up to 128, padded) that stores
  the row log-sum-exp, then a key-major importance pass that recomputes
  exp(s - lse) per (key tile, query split) and a fixed-order reduction of the
  partials (deterministic, no atomics). Global and window mode. Tiles are
  staged with cp.async (16-byte chunks for fp16/bf16 when the tensor's base
  pointer and outer strides are 16-byte aligned and the head dim has unit
  stride, 4-byte for fp32, element loads otherwise: chosen per launch, same
  values either way); with a single key tile (fp16/bf16, d <= 64, <= 64 keys)
  the forward keeps O in registers and needs no O buffer in shared memory.
- Token reallocation forward and backward: CUDA kernels (both orderings in one
  launch), deterministic. The index is validated on the device (out-of-range
  values, rows that are not permutations in the backward): a device-side
  assertion, no host synchronisation (CUDA-graph capturable).
- Self-guided attention (inference and training): reallocation kernel ->
  kv projections (cuBLAS through torch) -> attention kernel, at every length.
- Attention backward: fused CUDA kernels (op ``attention_bwd``) from the
  forward's saved output and log-sum-exp (the forward is not rerun):
  D = rowsum(dO * O), then a key-major dK/dV kernel and a query-major dQ
  kernel with P = exp(s - lse); deterministic, no atomics.
- Probability dropout is not implemented (``unsupported`` says so).

The limits (head dims, token counts, window, shared memory per device, grid
sizes) come from the kernels' own planner (``sgattn._C_cuda.plan_attention``,
C++, runs without a GPU): the declared capabilities are read from it once and
``launch_limits`` asks it about each call, so they mirror every limit.
"""
from __future__ import annotations

import functools
import importlib

import torch

from .. import _native
from . import Backend, BackendError, Capabilities, attention_calls

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
INT32_MAX = 2 ** 31 - 1


def plan_attention(dtype, B, h, N, M, d, window, hw, max_smem):
    """The attention kernels' launch plan (C++ planner; no GPU needed): a dict
    whose 'error' is None or why the kernels cannot run these sizes."""
    ext = importlib.import_module("sgattn._C_cuda")
    H, W = (int(hw[0]), int(hw[1])) if window else (0, 0)
    return ext.plan_attention(DTYPE_NAMES[dtype], int(B), int(h), int(N), int(M), int(d), int(window or 0),
                              H, W, int(max_smem))


def _largest(fits, lo, hi):
    """The largest n in lo..hi with fits(n), for fits true up to some n and false above."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@functools.cache
def planner_capabilities() -> Capabilities:
    """The kernels' limits as the planner states them (with unlimited shared
    memory: the device's own limit is asked per call)."""
    def fits(**sizes):
        args = dict(B=1, h=1, N=1, M=1, d=16, window=0, hw=(1, 1)) | sizes
        return plan_attention(torch.float32, max_smem=2 ** 40, **args)["error"] is None
    lo = next(d for d in range(1, 2 ** 16) if fits(d=d))
    return Capabilities(
        devices=("cuda",), dtypes=DTYPES, aggregate_dtypes=DTYPES, value_dim_is_head_dim=True,
        head_dims=(lo, _largest(lambda d: fits(d=d), lo, 2 ** 16)),
        max_tokens=_largest(lambda m: fits(M=m), 1, 2 ** 40),
        max_window=_largest(lambda w: fits(window=w), 1, 2 ** 20),
        launch_limits="plan_attention: shared memory of the device, grid sizes (and the reallocation's grid)")


def aggregate_limits(G, B, N, M):
    """Why the reallocation kernels cannot launch these sizes (None: they can);
    the same limits as csrc/cuda_ops.cpp."""
    if M and G * B * M > INT32_MAX:
        return f"G*B*M = {G * B * M} output rows exceed one launch (2^31-1 blocks)"
    if B * N // 8 >= INT32_MAX or G * B * N // 256 >= INT32_MAX:
        return f"G*B*N = {G * B * N} tokens exceed one launch"
    return None


class CudaBackend(Backend):
    name = "cuda"
    extension = "sgattn._C_cuda"

    def __init__(self):
        self._why: str | None = None
        self._checked = False
        self._smem: dict[int, int] = {}
        self._probed: dict[int, str | None] = {}

    def unavailable(self):
        if not self._checked:  # called on every op: decide once
            self._why = _native.load_extension(self.extension)
            if self._why is None and not torch.cuda.is_available():
                self._why = "no CUDA device is available"
            if self._why is None:
                self._why = self._device_problem(torch.cuda.current_device())
            self._checked = True
        return self._why

    def _device_problem(self, index):
        """None when the kernels have an image (or PTX) for the device, else why not."""
        if index not in self._probed:
            ext = importlib.import_module(self.extension)
            self._probed[index] = ext.probe(index)
        return self._probed[index]

    def _max_smem(self, device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._smem:
            ext = importlib.import_module(self.extension)
            self._smem[index] = ext.device_smem_optin(index)
        return self._smem[index]

    def capabilities(self):
        why = _native.load_extension(self.extension)
        if why is not None:  # the planner is in the extension
            raise BackendError(why)
        return planner_capabilities()

    def _attention_limit(self, q, k, v, window, hw):
        """Why the attention kernels cannot run these tensors (the C++ planner's limits)."""
        B, h, N, d = q.shape
        M = k.shape[2]
        if window:
            # Without the grid, plan for a (N x 1) grid: at least as many windows as any H x W = N grid of
            # w x w windows (the binding checks the real grid and names any limit it hits).
            hw = hw or (N, 1)
        plan = plan_attention(q.dtype, B, h, N, M, d, window, hw, self._max_smem(q.device))
        if plan["error"] is not None:
            return plan["error"]
        if plan["bwd_error"] is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return f"backward: {plan['bwd_error']}"
        return None

    def launch_limits(self, op, tensors, options):
        device = tensors[0].device
        why = self._device_problem(device.index if device.index is not None else torch.cuda.current_device())
        if why is not None:
            return [why]
        reasons = [self._attention_limit(q, k, v, window, hw) for q, k, v, window, hw
                   in attention_calls(op, tensors, options)]
        if op == "self_guided_attention":  # the reallocated sequence is at most N tokens long
            B, _, N, _ = tensors[0].shape
            reasons.append(aggregate_limits(2, B, N, N))
        elif op == "reallocate_tokens":
            B, N = tensors[0].shape[:2]
            reasons.append(aggregate_limits(1, B, N, N))
        return [r for r in dict.fromkeys(reasons) if r is not None]

    def attention(self, q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0, need_importance=True):
        self.refuse_dropout(dropout_p)
        return _native.attention(q, k, v, scale=scale, window=window, hw=hw, need_importance=need_importance)

    def aggregate_sorted(self, x, index, weights, biases):
        # No host-side check of the index (it would synchronise): the kernels
        # validate it on the device (range, and permutation in the backward).
        return _native.aggregate_sorted(x, index, weights, biases)


BACKEND = CudaBackend()
