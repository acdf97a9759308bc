"""The Triton backend: sgattn's kernels in ``sgattn/triton`` as torch.library
custom ops (see ``sgattn.triton.ops``).

It runs CUDA tensors on a GPU, or CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before sgattn is imported; slow, for tests). fp16,
bf16 and fp32 with fp32 accumulation (fp32 dots in tf32 exactly when torch's
fp32 matmul setting allows it); head dims 16..128; windows up to 16.
``unsupported`` names every limit the kernels have (see there); automatic
dispatch then falls back to another backend.
"""
from __future__ import annotations

import os

import torch

from . import Backend

try:
    from ..triton import ops as _ops
    from ..triton.attention import INTERPRET as _INTERPRET
    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: report it, do not fail the import
    _ops = None
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 128)
MAX_WINDOW = 16
GRID_MAX = 2 ** 31 - 1  # programs in one launch (every grid is 1-D, axis 0)
_UNSET = object()


class TritonBackend(Backend):
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

    def unsupported(self, op, tensors, **options):
        """Every limit of the kernels, with its reason:
        - device: CUDA tensors (CPU tensors only under the interpreter), all on one device;
        - dtype: float16, bfloat16, float32 (fp32 tiles follow torch's tf32 setting);
        - head dims d, dv in 16..128 (padded to 32, 64 or 128);
        - window <= 16 (a window is at most 256 positions: the tiles' plan);
        - one launch has at most 2**31 - 1 programs (tiles x B x h on grid axis 0);
        - shared memory: a plan needs at most ``attention.SHARED_BYTES`` per block;
          a GPU whose opt-in limit is lower cannot run it;
        - no probability dropout."""
        want = "cpu" if _INTERPRET else "cuda"
        first = tensors[0] if tensors else None
        for t in tensors:
            if t.device.type != want:
                where = "the Triton interpreter (TRITON_INTERPRET=1) runs CPU tensors" if _INTERPRET \
                    else "Triton kernels run CUDA tensors"
                return f"tensor on {t.device}: {where}"
            if t.device != first.device:
                return f"tensors on {first.device} and {t.device}: one launch runs on one device"
            if t.dtype not in DTYPES:
                return f"dtype {t.dtype} is not supported (float16, bfloat16 or float32)"
            if t.dim() == 4 and not HEAD_DIMS[0] <= t.shape[-1] <= HEAD_DIMS[1]:
                return f"head dim {t.shape[-1]} is outside {HEAD_DIMS[0]}..{HEAD_DIMS[1]} (the kernels' tile plans)"
        window = options.get("window")
        if window is not None and int(window) > MAX_WINDOW:
            return f"window {window} is larger than {MAX_WINDOW} (tiles are planned for at most 256 positions)"
        if options.get("dropout_p", 0.0) > 0:
            return "probability dropout is not implemented"
        if first is None or _ops is None:
            return None
        from ..triton import attention as A
        quad = [t for t in tensors if t.dim() == 4]
        for i in range(0, len(quad) - 2, 3):  # (q, k, v) triples
            q, k, v = quad[i:i + 3]
            B, h, N, M = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            win = int(window) if (window and k.shape[2] == N and i == len(quad) - 3) else 0
            hw = options.get("hw")
            bd = A.head_block(q.shape[-1], v.shape[-1])
            programs = max(A.grid_programs(A.PLANS[(kind, bd)], B, h, N, M, win, tuple(hw) if (win and hw) else None)
                           for kind in A.kinds_of(q.dtype))
            if programs > GRID_MAX:
                return f"{programs} programs in one launch exceed the grid limit 2**31-1 (B*h*tiles)"
        if first.device.type == "cuda":
            need = A.shared_bytes_needed([t.dtype for t in tensors], [t.shape[-1] for t in quad])
            have = _shared_optin(first.device)
            if need > have:
                return (f"the tile plans need up to {need} bytes of shared memory per block; "
                        f"{torch.cuda.get_device_name(first.device)} allows {have}")
        return None

    def attention(self, q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0, need_importance=True):
        if dropout_p > 0:
            raise NotImplementedError("triton backend: probability dropout is not implemented")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        H, W = hw if window else (0, 0)
        out, _, part = _ops.attention_fwd(q, k, v, scale, int(window or 0), int(H), int(W), need_importance)
        if not need_importance:
            return out, None
        h, N = q.shape[1], q.shape[2]
        # window partials are already means over their window's real queries;
        # no heads: a mean over nothing (NaN, as the reference)
        weight = (1.0 / h if window else 1.0 / (h * N)) if h else float("nan")
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
        if dropout_p > 0:
            raise NotImplementedError("triton backend: probability dropout is not implemented")
        scale = q_global.shape[-1] ** -0.5 if scale is None else float(scale)
        H, W = hw
        B, hg, N, _ = q_global.shape
        hl = q_local.shape[1]
        out_g, _, part_g = _ops.attention_fwd(q_global, k_global, v_global, scale, 0, 0, 0, True)
        out_l, _, part_l = _ops.attention_fwd(q_local, k_local, v_local, scale, int(window), int(H), int(W), True)
        # one small kernel: reduce both partials, upsample the global map, add
        imp = _ops.importance(part_l, 1.0 / hl if hl else float("nan"), part_g,
                              1.0 / (hg * N) if hg else float("nan"), int(H), int(W),
                              int(reduced_hw[0]), int(reduced_hw[1]))
        return torch.cat([out_g, out_l], dim=1), imp.reshape(B, H, W)


_OPTIN: dict = {}


def _shared_optin(device) -> int:
    """Shared memory per block a kernel may opt in to on this GPU (bytes)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _OPTIN:
        props = torch.cuda.get_device_properties(index)
        _OPTIN[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return _OPTIN[index]


BACKEND = TritonBackend()
