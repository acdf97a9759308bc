"""SG-Former S/M/B (SPEC section 1) at any input resolution >= 32 x 32.

Parameter names and shapes are those of the authors' checkpoints, so their
state dicts load with ``strict=True`` (``load_checkpoint``). Generalisations
beyond 224 x 224 (SPEC [generalisation]):
- the position embedding is resampled bicubically to the stage-1 grid when
  the grid differs from the one the model was built for;
- windows pad the grid to multiples of 7, reductions floor, reallocation
  rounds its group counts up (see ``sgattn.reference``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as sgnn

VARIANTS = {
    "sgformer_s": dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 4, 16, 1)),
    "sgformer_m": dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 6, 28, 2)),
    "sgformer_b": dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 6, 12, 24), depths=(4, 6, 24, 2)),
}
SR_RATIOS = (8, 4, 2, 1)
MIN_INPUT = 32


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position embedding [grid*grid, dim]: the first half of the
    channels encodes the column (x) coordinate, the second half the row (y)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def encode(pos):
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(xs), encode(ys)], axis=1)).float()


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class ConvGN(nn.Sequential):
    """Bias-free conv + GroupNorm(1, C) (the checkpoints call it Conv2d_BN: keys c, bn)."""

    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.GroupNorm(1, cout))


class Stem(nn.Module):
    """Stride-4 stem: conv3x3/2, GELU, conv3x3, GELU, conv3x3/2, then LayerNorm on tokens."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Sequential(ConvGN(3, dim, 3, 2, 1), nn.GELU(), ConvGN(dim, dim, 3, 1, 1), nn.GELU(),
                                  ConvGN(dim, dim, 3, 2, 1))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.conv(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class PatchMerging(nn.Module):
    """Stride-2 stage embedding: 1x1 conv, GELU, 3x3/2 depthwise conv, GELU, 1x1 conv."""

    def __init__(self, cin, cout):
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvGN(cin, cout, 1)
        self.conv2 = ConvGN(cout, cout, 3, 2, 1, groups=cout)
        self.conv3 = ConvGN(cout, cout, 1)

    def forward(self, x):
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), H, W


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc2(drop(gelu(a + dwconv(a)))), a = fc1(x)."""

    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, H, W):
        x = self.fc1(x)
        x = self.drop(self.act(x + self.dwconv(x, H, W)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, self_guided, mlp_ratio=4.0, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, attn_layer=sgnn.Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_layer(dim, self_guided, num_heads=num_heads, qkv_bias=True, attn_drop=attn_drop,
                               proj_drop=drop, sr_ratio=sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, H, W, mask):
        y, mask = self.attn(self.norm1(x), H, W, mask)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x, mask


class SGFormer(nn.Module):
    """SG-Former backbone and classifier.

    ``img_size`` fixes the grid of the stored position embedding
    (img_size//4 squared, as in the paper's code); inputs of any other size
    H x W >= 32 x 32 resample it. ``features_only`` makes ``forward`` return
    the normalised stage maps [B, C_i, H_i, W_i] for ``out_indices``.
    ``attn_layer`` builds each block's attention (default ``sgattn.nn.Attention``).
    """

    def __init__(self, embed_dims, num_heads, depths, img_size=224, num_classes=1000, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, features_only=False, out_indices=(0, 1, 2, 3),
                 mlp_ratio=4.0, attn_layer=sgnn.Attention):
        super().__init__()
        if any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..3, got {out_indices}")
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        self.pos_grid = img_size // 4
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}",
                    Stem(embed_dims[0]) if i == 0 else PatchMerging(embed_dims[i - 1], embed_dims[i]))
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], SR_RATIOS[i], self_guided=(j % 2 == 1 and i < 3),
                      mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
                      drop_path=rates[first + j], attn_layer=attn_layer)
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid ** 2, embed_dims[0]))
        self.num_classes = num_classes
        if not features_only:
            self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(sgnn.init_weights)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(embed_dims[0], self.pos_grid)[None])

    def position_embedding(self, H: int, W: int) -> torch.Tensor:
        """[1, H*W, C1]: the stored embedding, resampled bicubically to H x W if needed."""
        g = self.pos_grid
        if (H, W) == (g, g):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H, W), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward_stages(self, x):
        """The normalised token maps of the four stages: list of [B, C_i, H_i, W_i]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SGFormer expects images [B, 3, H, W], got {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT:
            raise ValueError(f"SGFormer needs inputs of at least {MIN_INPUT}x{MIN_INPUT}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        B = x.shape[0]
        maps = []
        for i in range(4):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            if i == 0:
                x = x + self.position_embedding(H, W)
            mask = None
            for blk in getattr(self, f"block{i + 1}"):
                x, mask = blk(x, H, W, mask)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.transpose(1, 2).reshape(B, -1, H, W)
            maps.append(x)
        return maps

    def forward_features(self, x):
        """Pooled stage-4 features [B, C4]."""
        return self.forward_stages(x)[3].flatten(2).mean(dim=2)

    def forward(self, x):
        if self.features_only:
            maps = self.forward_stages(x)
            return [maps[i] for i in self.out_indices]
        return self.head(self.forward_features(x))


def _build(variant, img_size=224, num_classes=1000, drop_path_rate=0.0, features_only=False,
           out_indices=(0, 1, 2, 3), **kwargs):
    return SGFormer(**VARIANTS[variant], img_size=img_size, num_classes=num_classes,
                    drop_path_rate=drop_path_rate, features_only=features_only,
                    out_indices=out_indices, **kwargs)


def sgformer_s(img_size=224, num_classes=1000, drop_path_rate=0.0, features_only=False,
               out_indices=(0, 1, 2, 3), **kwargs) -> SGFormer:
    """SG-Former-S: 22.55M parameters at 1000 classes."""
    return _build("sgformer_s", img_size, num_classes, drop_path_rate, features_only, out_indices, **kwargs)


def sgformer_m(img_size=224, num_classes=1000, drop_path_rate=0.0, features_only=False,
               out_indices=(0, 1, 2, 3), **kwargs) -> SGFormer:
    """SG-Former-M: 38.69M parameters at 1000 classes."""
    return _build("sgformer_m", img_size, num_classes, drop_path_rate, features_only, out_indices, **kwargs)


def sgformer_b(img_size=224, num_classes=1000, drop_path_rate=0.0, features_only=False,
               out_indices=(0, 1, 2, 3), **kwargs) -> SGFormer:
    """SG-Former-B: 77.95M parameters at 1000 classes."""
    return _build("sgformer_b", img_size, num_classes, drop_path_rate, features_only, out_indices, **kwargs)


CHECKPOINT_KEYS = ("state_dict_ema", "state_dict", "model")


def load_checkpoint(model: SGFormer, checkpoint, strict: bool = True):
    """Load the authors' weights into ``model``.

    ``checkpoint`` is a path to a ``torch.save`` file or an already loaded
    dict; weights are taken from ``state_dict_ema``, else ``state_dict``, else
    ``model``, else the dict itself, with any DistributedDataParallel
    ``module.`` prefix removed. The position embedding is resampled
    (bicubic) when the model was built for another ``img_size``; the
    classifier weights are dropped for a ``features_only`` model.
    Returns ``model.load_state_dict``'s result.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = next((checkpoint[k] for k in CHECKPOINT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        g = math.isqrt(pos.shape[1])
        if g * g != pos.shape[1] or pos.shape[2] != model.pos_embed.shape[2]:
            raise ValueError(f"checkpoint pos_embed {tuple(pos.shape)} is not a square grid of "
                             f"{model.pos_embed.shape[2]} channels")
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(model.pos_grid, model.pos_grid), mode="bicubic", align_corners=False)
        state["pos_embed"] = grid.flatten(2).transpose(1, 2).to(pos.dtype)
    if model.features_only:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return model.load_state_dict(state, strict=strict)
