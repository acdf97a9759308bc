"""The Triton backend: sgattn's kernels in ``sgattn/triton`` as torch.library
custom ops (see ``sgattn.triton.ops``).

It runs CUDA tensors on a GPU, or CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before sgattn is imported; slow, for tests). fp16,
bf16 and fp32 with fp32 accumulation (fp32 dots in tf32 exactly when torch's
fp32 matmul setting allows it). The head dims and windows it runs are those of
the kernels' tile plans (``sgattn.triton.plans``); ``launch_limits`` asks
the plans about grid size and shared memory per call; automatic dispatch then
falls back to another backend.

Attention mass (``sgattn.attention_with_mass``, ``attention_mass`` and their
varlen forms) runs on the same global-attention kernels, configured by
compile-time flags for causal masking (bottom-right; key tiles past a query
tile's last visible key are skipped, and query tiles before a key tile's
first viewer), key padding, query-weighted column sums and grouped-query
heads (``sgattn.triton.ops``: ``triton_mass_attention_fwd`` / ``_bwd``,
``triton_mass_from_lse``). They return each query head's weighted column sums
of P, which ``KernelMass`` reduces; the backward sums each kv head's dK, dV
over its query heads in a fixed order (no atomics: run-to-run deterministic).
The varlen forms run them once per sequence on views of the packed tensors.
"""
from __future__ import annotations

import os

import torch

from . import Backend, BackendError, Capabilities, attention_calls
from .mass_kernels import KernelMass

try:
    from ..triton import launch as _launch
    from ..triton import ops as _ops
    from ..triton import plans as _plans
    _INTERPRET = _launch.INTERPRET
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: report it, do not fail the import
    _ops = None
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_UNSET = object()

# CUDA tensors (CPU tensors under the interpreter); the head dims d, dv and
# windows of the tile plans (padded to 32, 64 or 128; a window is at most 256
# positions); token counts that fit the kernels' int32 indices.
CAPABILITIES = None if _ops is None else Capabilities(
    devices=("cpu",) if _INTERPRET else ("cuda",), dtypes=_ops.FLOATS, aggregate_dtypes=_ops.FLOATS,
    head_dims=_plans.HEAD_DIM_RANGE, max_window=_plans.MAX_WINDOW, max_tokens=_ops.INT32_MAX,
    launch_limits="the tile plans: programs in one launch (2**31-1), shared memory per block of the GPU")


