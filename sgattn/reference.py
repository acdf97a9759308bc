"""Plain-PyTorch oracle for every sgattn op: SG-Former's hybrid-scale,
self-guided and plain attention, as the authors' code computes them.

Every backend is tested against these functions, so no other sgattn module
calls them (the arithmetic the backends share is ``sgattn.composition``,
kept apart so that editing it cannot change the oracle); the "reference"
backend runs them as they are. That backend is the fallback for float64 and
any device, at high resolution too, so no function here ever holds more than a
(query chunk x keys) block of attention probabilities: global attention is
computed in query chunks whose probability block stays under
``MAX_BLOCK_ELEMENTS`` elements.

Precision: half-precision inputs are computed in fp32 and the output cast back
(fp32 accumulation, as the kernels do); fp64 inputs stay fp64. Importance is
fp32, or fp64 for fp64 inputs.

Inputs are assumed valid here; ``sgattn.ops`` checks them and raises clear
errors before anything reaches a backend.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Largest probability block (elements) materialised at once: 16 Mi fp32 = 64 MiB.
MAX_BLOCK_ELEMENTS = 1 << 24

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(q, k, v, *, scale=None, window=None, hw=None, dropout_p=0.0, need_importance=True):
    """softmax(q k^T * scale) v, and optionally the importance of every key.

    q: [B, h, N, d]; k: [B, h, M, d]; v: [B, h, M, dv].
    Global mode (window None): every query attends to all M keys; importance
    [B, M] is the mean over heads and queries of the probabilities.
    Window mode (window=w, hw=(H, W), M == N == H*W, row-major tokens): each
    query attends to the keys of its own w x w window; importance [B, N] is,
    per key, the mean over heads and over the real queries of its window.
    ``dropout_p`` drops probabilities (inverted scaling) before they multiply
    v and before they are averaged into the importance, as the paper's code
    does. Returns (out [B, h, N, dv] in q's dtype, importance or None).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if window is None:
        return _global_attention(q, k, v, scale, dropout_p, need_importance)
    return _window_attention(q, k, v, scale, window, hw, dropout_p, need_importance)


def _global_attention(q, k, v, scale, dropout_p, need_importance):
    B, h, N, _ = q.shape
    M = k.shape[2]
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    chunk = max(1, MAX_BLOCK_ELEMENTS // max(1, B * h * M))
    outs = []
    importance = torch.zeros(B, M, dtype=ct, device=q.device) if need_importance else None
    # One block when it fits: a test, not a loop over N, so that torch.compile keeps N symbolic
    blocks = [qc] if N <= chunk else [qc[:, :, s:s + chunk] for s in range(0, N, chunk)]
    for block in blocks:
        scores = torch.matmul(block, kc.transpose(-1, -2)) * scale
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        outs.append(torch.matmul(probs, vc))
        if need_importance:
            importance += probs.detach().sum(dim=(1, 2))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    if need_importance:
        importance /= h * N
    return out.to(q.dtype), importance


def window_shape(window: int, hw) -> tuple[int, int]:
    """The (height, width) of the windows on an (H, W) grid. A window larger
    than the grid in one direction covers it whole in that direction, exactly
    as a w x w window over the grid zero-padded to w would (the padding is
    masked), so it is clipped to the grid: scratch stays O(H*W) however
    large ``window`` is."""
    H, W = hw
    return torch.sym_min(window, H), torch.sym_min(window, W)  # no guard on symbolic sizes


def window_partition(t: torch.Tensor, window: int, hw) -> torch.Tensor:
    """[B, h, H*W, d] row-major tokens -> [B, h, nW, wh*ww, d] windows, zero-padded
    at the bottom and right up to multiples of the window (``window_shape``)."""
    B, h, _, d = t.shape
    H, W = hw
    wh, ww = window_shape(window, hw)
    nh, nw = -(-H // wh), -(-W // ww)
    t = t.reshape(B, h, H, W, d)
    if (nh * wh, nw * ww) != (H, W):
        t = F.pad(t, (0, 0, 0, nw * ww - W, 0, nh * wh - H))
    t = t.reshape(B, h, nh, wh, nw, ww, d)
    return t.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, nh * nw, wh * ww, d)


def window_reverse(t: torch.Tensor, window: int, hw) -> torch.Tensor:
    """Inverse of ``window_partition``: [B, h, nW, wh*ww, d] -> [B, h, H*W, d]."""
    B, h, _, _, d = t.shape
    H, W = hw
    wh, ww = window_shape(window, hw)
    nh, nw = -(-H // wh), -(-W // ww)
    t = t.reshape(B, h, nh, nw, wh, ww, d)
    t = t.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, nh * wh, nw * ww, d)
    return t[:, :, :H, :W].reshape(B, h, H * W, d)


def _window_attention(q, k, v, scale, window, hw, dropout_p, need_importance):
    B, h, N, _ = q.shape
    ct = compute_dtype(q.dtype)
    real = torch.ones(1, 1, N, 1, dtype=ct, device=q.device)
    real = window_partition(real, window, hw)[0, 0, :, :, 0]  # [nW, L]: 1 real, 0 padding
    qw, kw, vw = (window_partition(t.to(ct), window, hw) for t in (q, k, v))
    scores = torch.matmul(qw, kw.transpose(-1, -2)) * scale  # [B, h, nW, L, L]
    scores = scores.masked_fill(real[:, None, :] == 0, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = window_reverse(torch.matmul(probs, vw), window, hw).to(q.dtype)
    if not need_importance:
        return out, None
    # Column sums over real queries only, then divide by (heads x real queries).
    per_key = torch.einsum("bhwqk,wq->bwk", probs.detach(), real)
    per_key = per_key / (h * real.sum(dim=1, keepdim=True))
    importance = window_reverse(per_key[:, None, :, :, None], window, hw)
    return out, importance.reshape(B, N)


def upsample_nearest(importance: torch.Tensor, reduced_hw, hw) -> torch.Tensor:
    """[B, Hr*Wr] -> [B, H, W] with ``F.interpolate(mode='nearest')``:
    destination (y, x) takes source (floor(y*Hr/H), floor(x*Wr/W))."""
    B = importance.shape[0]
    grid = importance.reshape(B, 1, *reduced_hw)
    return F.interpolate(grid, size=tuple(hw), mode="nearest")[:, 0]


def hybrid_importance(global_importance, local_importance, hw, reduced_hw) -> torch.Tensor:
    """Hybrid-scale importance map I = local + nearest-upsampled global: [B, H, W]."""
    B = local_importance.shape[0]
    up = upsample_nearest(global_importance, reduced_hw, hw)
    return local_importance.reshape(B, *hw) + up


def importance_orderings(importance_map: torch.Tensor):
    """The two flattenings a hybrid-scale block hands on: row-major and column-major."""
    B, H, W = importance_map.shape
    return importance_map.reshape(B, H * W), importance_map.transpose(1, 2).reshape(B, H * W)


def hybrid_scale_attention(q_global, k_global, v_global, q_local, k_local, v_local, *,
                           hw, reduced_hw, window=7, scale=None, dropout_p=0.0):
    """Hybrid-scale attention: global heads attend to the reduced map, local heads inside windows.

    Returns (out [B, h_g + h_l, N, d] with global heads first, importance map [B, H, W]).
    """
    out_g, imp_g = attention(q_global, k_global, v_global, scale=scale, dropout_p=dropout_p)
    out_l, imp_l = attention(q_local, k_local, v_local, scale=scale, window=window, hw=hw,
                             dropout_p=dropout_p)
    return torch.cat([out_g, out_l], dim=1), hybrid_importance(imp_g, imp_l, hw, reduced_hw)


def reallocation_parts(n: int, num_parts: int) -> list[int]:
    """Sizes of the parts of n importance-sorted tokens (self-guided attention): quarters
    [n//4, 2*(n//4), rest] for three parts, halves [n//2, rest] for two."""
    if num_parts == 3:
        quarter = n // 4
        return [quarter, 2 * quarter, n - 3 * quarter]
    if num_parts == 2:
        return [n // 2, n - n // 2]
    raise ValueError(f"a reallocation plan has 2 or 3 parts, got {num_parts}")


def reallocated_length(n: int, group_sizes: Sequence[int]) -> int:
    """Number of tokens after reallocation: sum over parts of ceil(n_p / r_p)."""
    parts = reallocation_parts(n, len(group_sizes))
    return sum(-(-n_p // r) for n_p, r in zip(parts, group_sizes))


def colmajor_to_rowmajor(hw, device=None) -> torch.Tensor:
    """perm[p] = row-major index of the token at column-major position p."""
    H, W = hw
    p = torch.arange(H * W, device=device)
    return (p % H) * W + p // H


def aggregate_sorted(x, index, weights, biases):
    """Weighted group sums of gathered tokens (the reallocation: gather, group, merge).

    x: [B, N, C]; index: [B, N] or [G, B, N] int64, the row of x at each
    sorted position; weights: P tensors with r_p elements; biases: P
    one-element tensors. Returns [B, M, C] (or [G, B, M, C]) with
    M = reallocated_length(N, r). A last group short of r_p members counts
    the missing ones as zero vectors.
    """
    grouped = index.dim() == 3
    idx = index if grouped else index[None]
    G, B, N = idx.shape
    C = x.shape[-1]
    src = x.unsqueeze(0).expand(G, B, N, C).reshape(G * B, N, C)
    tokens = torch.gather(src, 1, idx.reshape(G * B, N, 1).expand(-1, -1, C))
    pieces, start = [], 0
    for n_p, w, b in zip(reallocation_parts(N, len(weights)), weights, biases):
        r = w.numel()
        groups = -(-n_p // r)
        # zero members for a short last group (padding by 0 when there is none: no test on
        # the sizes, which torch.compile would have to guard)
        part = F.pad(tokens[:, start:start + n_p], (0, 0, 0, groups * r - n_p))
        part = part.reshape(G * B, groups, r, C).transpose(2, 3)  # [., groups, C, r]
        pieces.append(F.linear(part, w.reshape(1, r).to(x.dtype), b.reshape(1).to(x.dtype))[..., 0])
        start += n_p
    out = torch.cat(pieces, dim=1).reshape(G, B, reallocated_length(N, [w.numel() for w in weights]), C)
    return out if grouped else out[0]


def sort_index(importance: torch.Tensor) -> torch.Tensor:
    """Stable ascending argsort (least important first); ties keep token order."""
    return torch.sort(importance.detach(), dim=-1, stable=True).indices


def reallocate_tokens(x, importance, weights, biases):
    """Token reallocation for one ordering: sort x's tokens by importance and merge them.

    x: [B, N, C]; importance: [B, N] in the same token order as x.
    """
    return aggregate_sorted(x, sort_index(importance), weights, biases)


def self_guided_index(importance, hw) -> torch.Tensor:
    """[2, B, N] source rows (row-major) of both sorted orderings of self-guided attention.

    importance is (row-major [B, N], column-major [B, N]) as a hybrid-scale
    block hands it on; a single [B, N] row-major tensor stands for both.
    """
    if isinstance(importance, torch.Tensor):
        B = importance.shape[0]
        importance = importance_orderings(importance.reshape(B, *hw))
    row, col = importance
    perm = colmajor_to_rowmajor(hw, device=col.device)
    return torch.stack([sort_index(row), perm[sort_index(col)]])


def self_guided_attention(q, x, importance, kv1_weight, kv1_bias, kv2_weight, kv2_bias,
                          agg_weights, agg_biases, *, hw, scale=None, dropout_p=0.0):
    """Self-guided attention: queries of all heads attend to importance-reallocated tokens.

    q: [B, h, N, d]; x: [B, N, C] row-major tokens; importance: see
    ``self_guided_index``; kv{1,2}_weight: [C, C] (K then V output channels),
    kv{1,2}_bias: [C] or None; agg_weights / agg_biases: the f_p parameters.
    Ordering 1 feeds heads [0, h/2), ordering 2 heads [h/2, h).
    Returns out [B, h, N, d].
    """
    B, h, N, d = q.shape
    seq = aggregate_sorted(x, self_guided_index(importance, hw), agg_weights, agg_biases)
    M = seq.shape[2]
    kv1 = F.linear(seq[0], kv1_weight, kv1_bias).reshape(B, M, 2, h // 2, d)
    kv2 = F.linear(seq[1], kv2_weight, kv2_bias).reshape(B, M, 2, h // 2, d)
    kv = torch.cat([kv1, kv2], dim=3).permute(2, 0, 3, 1, 4)  # [2, B, h, M, d]
    out, _ = attention(q, kv[0], kv[1], scale=scale, dropout_p=dropout_p, need_importance=False)
    return out
