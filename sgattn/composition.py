"""SG-Former's arithmetic that every backend shares, and how the two backend
primitives (attention with importance, aggregation of importance-sorted
tokens) compose into hybrid-scale and self-guided attention: the reallocation
plan (group table, part sizes, merged length), the token orderings, the
window clip, the hybrid importance map and the K/V projection of the
reallocated sequences.

``sgattn.reference`` defines the same quantities on its own: it is the oracle
the backends are checked against, so it must not change when production
arithmetic does (tests/test_reference.py checks that the two agree).
Every function here is guard-free on symbolic sizes (torch.compile).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Self-guided attention: group sizes r_p of the reallocation parts for each reduction ratio
# (the in-features of the authors' f1, f2[, f3]).
REALLOCATION_GROUPS = {8: (196, 56, 28), 4: (49, 14, 7), 2: (2, 1)}


def reallocation_parts(n, num_parts: int) -> list:
    """Sizes of the parts of n importance-sorted tokens: quarters
    [n//4, 2*(n//4), rest] for three parts, halves [n//2, rest] for two."""
    if num_parts == 3:
        quarter = n // 4
        return [quarter, 2 * quarter, n - 3 * quarter]
    if num_parts == 2:
        return [n // 2, n - n // 2]
    raise ValueError(f"a reallocation plan has 2 or 3 parts, got {num_parts}")


def reallocated_length(n, group_sizes: Sequence[int]):
    """Number of tokens after reallocation: sum over parts of ceil(n_p / r_p)."""
    parts = reallocation_parts(n, len(group_sizes))
    return sum(-(-n_p // r) for n_p, r in zip(parts, group_sizes))


def clip_window(window, hw):
    """A window larger than the grid covers it whole in that direction, the
    same windows as one of size max(H, W): backends never see a window (and
    its w*w scratch) beyond the grid. sym_min/sym_max: no guard on symbolic
    sizes under torch.compile (``min`` would branch on them)."""
    return None if window is None else torch.sym_min(window, torch.sym_max(*hw))


def sort_index(importance: torch.Tensor) -> torch.Tensor:
    """Stable ascending argsort (least important first); ties keep token order."""
    return torch.sort(importance.detach(), dim=-1, stable=True).indices


def importance_orderings(importance_map: torch.Tensor):
    """The two flattenings of a [B, H, W] map a hybrid-scale block hands on: row-major and column-major."""
    B, H, W = importance_map.shape
    return importance_map.reshape(B, H * W), importance_map.transpose(1, 2).reshape(B, H * W)


def self_guided_index(importance, hw) -> torch.Tensor:
    """[2, B, N] source rows (row-major) of both sorted orderings of self-guided attention.

    importance is (row-major [B, N], column-major [B, N]), or a single
    row-major [B, N] tensor standing for both.
    """
    if isinstance(importance, torch.Tensor):
        importance = importance_orderings(importance.reshape(importance.shape[0], *hw))
    row, col = importance
    H, W = hw
    p = torch.arange(H * W, device=col.device)
    colmajor_to_rowmajor = (p % H) * W + p // H  # row-major index of column-major position p
    return torch.stack([sort_index(row), colmajor_to_rowmajor[sort_index(col)]])


def hybrid_importance(global_importance, local_importance, hw, reduced_hw) -> torch.Tensor:
    """Hybrid-scale importance map [B, H, W]: local + the global map upsampled
    with ``F.interpolate(mode='nearest')`` from ``reduced_hw`` to ``hw``."""
    B = local_importance.shape[0]
    up = F.interpolate(global_importance.reshape(B, 1, *reduced_hw), size=tuple(hw), mode="nearest")[:, 0]
    return local_importance.reshape(B, *hw) + up


def reallocated_kv(seq, kv1_weight, kv1_bias, kv2_weight, kv2_bias, heads: int):
    """K and V [B, h, M, d] of self-guided attention from both reallocated
    sequences ``seq`` [2, B, M, C]: ordering 1 through kv1 gives heads
    [0, h/2), ordering 2 through kv2 heads [h/2, h) (each projection's output
    channels are K then V)."""
    _, B, M, C = seq.shape
    d = C // heads
    kv1 = F.linear(seq[0], kv1_weight, kv1_bias).reshape(B, M, 2, heads // 2, d)
    kv2 = F.linear(seq[1], kv2_weight, kv2_bias).reshape(B, M, 2, heads // 2, d)
    kv = torch.cat([kv1, kv2], dim=3).permute(2, 0, 3, 1, 4)  # [2, B, h, M, d]
    return kv[0], kv[1]