class TritonBackend(KernelMass, Backend):
    name = "triton"
    emulated = _INTERPRET  # the interpreter is for tests: only a forced "triton" uses it

    def __init__(self):
        self._unavailable = _UNSET

    def unavailable(self):
        if self._unavailable is _UNSET:  # called on every op: decide once
            if _IMPORT_ERROR is not None:
                self._unavailable = f"triton is not importable ({_IMPORT_ERROR})"
            elif not _INTERPRET and not torch.cuda.is_available():
                self._unavailable = "no CUDA device (and TRITON_INTERPRET=1 was not set before import)"
            else:
                self._unavailable = None
        return self._unavailable

    def capabilities(self):
        if _IMPORT_ERROR is not None:
            raise BackendError(f"triton is not importable ({_IMPORT_ERROR})")
        return CAPABILITIES

    def launch_limits(self, op, tensors, options):
        reasons = []
        for q, k, v, window, hw in attention_calls(op, tensors, options):
            B, h, N, M = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            win = int(window or 0)
            bd = _plans.head_block(q.shape[-1], v.shape[-1])
            programs = max(_plans.grid_programs(_plans.PLANS[(kind, bd)], B, h, N, M, win,
                                               tuple(hw) if (win and hw) else None, mass=op == "attention_with_mass")
                           for kind in _plans.kinds_of(q.dtype))
            if programs > _ops.INT32_MAX:
                reasons.append(f"{programs} programs in one launch exceed the grid limit 2**31-1 (B*h*tiles)")
        device = tensors[0].device
        if device.type == "cuda":
            need = _plans.shared_bytes_needed([t.dtype for t in tensors], [t.shape[-1] for t in tensors if t.dim() == 4])
            have = _shared_optin(device)
            if need > have:
                reasons.append(f"the tile plans need up to {need} bytes of shared memory per block; "
                               f"{torch.cuda.get_device_name(device)} allows {have}")
        return list(dict.fromkeys(reasons))

    def attention(self, q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0, need_importance=True):
        self.refuse_dropout(dropout_p)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        H, W = hw if window else (0, 0)
        # the op refuses importance over zero heads (ValueError), as the native ones do
        out, _, part = _ops.attention_fwd(q, k, v, scale, int(window or 0), int(H), int(W), need_importance)
        if not need_importance:
            return out, None
        h, N = q.shape[1], q.shape[2]
        # window partials are already means over their window's real queries
        weight = 1.0 / h if window else 1.0 / (h * N)
        return out, _ops.importance(part, weight, None, 0.0, 0, 0, 0, 0)

    def aggregate_sorted(self, x, index, weights, biases):
        grouped = index.dim() == 3
        idx = index if grouped else index[None]
        sizes = [int(w.numel()) for w in weights]
        # one launch for all parts: parameters concatenated (cat is differentiable)
        w_cat = torch.cat([w.reshape(-1) for w in weights])
        b_cat = torch.cat([b.reshape(-1) for b in biases])
        out = _ops.aggregate_fwd(x, idx, w_cat, b_cat, sizes)
        return out if grouped else out[0]

    def hybrid_scale_attention(self, q_global, k_global, v_global, q_local, k_local, v_local, *,
                               hw, reduced_hw, window=7, scale=None, dropout_p=0.0):
        self.refuse_dropout(dropout_p)
        scale = q_global.shape[-1] ** -0.5 if scale is None else float(scale)
        H, W = hw
        B, hg, N, _ = q_global.shape
        hl = q_local.shape[1]
        out_g, _, part_g = _ops.attention_fwd(q_global, k_global, v_global, scale, 0, 0, 0, True)
        out_l, _, part_l = _ops.attention_fwd(q_local, k_local, v_local, scale, int(window), int(H), int(W), True)
        # one small kernel: reduce both partials, upsample the global map, add
        imp = _ops.importance(part_l, 1.0 / hl, part_g, 1.0 / (hg * N), int(H), int(W),
                              int(reduced_hw[0]), int(reduced_hw[1]))
        return torch.cat([out_g, out_l], dim=1), imp.reshape(B, H, W)

    # Attention mass: the global kernels with the mass flags; KernelMass reduces
    # the per-head weighted column sums and runs the varlen forms per sequence.

    def mass_limits(self, op, tensors, options):
        """KernelMass's (the varlen forms are eager only), then what the
        capabilities do not check for the mass ops without v or with packed
        sequences: head dims of the plans; grid size of the from-lse pass."""
        reasons = KernelMass.mass_limits(self, op, tensors, options)
        q, k = tensors[:2]
        v = tensors[2] if op in ("attention_with_mass", "attention_with_mass_varlen") else None
        lo, hi = _plans.HEAD_DIM_RANGE
        for what, n in (("head dim", q.shape[-1]), ("value head dim", None if v is None else v.shape[-1])):
            if n is not None and not lo <= n <= hi:
                reasons.append(f"{what} {n} is outside {lo}..{hi} (the tile plans)")
        if op == "attention_mass" and not reasons:
            B, Hq, N, M = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            bd = _plans.head_block(q.shape[-1], q.shape[-1])
            programs = max(_plans.grid_programs(_plans.PLANS[(kind, bd)], B, Hq, N, M, 0, None, mass=True)
                           for kind in _plans.kinds_of(q.dtype))
            if programs > _ops.INT32_MAX:
                reasons.append(f"{programs} programs in one launch exceed the grid limit 2**31-1 (B*h*tiles)")
        return list(dict.fromkeys(reasons))

    def mass_forward(self, q, k, v, *, scale, causal, key_padding_mask, query_weight, first_query=0):
        return _ops.mass_attention_fwd(q, k, v, float(scale), bool(causal), key_padding_mask, query_weight,
                                       int(first_query))

    def mass_from_lse(self, q, k, lse, *, scale, causal, key_padding_mask, query_weight, first_query=0):
        return _ops.mass_from_lse(q, k, lse, float(scale), bool(causal), key_padding_mask, query_weight,
                                  int(first_query))


_OPTIN: dict = {}


def _shared_optin(device) -> int:
    """Shared memory per block a kernel may opt in to on this GPU (bytes)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _OPTIN:
        props = torch.cuda.get_device_properties(index)
        _OPTIN[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return _OPTIN[index]


BACKEND = TritonBackend()
