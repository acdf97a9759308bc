"""The naive SG-Former attention: every attention matrix materialised.

Written from the paper and its public code, in the style of that code: softmax matrices are
built in full, windows are cut by reshapes, importance is the ``.mean`` of
the detached (post-dropout) probabilities, the reduced map is upsampled with
``F.interpolate(mode='nearest')``, tokens are reallocated with ``torch.sort``
(unstable, as the paper's) + ``torch.gather`` + ``Linear(r_p, 1)`` on
reshaped parts, and the kv1/kv2 halves are concatenated by heads.

This is the baseline every benchmark compares against and an independent
check of ``sgattn.reference``. ``Attention`` has the paper's class name,
constructor and parameter layout, so ``sgattn.patch_model`` turns a naive
model into the sgattn one.

Strict (the default) vs generalised: the paper's code only runs where H and
W are multiples of 7 and each reallocation part splits into whole groups.
``strict=True`` raises ``ValueError`` everywhere else. ``strict=False``
applies sgattn's generalisation rules (grid zero-padded to multiples of 7,
padded tokens masked out of keys and queries; a short last group padded with
zero tokens), still materialising everything; the benchmarks use it to have a
naive baseline at 512, 1024 and 800x1344.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .models.sgformer import SGFormer, VARIANTS
from .nn import init_weights

WINDOW = 7
# Self-guided attention: group sizes r_p (the in-features of f1, f2[, f3]) per reduction ratio.
GROUP_SIZES = {8: (196, 56, 28), 4: (49, 14, 7), 2: (2, 1)}

__all__ = ["Attention", "naive_sgformer", "attention", "hybrid_scale_attention",
           "reallocate", "self_guided_attention", "GROUP_SIZES"]


# --------------------------------------------------------------------------
# functional pieces (shared by the module and the op-level benchmarks)
# --------------------------------------------------------------------------

def attention(q, k, v, scale, attn_drop=None):
    """Materialised global attention. q [B, h, N, d], k/v [B, h, M, d].
    Returns (out [B, h, N, d], probabilities [B, h, N, M] after dropout)."""
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return attn @ v, attn


def _window_grid(H, W, strict):
    if H % WINDOW or W % WINDOW:
        if strict:
            raise ValueError(f"naive (paper) attention needs H and W multiples of {WINDOW}, got {H}x{W}; "
                             "use strict=False for the padded generalisation")
    return -(-H // WINDOW) * WINDOW, -(-W // WINDOW) * WINDOW


def _to_windows(t, H, W, Hp, Wp):
    """[B, h, H*W, d] -> [B, h, nW, 49, d] (zero-padded to Hp x Wp)."""
    B, h, _, d = t.shape
    t = t.reshape(B, h, H, W, d)
    if (Hp, Wp) != (H, W):
        t = F.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))
    t = t.reshape(B, h, Hp // WINDOW, WINDOW, Wp // WINDOW, WINDOW, d).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, h, -1, WINDOW * WINDOW, d)


def _from_windows(t, H, W, Hp, Wp):
    """[B, h, nW, 49, d] -> [B, h, H*W, d]."""
    B, h, _, _, d = t.shape
    t = t.reshape(B, h, Hp // WINDOW, Wp // WINDOW, WINDOW, WINDOW, d).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, h, Hp, Wp, d)[:, :, :H, :W].reshape(B, h, H * W, d)


def window_attention(q, k, v, hw, scale, attn_drop=None, strict=True):
    """Attention inside non-overlapping 7x7 windows, with the local importance.

    q, k, v: [B, h, N, d] row-major on hw = (H, W). Returns (out [B, h, N, d],
    importance [B, H, W]: per key, the mean over heads and over the (real)
    queries of its window of the detached probabilities)."""
    H, W = hw
    B, h, N, d = q.shape
    Hp, Wp = _window_grid(H, W, strict)
    qw, kw, vw = (_to_windows(t, H, W, Hp, Wp) for t in (q, k, v))
    attn = (qw @ kw.transpose(-2, -1)) * scale  # [B, h, nW, 49, 49]
    padded = (Hp, Wp) != (H, W)
    if padded:
        real = _to_windows(torch.ones(1, 1, N, 1, device=q.device, dtype=q.dtype), H, W, Hp, Wp)
        real = real[0, 0, :, :, 0] > 0  # [nW, 49]
        attn = attn.masked_fill(~real[:, None, :], float("-inf"))
    attn = attn.softmax(dim=-1)
    if attn_drop is not None:
        attn = attn_drop(attn)
    out = _from_windows(attn @ vw, H, W, Hp, Wp)
    probs = attn.detach()
    if not padded:
        imp = probs.mean(1).mean(2)  # [B, nW, 49]: mean over heads, then over the window's queries
    else:
        keep = real.to(probs.dtype)  # padded queries do not count
        imp = (probs.mean(1) * keep[None, :, :, None]).sum(2) / keep.sum(1)[None, :, None]
    imp = _from_windows(imp[:, None, :, :, None], H, W, Hp, Wp)
    return out, imp.reshape(B, H, W)


def global_importance(probs, reduced_hw, hw):
    """Mean over heads and queries of global probabilities [B, h, N, M],
    reshaped to the reduced grid and nearest-upsampled to hw: [B, H, W]."""
    B = probs.shape[0]
    g = probs.detach().mean(1).mean(1)  # [B, M]
    return F.interpolate(g.reshape(B, 1, *reduced_hw), size=tuple(hw), mode="nearest")[:, 0]


def hybrid_scale_attention(q_global, k_global, v_global, q_local, k_local, v_local, *, hw, reduced_hw,
                           scale=None, attn_drop=None, strict=True):
    """Naive hybrid-scale op (same arguments as ``sgattn.hybrid_scale_attention``,
    window fixed at 7). Returns (out [B, hg + hl, N, d], importance map [B, H, W])."""
    if scale is None:
        scale = q_global.shape[-1] ** -0.5
    out_g, attn_g = attention(q_global, k_global, v_global, scale, attn_drop)
    out_l, imp_l = window_attention(q_local, k_local, v_local, hw, scale, attn_drop, strict)
    importance = imp_l + global_importance(attn_g, reduced_hw, hw)
    return torch.cat([out_g, out_l], dim=1), importance


def _part_sizes(n, parts):
    if parts == 3:
        return [n // 4, n // 4 * 3 - n // 4, n - n // 4 * 3]
    return [n // 2, n - n // 2]


def reallocate(x, order, layers, strict=True):
    """Sort x's tokens by ``order`` ([B, N] importance, torch.sort, unstable),
    cut the sorted sequence into parts and merge each part's groups of r_p
    tokens with ``layers[p]`` (a Linear(r_p, 1)). Returns [B, M, C]."""
    B, N, C = x.shape
    _, index = torch.sort(order.detach(), dim=1)
    seq, start = [], 0
    for n_p, f in zip(_part_sizes(N, len(layers)), layers):
        r = f.in_features if isinstance(f, nn.Linear) else f[0].numel()
        part = torch.gather(x, 1, index[:, start:start + n_p].unsqueeze(-1).repeat(1, 1, C))
        start += n_p
        if n_p % r:
            if strict:
                raise ValueError(f"naive (paper) reallocation needs each part to split into whole groups: "
                                 f"{n_p} tokens are not a multiple of r_p={r} (N={N}); use strict=False")
            part = F.pad(part, (0, 0, 0, -(-n_p // r) * r - n_p))
        groups = part.shape[1] // r
        part = part.permute(0, 2, 1).reshape(B, C, groups, r)
        merged = f(part) if isinstance(f, nn.Module) else F.linear(part, f[0].reshape(1, r), f[1].reshape(1))
        seq.append(merged.squeeze(-1))
    return torch.cat(seq, dim=-1).permute(0, 2, 1)


def self_guided_attention(q, x, importance, kv1_weight, kv1_bias, kv2_weight, kv2_bias, agg_weights,
                          agg_biases, *, hw, scale=None, attn_drop=None, strict=True, layers=None):
    """Naive self-guided op (same arguments as ``sgattn.self_guided_attention``):
    reallocation of both orderings + attention of all heads. ``importance`` is
    the (row-major, column-major) pair or one row-major [B, N] / [B, H, W]
    tensor. Returns out [B, h, N, d]."""
    B, h, N, d = q.shape
    H, W = hw
    C = x.shape[-1]
    if scale is None:
        scale = d ** -0.5
    if isinstance(importance, torch.Tensor):
        grid = importance.reshape(B, H, W)
        importance = (grid.reshape(B, N), grid.transpose(1, 2).reshape(B, N))
    mask_1, mask_2 = importance
    if layers is None:
        layers = list(zip(agg_weights, agg_biases))
    seq1 = reallocate(x, mask_1, layers, strict)
    x_t = x.reshape(B, H, W, C).permute(0, 2, 1, 3).reshape(B, N, C)  # column-major tokens
    seq2 = reallocate(x_t, mask_2, layers, strict)
    kv1 = F.linear(seq1, kv1_weight, kv1_bias).reshape(B, -1, 2, h // 2, d).permute(2, 0, 3, 1, 4)
    kv2 = F.linear(seq2, kv2_weight, kv2_bias).reshape(B, -1, 2, h // 2, d).permute(2, 0, 3, 1, 4)
    kv = torch.cat([kv1, kv2], dim=2)
    out, _ = attention(q, kv[0], kv[1], scale, attn_drop)
    return out


# --------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------

class Attention(nn.Module):
    """The paper's attention module, naive. ``mask`` (constructor): False for a
    hybrid-scale block, True for a self-guided block; sr_ratio 1 is plain
    attention. ``forward(x, H, W, mask) -> (x, mask)``. ``strict`` (keyword
    only, not in the paper): see the module docstring."""

    def __init__(self, dim, mask, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=1, linear=False, *, strict=True):
        super().__init__()
        # Deliberately the same lines as sgattn.nn's constructor: a baseline shares no code with what it checks.
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.strict = strict
        if sr_ratio > 1 and num_heads % 2:
            raise ValueError(f"SG-Former attention with sr_ratio > 1 splits heads in two; num_heads {num_heads} is odd")
        if sr_ratio > 1 and mask:
            if sr_ratio not in GROUP_SIZES:
                raise ValueError(f"self-guided attention exists for sr_ratio in {sorted(GROUP_SIZES)}, got {sr_ratio}")
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)
            for p, r in enumerate(GROUP_SIZES[sr_ratio], start=1):
                setattr(self, f"f{p}", nn.Linear(r, 1))
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
            self.q1 = nn.Linear(dim, dim // 2, bias=qkv_bias)
            self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
            self.q2 = nn.Linear(dim, dim // 2, bias=qkv_bias)
            self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe_linear = nn.Linear(dim, dim)
        self.lepe_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.apply(init_weights)

    @property
    def kind(self) -> str:
        return "self_guided" if hasattr(self, "f1") else "hybrid" if hasattr(self, "sr") else "plain"

    def _heads(self, t, heads):
        B, N, _ = t.shape
        return t.reshape(B, N, heads, self.dim // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, x, H, W, mask):
        B, N, C = x.shape
        if N != H * W or C != self.dim:
            raise ValueError(f"x {tuple(x.shape)} does not match H*W = {H}*{W} tokens of {self.dim} channels")
        lepe = self.lepe_conv(self.lepe_linear(x).transpose(1, 2).reshape(B, C, H, W))
        lepe = lepe.reshape(B, C, N).transpose(1, 2)
        h, d = self.num_heads, C // self.num_heads
        if self.kind == "hybrid":
            if mask is not None:
                raise ValueError("a hybrid-scale block makes the importance map; it takes mask=None")
            half = h // 2
            x_ = x.transpose(1, 2).reshape(B, C, H, W)
            r = self.sr(x_)
            reduced_hw = tuple(r.shape[-2:])
            r = self.act(self.norm(r.reshape(B, C, -1).permute(0, 2, 1)))
            kv1 = self.kv1(r).reshape(B, -1, 2, half, d).permute(2, 0, 3, 1, 4)
            kv2 = self.kv2(x).reshape(B, N, 2, half, d).permute(2, 0, 3, 1, 4)
            out, imp = hybrid_scale_attention(
                self._heads(self.q1(x), half), kv1[0], kv1[1], self._heads(self.q2(x), half), kv2[0], kv2[1],
                hw=(H, W), reduced_hw=reduced_hw, scale=self.scale, attn_drop=self.attn_drop,
                strict=self.strict)
            mask = [imp.reshape(B, N), imp.permute(0, 2, 1).reshape(B, N)]
        elif self.kind == "self_guided":
            if mask is None:
                raise ValueError("a self-guided block needs the importance orderings (mask) of the "
                                 "preceding hybrid-scale block, got None")
            layers = [getattr(self, f"f{p}") for p in range(1, len(GROUP_SIZES[self.sr_ratio]) + 1)]
            out = self_guided_attention(
                self._heads(self.q(x), h), x, tuple(mask), self.kv1.weight, self.kv1.bias,
                self.kv2.weight, self.kv2.bias, None, None, hw=(H, W), scale=self.scale,
                attn_drop=self.attn_drop, strict=self.strict, layers=layers)
            mask = None
        else:
            kv = self.kv(x).reshape(B, N, 2, h, d).permute(2, 0, 3, 1, 4)
            out, _ = attention(self._heads(self.q(x), h), kv[0], kv[1], self.scale, self.attn_drop)
            mask = None
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out + lepe)), mask


def naive_sgformer(variant: str = "sgformer_s", *, strict: bool = True, **kwargs) -> SGFormer:
    """SG-Former ``variant`` ("sgformer_s", "sgformer_m", "sgformer_b") built
    with the naive ``Attention`` and, like the paper's code, NCHW convolution
    weights (``channels_last=False``, unless given); other keyword arguments go
    to ``SGFormer``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SG-Former variant {variant!r}; known: {', '.join(VARIANTS)}")
    if strict:
        layer = Attention
    else:
        def layer(*args, **kw):
            return Attention(*args, strict=False, **kw)
    kwargs.setdefault("channels_last", False)
    return SGFormer(**VARIANTS[variant], attn_layer=layer, **kwargs)
