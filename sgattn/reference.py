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
from torch.autograd.function import once_differentiable

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


# The reallocation plan below is deliberately written again in sgattn.composition (production):
# the oracle shares no code with the backends it checks.
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


# ============================================================================
# Attention with per-key mass: causal, grouped-query, key padding, packed varlen
# (the oracle of ``sgattn.attention_with_mass`` and ``sgattn.attention_mass``).
#
# Mass of key j = sum over the chosen queries i of P_ij, P = softmax(scale q k^T)
# over the keys query i sees. Computed in query chunks like ``attention`` above:
# (query chunk x keys) blocks of all heads, at most MAX_BLOCK_ELEMENTS each and a
# few alive at once, in the forward and in the backward (hand-written: it
# recomputes P from the row lse), so memory beyond the inputs is O(B * H * L)
# whatever Lq and Lk are.
# ============================================================================

MASS_REDUCTIONS = ("sum", "mean", "causal_mean")
MASS_HEAD_REDUCTIONS = ("none", "group_sum", "group_mean", "mean")


def _row_chunks(n, per_row):
    """(start, stop) query ranges whose blocks hold at most MAX_BLOCK_ELEMENTS
    (one range when they fit: a test, not a loop, keeps n symbolic under torch.compile)."""
    chunk = max(1, MAX_BLOCK_ELEMENTS // max(1, per_row))
    return [(0, n)] if n <= chunk else [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _visible_block(a, b, n_keys, q_last, q_seg, k_seg, k_keep):
    """Which keys queries a..b-1 see: bool [Bm, 1, 1, b-a, Lk] (broadcast over the kv
    heads and the group), or None when every query sees every key.

    q_last [Bm, Lq]: the last key index a query sees (causal), or None; q_seg [Lq],
    k_seg [Lk]: packed sequence ids (varlen), or None; k_keep [Bm, Lk]: False for padding.
    """
    seen = None
    if q_last is not None:
        seen = torch.arange(n_keys, device=q_last.device) <= q_last[:, a:b, None]
    if q_seg is not None:
        same = q_seg[a:b, None] == k_seg[None, :]
        seen = same[None] if seen is None else seen & same
    if k_keep is not None:
        seen = k_keep[:, None, :] if seen is None else seen & k_keep[:, None, :]
    return None if seen is None else seen[:, None, None]


def _block_probs(qg, kc, scale, a, b, visibility, lse=None):
    """P of queries a..b-1, [B, Hkv, G, c, Lk], and their lse [B, Hkv, G, c]; given an
    lse, P = exp(s - lse). A query that sees no key has lse -inf and P = 0."""
    # in place on the one block: the callers run without autograd (in the Function, or under no_grad)
    s = torch.matmul(qg[:, :, :, a:b], kc.transpose(-1, -2)).mul_(scale)
    seen = _visible_block(a, b, kc.shape[-2], *visibility)
    if seen is not None:
        s.masked_fill_(seen.logical_not(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if lse is None else lse[..., a:b]
    finite = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)  # exp(-inf - 0) = 0, not NaN
    return s.sub_(finite[..., None]).exp_(), lse


class _AttentionWithMass(torch.autograd.Function):
    """Chunked attention (out, lse) and the weighted column sums of P; out is
    differentiable, lse and the sums are not. Tensors in the compute dtype,
    q grouped [B, Hkv, G, Lq, D], k [B, Hkv, 1, Lk, D], v [B, Hkv, 1, Lk, Dv]."""

    @staticmethod
    def forward(ctx, qg, kc, vc, scale, weight, q_last, q_seg, k_seg, k_keep):
        visibility = (q_last, q_seg, k_seg, k_keep)
        B, Hkv, G, Lq, _ = qg.shape
        outs, lses = [], []
        colsum = qg.new_zeros(B, Hkv, G, kc.shape[-2])
        for a, b in _row_chunks(Lq, B * Hkv * G * kc.shape[-2]):
            p, lse = _block_probs(qg, kc, scale, a, b, visibility)
            outs.append(torch.matmul(p, vc))
            lses.append(lse)
            colsum += torch.matmul(weight[a:b], p)  # [c] @ [.., c, Lk]: sum over the chosen queries
        out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
        lse = torch.cat(lses, dim=3) if len(lses) > 1 else lses[0]
        ctx.save_for_backward(qg, kc, vc, out, lse, q_last, q_seg, k_seg, k_keep)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse, colsum)
        return out, lse, colsum

    @staticmethod
    @once_differentiable  # the backward takes P from the saved lse: no second derivative through it
    def backward(ctx, dout, _dlse, _dcolsum):
        qg, kc, vc, out, lse, *visibility = ctx.saved_tensors
        scale = ctx.scale
        B, Hkv, G, Lq, _ = qg.shape
        delta = (dout * out).sum(-1, keepdim=True)  # rowsum(dO * O) [B, Hkv, G, Lq, 1]
        dqs, dk, dv = [], torch.zeros_like(kc), torch.zeros_like(vc)
        for a, b in _row_chunks(Lq, B * Hkv * G * kc.shape[-2]):
            p, _ = _block_probs(qg, kc, scale, a, b, visibility, lse=lse)
            do = dout[:, :, :, a:b]
            dv += torch.matmul(p.transpose(-1, -2), do).sum(2, keepdim=True)
            ds = torch.matmul(do, vc.transpose(-1, -2)).sub_(delta[:, :, :, a:b]).mul_(p)  # P (dP - delta)
            dqs.append(torch.matmul(ds, kc) * scale)
            dk += torch.matmul(ds.transpose(-1, -2), qg[:, :, :, a:b]).sum(2, keepdim=True) * scale
        dq = torch.cat(dqs, dim=3) if len(dqs) > 1 else dqs[0]
        return dq, dk, dv, None, None, None, None, None, None


def _mass_visibility(q, k, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k):
    """(q_last, q_seg, k_seg, k_keep) for ``_visible_block``, and the packed sequence
    ids (q_seg, k_seg; None when dense). Causal is bottom-right aligned per sequence:
    query i of a sequence of Lq queries and Lk keys sees its keys j <= i + Lk - Lq."""
    Lq, Lk = q.shape[2], k.shape[2]
    device = q.device
    rows = torch.arange(Lq, device=device)
    if cu_seqlens_q is None:
        q_last = (rows + (Lk - Lq))[None] if causal else None
        k_keep = None if key_padding_mask is None else ~key_padding_mask
        return (q_last, None, None, k_keep), None, None
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    q_seg = torch.searchsorted(cu_q[1:], rows, right=True)
    k_seg = torch.searchsorted(cu_k[1:], torch.arange(Lk, device=device), right=True)
    # packed index of the last key: cu_k[s] + (i - cu_q[s]) + Lk_s - Lq_s = i + cu_k[s+1] - cu_q[s+1]
    q_last = (rows + cu_k[1:][q_seg] - cu_q[1:][q_seg])[None] if causal else None
    return (q_last, q_seg, k_seg, None), q_seg, k_seg


def _query_weight(mass_queries, Lq, q_seg, cu_seqlens_q, dtype, device):
    """How often each query counts in the mass: [Lq] (1 chosen, 0 not; an index
    tensor counts a repeated index as often as it appears)."""
    if mass_queries is None:
        return torch.ones(Lq, dtype=dtype, device=device)
    if isinstance(mass_queries, torch.Tensor):
        index = mass_queries.reshape(-1).long()
        return torch.zeros(Lq, dtype=dtype, device=device).index_add_(
            0, index, torch.ones(index.shape[0], dtype=dtype, device=device))
    rows = torch.arange(Lq, device=device)
    # the last n queries of each sequence (all of a sequence shorter than n)
    first = Lq - mass_queries if q_seg is None else cu_seqlens_q.long()[1:][q_seg] - mass_queries
    return (rows >= first).to(dtype)


def _mass_divisor(mass_reduce, weight, visibility, B, Lk, cu_seqlens_q, q_seg, k_seg):
    """What each key's column sum is divided by: None ("sum"); the number of chosen
    queries of its sequence ("mean"); the number of chosen queries that see it
    ("causal_mean"). Shape broadcasting against [B, Hkv, G, Lk]."""
    if mass_reduce == "sum":
        return None
    if mass_reduce == "mean":
        if q_seg is None:
            return weight.sum()
        per_seq = torch.zeros(cu_seqlens_q.shape[0] - 1, dtype=weight.dtype, device=weight.device)
        return per_seq.index_add_(0, q_seg, weight)[k_seg]
    count = None
    for a, b in _row_chunks(weight.shape[0], B * Lk):
        seen = _visible_block(a, b, Lk, *visibility)
        if seen is None:
            return weight.sum()
        part = torch.matmul(weight[a:b], seen[:, 0, 0].expand(-1, b - a, -1).to(weight.dtype))  # [Bm, Lk]
        count = part if count is None else count + part
    return count[:, None, None, :]


def _reduce_mass(colsum, divisor, mass_heads):
    """colsum [B, Hkv, G, Lk] -> mass: divided over the queries (0 where the divisor
    is 0: no chosen query sees the key), then reduced over heads by ``mass_heads``."""
    if divisor is not None:
        safe = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
        colsum = torch.where(divisor > 0, colsum / safe, torch.zeros_like(colsum))
    B, Hkv, G, Lk = colsum.shape
    if mass_heads == "none":
        return colsum.reshape(B, Hkv * G, Lk)
    if mass_heads == "mean":
        return colsum.mean(dim=(1, 2))
    grouped = colsum.sum(2)
    return grouped if mass_heads == "group_sum" else grouped / G


def _mass(q, k, v, lse, *, scale, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k, mass_queries,
          mass_reduce, mass_heads):
    """Dense layout [B, H, L, D] (varlen: B = 1 and packed L with cu_seqlens).
    With v: (out, mass, lse); with lse instead (v None): mass only."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    qg = q.to(ct).unflatten(1, (Hkv, Hq // Hkv))
    kc = k.to(ct)[:, :, None]
    visibility, q_seg, k_seg = _mass_visibility(q, k, causal, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    weight = _query_weight(mass_queries, Lq, q_seg, cu_seqlens_q, ct, q.device)
    if v is not None:
        out, lse, colsum = _AttentionWithMass.apply(qg, kc, v.to(ct)[:, :, None], scale, weight, *visibility)
    else:
        lse = lse.detach().to(ct).unflatten(1, (Hkv, Hq // Hkv))
        colsum = qg.new_zeros(B, Hkv, Hq // Hkv, Lk)
        with torch.no_grad():
            for a, b in _row_chunks(Lq, B * Hq * Lk):
                p, _ = _block_probs(qg.detach(), kc.detach(), scale, a, b, visibility, lse=lse)
                colsum += torch.matmul(weight[a:b], p)
    divisor = _mass_divisor(mass_reduce, weight, visibility, B, Lk, cu_seqlens_q, q_seg, k_seg)
    mass = _reduce_mass(colsum, divisor, mass_heads)
    if v is None:
        return mass
    return out.flatten(1, 2).to(q.dtype), mass, lse.flatten(1, 2)


def attention_with_mass(q, k, v, *, scale=None, causal=False, key_padding_mask=None, mass_queries=None,
                        mass_reduce="sum", mass_heads="none"):
    """Attention and the attention mass every key receives, in query chunks.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], Hq a multiple of Hkv
    (query head h uses kv head h // (Hq // Hkv)). ``causal``: query i sees keys
    j <= i + Lk - Lq (bottom-right). ``key_padding_mask`` [B, Lk] bool, True
    for padding keys (seen by no query). A query that sees no key gets output 0,
    lse -inf and gives no mass. See ``sgattn.attention_with_mass`` for the mass
    options. Returns (out [B, Hq, Lq, Dv] in q's dtype, mass, lse [B, Hq, Lq]);
    mass and lse in fp32 (fp64 for fp64 inputs), without gradient.
    """
    return _mass(q, k, v, None, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                 cu_seqlens_q=None, cu_seqlens_k=None, mass_queries=mass_queries, mass_reduce=mass_reduce,
                 mass_heads=mass_heads)


def attention_mass(q, k, lse, *, scale=None, causal=False, key_padding_mask=None, mass_queries=None,
                   mass_reduce="sum", mass_heads="none"):
    """The mass of ``attention_with_mass`` from a given row lse [B, Hq, Lq]
    (P = exp(scale q k^T - lse)); no v, no output."""
    return _mass(q, k, None, lse, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                 cu_seqlens_q=None, cu_seqlens_k=None, mass_queries=mass_queries, mass_reduce=mass_reduce,
                 mass_heads=mass_heads)


def _packed(t):
    """[total, H, D] -> [1, H, total, D]."""
    return t.transpose(0, 1)[None]


def attention_with_mass_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                               mass_queries=None, mass_reduce="sum", mass_heads="none"):
    """``attention_with_mass`` over packed sequences (flash-attention's varlen layout):
    q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]; sequence s owns
    queries cu_seqlens_q[s]:cu_seqlens_q[s+1] and keys cu_seqlens_k[s]:cu_seqlens_k[s+1].
    Returns (out [total_q, Hq, Dv], mass [Hq | Hkv, total_k] or [total_k], lse [Hq, total_q])."""
    out, mass, lse = _mass(_packed(q), _packed(k), _packed(v), None, scale=scale, causal=causal,
                           key_padding_mask=None, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           mass_queries=mass_queries, mass_reduce=mass_reduce, mass_heads=mass_heads)
    return out[0].transpose(0, 1), mass[0], lse[0]


def attention_mass_varlen(q, k, lse, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                          mass_queries=None, mass_reduce="sum", mass_heads="none"):
    """``attention_mass`` over packed sequences; lse [Hq, total_q]."""
    return _mass(_packed(q), _packed(k), None, lse[None], scale=scale, causal=causal, key_padding_mask=None,
                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, mass_queries=mass_queries,
                 mass_reduce=mass_reduce, mass_heads=mass_heads)[0]
