"""Drop-in attention modules for SG-Former.

Each module has the constructor arguments, parameter names and shapes of the
paper's ``Attention`` module, and its ``forward(x, H, W, mask) -> (x, mask)``
contract: x is [B, N, C] with N = H*W row-major tokens; a hybrid-scale module
returns the pair (row-major, column-major) of [B, N] importance flattenings
that the next, self-guided, module consumes; the others return None.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .composition import REALLOCATION_GROUPS, importance_orderings


def init_weights(m: nn.Module):
    """The paper's initialisation: truncated-normal Linear weights (std .02),
    He-normal convolutions (fan-out), zero biases, unit LayerNorm scales."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.data.zero_()


def _check_input(module, x, H, W):
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{type(module).__name__}: x must be [B, N, C], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[2] != module.dim:
        raise ValueError(f"{type(module).__name__}: x has {x.shape[2]} channels, module expects {module.dim}")
    if H * W != x.shape[1]:
        raise ValueError(f"{type(module).__name__}: H*W = {H}*{W} = {H * W} does not match N = {x.shape[1]}")


def tokens_to_grid(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, N, C] row-major tokens -> a [B, C, H, W] image for the convolutions.
    Eager: the channels-last view, the tokens' own memory order (no copy).
    Under torch.compile: a contiguous NCHW copy, which inductor fuses; with
    dynamic shapes it cannot order channels-last symbolic strides such as
    (1, C*W, C) ("cannot determine truth value of Relational")."""
    # sizes by index, not unpacking: a torch.fx Proxy cannot be unpacked; explicit C: B may be 0
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], H, W)
    return grid.contiguous() if torch.compiler.is_compiling() else grid


def use_channels_last(module: nn.Module) -> nn.Module:
    """Store ``module``'s convolution weights channels-last (in place), the
    layout ``tokens_to_grid`` produces: oneDNN then runs the convolutions on the
    tokens as they lie, without converting input and output (the depthwise
    3x3 convs are 4-8x faster than on NCHW on a CPU), and conv outputs flatten
    back to contiguous tokens for free. The layout survives ``load_state_dict``,
    ``.to(dtype/device)`` and ``copy.deepcopy``."""
    return module.to(memory_format=torch.channels_last)


class _AttentionBase(nn.Module):
    """What all three kinds share: locally-enhanced positional encoding (lepe),
    output projection, dropouts and the softmax scale."""

    halves = ""  # the kind's name when its heads split into two halves (num_heads must be even)

    def __init__(self, dim, num_heads, qk_scale, attn_drop, proj_drop, sr_ratio, linear=False, device=None,
                 dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if self.halves and num_heads % 2:
            raise ValueError(f"{self.halves} splits heads in two halves; num_heads {num_heads} is odd")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.linear = linear  # accepted for signature compatibility; unused, as in the paper's code
        self.lepe_linear = nn.Linear(dim, dim, **dd)
        self.lepe_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def heads(self, t: torch.Tensor, num_heads: int) -> torch.Tensor:
        """[B, N, num_heads*d] -> [B, num_heads, N, d]."""
        B, N, _ = t.shape
        return t.reshape(B, N, num_heads, self.dim // self.num_heads).transpose(1, 2)

    def finish(self, out: torch.Tensor, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Merge heads [B, h, N, d] -> [B, N, C], add lepe, project."""
        B, N, C = x.shape
        lepe = self.lepe_conv(tokens_to_grid(self.lepe_linear(x), H, W)).reshape(B, C, N).transpose(1, 2)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out + lepe))


class HybridScaleAttention(_AttentionBase):
    """Hybrid-scale attention: h/2 heads attend globally to an sr-times reduced map, h/2 heads
    inside 7x7 windows; returns the importance orderings as the mask."""

    window = 7
    halves = "hybrid-scale attention"

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=2, linear=False, device=None, dtype=None):
        super().__init__(dim, num_heads, qk_scale, attn_drop, proj_drop, sr_ratio, linear, device, dtype)
        dd = dict(device=device, dtype=dtype)
        if sr_ratio < 2:
            raise ValueError(f"hybrid-scale attention needs sr_ratio > 1, got {sr_ratio}")
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.act = nn.GELU()
        self.q1 = nn.Linear(dim, dim // 2, bias=qkv_bias, **dd)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.q2 = nn.Linear(dim, dim // 2, bias=qkv_bias, **dd)
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.apply(init_weights)
        use_channels_last(self)

    def forward(self, x, H, W, mask=None):
        if mask is not None:
            raise ValueError("HybridScaleAttention makes the importance map; it takes mask=None")
        _check_input(self, x, H, W)
        B, N, C = x.shape
        half = self.num_heads // 2
        reduced = self.sr(tokens_to_grid(x, H, W))
        reduced_hw = tuple(reduced.shape[-2:])
        reduced = self.act(self.norm(reduced.flatten(2).transpose(1, 2)))
        k_g, v_g = self.kv1(reduced).chunk(2, dim=-1)
        k_l, v_l = self.kv2(x).chunk(2, dim=-1)
        out, importance = ops.hybrid_scale_attention(
            self.heads(self.q1(x), half), self.heads(k_g, half), self.heads(v_g, half),
            self.heads(self.q2(x), half), self.heads(k_l, half), self.heads(v_l, half),
            hw=(H, W), reduced_hw=reduced_hw, window=self.window, scale=self.scale,
            dropout_p=self.dropout_p)
        return self.finish(out, x, H, W), list(importance_orderings(importance))


class SelfGuidedAttention(_AttentionBase):
    """Self-guided attention: all heads attend to tokens merged by importance (the mask)."""

    halves = "self-guided attention"

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=2, linear=False, device=None, dtype=None):
        super().__init__(dim, num_heads, qk_scale, attn_drop, proj_drop, sr_ratio, linear, device, dtype)
        dd = dict(device=device, dtype=dtype)
        if sr_ratio not in REALLOCATION_GROUPS:
            raise ValueError(f"self-guided attention supports sr_ratio in {sorted(REALLOCATION_GROUPS)}, got {sr_ratio}")
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv1 = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv2 = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        for p, r in enumerate(REALLOCATION_GROUPS[sr_ratio], start=1):
            setattr(self, f"f{p}", nn.Linear(r, 1, **dd))
        self.apply(init_weights)
        use_channels_last(self)

    @property
    def aggregators(self):
        return [getattr(self, f"f{p}") for p in range(1, len(REALLOCATION_GROUPS[self.sr_ratio]) + 1)]

    def forward(self, x, H, W, mask):
        if mask is None:
            raise ValueError("SelfGuidedAttention needs the importance orderings (mask) of the "
                             "preceding hybrid-scale block, got None")
        _check_input(self, x, H, W)
        out = ops.self_guided_attention(
            self.heads(self.q(x), self.num_heads), x, mask,
            self.kv1.weight, self.kv1.bias, self.kv2.weight, self.kv2.bias,
            [f.weight for f in self.aggregators], [f.bias for f in self.aggregators],
            hw=(H, W), scale=self.scale, dropout_p=self.dropout_p)
        return self.finish(out, x, H, W), None


class GlobalAttention(_AttentionBase):
    """Stage-4 attention: plain multi-head attention over all tokens (sr = 1)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=1, linear=False, device=None, dtype=None):
        super().__init__(dim, num_heads, qk_scale, attn_drop, proj_drop, sr_ratio, linear, device, dtype)
        dd = dict(device=device, dtype=dtype)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.apply(init_weights)
        use_channels_last(self)

    def forward(self, x, H, W, mask=None):
        _check_input(self, x, H, W)
        k, v = self.kv(x).chunk(2, dim=-1)
        h = self.num_heads
        out = ops.attention(self.heads(self.q(x), h), self.heads(k, h), self.heads(v, h),
                            scale=self.scale, dropout_p=self.dropout_p)
        return self.finish(out, x, H, W), None


def Attention(dim, mask, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
              sr_ratio=1, linear=False, device=None, dtype=None) -> _AttentionBase:
    """The paper's ``Attention(dim, mask, ...)`` constructor: picks the kind as
    its code does. sr_ratio 1: ``GlobalAttention``; otherwise ``mask`` True:
    ``SelfGuidedAttention``, False: ``HybridScaleAttention``. ``device`` and
    ``dtype`` are those of the parameters (as for torch.nn layers)."""
    kind = GlobalAttention if sr_ratio <= 1 else SelfGuidedAttention if mask else HybridScaleAttention
    return kind(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                proj_drop=proj_drop, sr_ratio=sr_ratio, linear=linear, device=device, dtype=dtype)


_KINDS = {"f1": SelfGuidedAttention, "sr": HybridScaleAttention, "kv": GlobalAttention}


def patch_model(model: nn.Module) -> int:
    """Replace, in place and keeping weights, every submodule of ``model`` whose
    class is named ``Attention`` and has the paper's parameter layout by the
    matching sgattn module. Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Attention":
                continue
            kind = next((k for key, k in _KINDS.items() if isinstance(getattr(child, key, None), nn.Module)), None)
            if kind is None or not hasattr(child, "lepe_conv") or not hasattr(child, "num_heads"):
                continue
            q = getattr(child, "q", None) or child.q1
            new = kind(child.dim, num_heads=child.num_heads, qkv_bias=q.bias is not None,
                       qk_scale=child.scale, attn_drop=child.attn_drop.p, proj_drop=child.proj_drop.p,
                       sr_ratio=child.sr_ratio, linear=getattr(child, "linear", False))
            # dtype and device first, so that float64 weights are not rounded through float32
            new.to(device=child.proj.weight.device, dtype=child.proj.weight.dtype)
            new.load_state_dict(child.state_dict(), strict=True)
            new.train(child.training)
            setattr(parent, child_name, new)
            replaced += 1
    return replaced
