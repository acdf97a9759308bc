"""SG-Former S/M/B (Ren et al., ICCV 2023) at any input resolution >= 32 x 32.

Parameter names and shapes are those of the authors' checkpoints, so their
state dicts load with ``strict=True`` (``load_checkpoint``). Behaviour beyond
224 x 224, where the authors' code does not run (at 224 it is theirs):
- the position embedding is resampled bicubically to the stage-1 grid when
  the grid differs from the one the model was built for;
- windows pad the grid to multiples of 7, reductions floor, reallocation
  rounds its group counts up (see ``sgattn.composition``).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

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

    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False, **dd))
        self.add_module("bn", nn.GroupNorm(1, cout, **dd))


class Stem(nn.Module):
    """Stride-4 stem: conv3x3/2, GELU, conv3x3, GELU, conv3x3/2, then LayerNorm on tokens."""

    def __init__(self, dim, in_chans=3, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Sequential(ConvGN(in_chans, dim, 3, 2, 1, **dd), nn.GELU(), ConvGN(dim, dim, 3, 1, 1, **dd),
                                  nn.GELU(), ConvGN(dim, dim, 3, 2, 1, **dd))
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x):
        x = self.conv(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class PatchMerging(nn.Module):
    """Stride-2 stage embedding: 1x1 conv, GELU, 3x3/2 depthwise conv, GELU, 1x1 conv."""

    def __init__(self, cin, cout, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.act = nn.GELU()
        self.conv1 = ConvGN(cin, cout, 1, **dd)
        self.conv2 = ConvGN(cout, cout, 3, 2, 1, groups=cout, **dd)
        self.conv3 = ConvGN(cout, cout, 1, **dd)

    def forward(self, x):
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), H, W


class DWConv(nn.Module):
    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, device=device, dtype=dtype)

    def forward(self, x, H, W):
        return self.dwconv(sgnn.tokens_to_grid(x, H, W)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc2(drop(gelu(a + dwconv(a)))), a = fc1(x)."""

    def __init__(self, dim, hidden, drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.dwconv = DWConv(hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x, H, W):
        x = self.fc1(x)
        x = self.drop(self.act(x + self.dwconv(x, H, W)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, self_guided, mlp_ratio=4.0, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, attn_layer=sgnn.Attention, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        # a custom attn_layer (the paper's signature) is given device/dtype only when they are set
        self.attn = attn_layer(dim, self_guided, num_heads=num_heads, qkv_bias=True, attn_drop=attn_drop,
                               proj_drop=drop, sr_ratio=sr_ratio, **{k: v for k, v in dd.items() if v is not None})
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, **dd)

    def forward(self, x, H, W, mask):
        y, mask = self.attn(self.norm1(x), H, W, mask)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x, mask


class StageNorm(nn.LayerNorm):
    """A stage's closing LayerNorm, returning the normalised tokens as the stage
    map [B, C, H, W]: the module that ``feature_info`` names outputs the feature
    itself (timm's fx and hook feature extractors take it from there)."""

    def forward(self, x, H, W):
        return sgnn.tokens_to_grid(super().forward(x), H, W)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, H: int, W: int) -> torch.Tensor:
    """[1, H*W, C]: ``pos_embed`` [1, grid*grid, C], resampled bicubically to H x W if
    needed (with timm, a torch.fx leaf: the size test is not symbolically traceable)."""
    if (H, W) == (grid, grid):
        return pos_embed
    pos = pos_embed.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False)
    return pos.flatten(2).transpose(1, 2)


class SGFormer(nn.Module):
    """SG-Former backbone and classifier, with the model API of timm.

    ``img_size`` fixes the grid of the stored position embedding
    (img_size//4 squared, as in the paper's code); inputs of any other size
    H x W >= 32 x 32 resample it. ``features_only`` makes ``forward`` return
    the normalised stage maps [B, C_i, H_i, W_i] for ``out_indices``.
    ``attn_layer`` builds each block's attention (default ``sgattn.nn.Attention``).
    ``channels_last`` (default True) stores the weights of every convolution
    on token maps (all but the stem's, which sees NCHW images) channels-last,
    the token maps' memory order, so none converts its input or output
    (``sgattn.nn.use_channels_last``); False stores them NCHW, as the paper's
    code does. ``device`` and ``dtype`` are those every parameter is created
    with (``torch.device("meta")`` builds it without memory).

    timm API: ``forward_features`` (the unpooled, normalised stage-4 map
    [B, C4, H/32, W/32]), ``forward_head(x, pre_logits=False)``,
    ``get_classifier``, ``reset_classifier(num_classes, global_pool)``,
    ``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``,
    ``num_features``, ``feature_info`` and ``forward_intermediates``.
    """

    def __init__(self, embed_dims, num_heads, depths, img_size=224, num_classes=1000, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, features_only=False, out_indices=(0, 1, 2, 3),
                 mlp_ratio=4.0, attn_layer=sgnn.Attention, in_chans=3, global_pool="avg", channels_last=True,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..3, got {out_indices}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
        if isinstance(img_size, (tuple, list)):
            if len(set(img_size)) != 1:
                raise ValueError(f"img_size fixes a square position-embedding grid; got {img_size} "
                                 "(non-square inputs are fine at run time: the embedding is resampled)")
            img_size = img_size[0]
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.in_chans = in_chans
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        self.pos_grid = img_size // 4
        self.num_stages = 4  # fewer after prune_intermediate_layers
        self.grad_checkpointing = False
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[3]
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"norm{i + 1}")
                             for i in range(4)]
        # linspace(0, drop_path_rate, n) in Python: a tensor would be created on the meta device under
        # torch.device("meta"), where .tolist() fails
        n = sum(depths)
        rates = [drop_path_rate * j / (n - 1) if n > 1 else 0.0 for j in range(n)]
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", Stem(embed_dims[0], in_chans, **dd) if i == 0 else
                    PatchMerging(embed_dims[i - 1], embed_dims[i], **dd))
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], num_heads[i], SR_RATIOS[i], self_guided=(j % 2 == 1 and i < 3),
                      mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
                      drop_path=rates[first + j], attn_layer=attn_layer, **dd)
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", StageNorm(embed_dims[i], eps=1e-6, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, self.pos_grid ** 2, embed_dims[0], **dd))
        self.num_classes = num_classes
        if not features_only:
            self.head = nn.Linear(embed_dims[3], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(sgnn.init_weights)
        with torch.no_grad():  # (copying into a meta tensor is a no-op)
            self.pos_embed.copy_(sincos_pos_embed(embed_dims[0], self.pos_grid)[None])
        # (after the attention modules, which make their own convs channels-last)
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # The stem convolves images, which arrive NCHW; channels-last saves it
        # nothing in inference and made its backward ~2x slower (oneDNN, CPU).
        self.patch_embed1.to(memory_format=torch.contiguous_format)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this (on every submodule) before compiling
        raise RuntimeError(
            "SGFormer does not support TorchScript (torch.jit.script): sgattn's attention ops check their "
            "inputs and choose a backend (Triton, CUDA, CPU extension or the PyTorch reference) in Python "
            "on every call, which TorchScript cannot compile. Use torch.compile (or torch.fx through timm)")

    # ------------------------------------------------------------ timm API ---

    @torch.jit.ignore
    def no_weight_decay(self):
        """Parameter names to exclude from weight decay: the position embedding."""
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Regexes grouping parameters by depth (stem, stage embeddings, blocks,
        stage norms; the head last), for timm's layer-wise lr decay."""
        return dict(stem=r"^patch_embed1\.|^pos_embed$",
                    blocks=[(r"^patch_embed(\d+)\.", (-1,)),
                            (r"^block(\d+)\.", (0,)) if coarse else (r"^block(\d+)\.(\d+)\.", None),
                            (r"^norm(\d+)\.", (99999,))])  # 99999: timm's "join the previous group"

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block's activations in backward (torch.utils.checkpoint,
        non-reentrant) instead of storing them: less memory, ~one more forward."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new, freshly initialised classifier of ``num_classes`` outputs (0: none,
        ``forward`` returns pooled features); ``global_pool`` 'avg' or '' (none).
        It takes the model's device, dtype and train/eval mode."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.pos_embed
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            sgnn.init_weights(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def position_embedding(self, H: int, W: int) -> torch.Tensor:
        """[1, H*W, C1]: the stored embedding, resampled bicubically to H x W if needed."""
        return resample_pos_embed(self.pos_embed, self.pos_grid, H, W)

    def _check_images(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"SGFormer expects images [B, {self.in_chans}, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"SGFormer expects floating-point images (normalised, e.g. x.float() / 255 "
                             f"then the mean/std), got {x.dtype}")
        if min(x.shape[-2:]) < MIN_INPUT:
            raise ValueError(f"SGFormer needs inputs of at least {MIN_INPUT}x{MIN_INPUT}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")

    def _stages(self, x, last: Optional[int] = None, hook=None):
        """Yield the normalised map [B, C_i, H_i, W_i] of stages 0..last (default: the last one kept).
        ``hook(stage, block_index, block, mask)`` sees every block's output mask."""
        if not isinstance(x, torch.fx.Proxy):  # torch.fx traces with a Proxy: no shape to check
            self._check_images(x)
        for i in range(self.num_stages if last is None else last + 1):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            if i == 0:
                x = x + self.position_embedding(H, W)
            mask = None
            for j, blk in enumerate(getattr(self, f"block{i + 1}")):
                if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                    x, mask = _checkpoint(blk, x, H, W, mask, use_reentrant=False)
                else:
                    x, mask = blk(x, H, W, mask)
                if hook is not None:
                    hook(i, j, blk, mask)
            x = getattr(self, f"norm{i + 1}")(x, H, W)
            yield x

    def forward_stages(self, x):
        """The normalised token maps of the four stages (those kept by
        ``prune_intermediate_layers``): list of [B, C_i, H_i, W_i]."""
        return list(self._stages(x))

    def forward_intermediates(self, x, indices: Optional[Union[int, Sequence[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-feature API. ``indices``: None (all stages), an
        int n (the last n stages) or stage indices (negative count from the
        end). Returns (final map, as ``forward_features``, [maps]) or, with
        ``intermediates_only``, the maps; every map is the stage's normalised
        output [B, C_i, H_i, W_i] (``norm`` is accepted for compatibility: stage
        outputs are always normalised). ``stop_early`` skips the stages after
        the last one asked for (only with ``intermediates_only``)."""
        if output_fmt != "NCHW":
            raise ValueError(f"SGFormer intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take = _take_indices(indices, self.num_stages)
        last = max(take) if (stop_early and intermediates_only) else None
        maps = list(self._stages(x, last))
        intermediates = [maps[i] for i in take]
        if intermediates_only:
            return intermediates
        return maps[-1], intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """For timm's feature wrapper: drop the stages after the last of ``indices``
        (``forward_features`` then ends there, ``num_features`` is its width) and
        the classifier (``prune_head``; always when stages are dropped: it was
        sized for the last one). Stage norms are part of each stage's output and
        stay (``prune_norm`` is accepted for compatibility). Returns the stage indices."""
        take = _take_indices(indices, self.num_stages)
        last = max(take)
        if last < self.num_stages - 1:
            for i in range(last + 1, self.num_stages):
                for name in ("patch_embed", "block", "norm"):
                    delattr(self, f"{name}{i + 1}")
            self.num_stages = last + 1
            self.num_features = self.head_hidden_size = self.embed_dims[last]
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x):
        """The normalised map of the last stage [B, C4, H/32, W/32] (unpooled, as in timm)."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x, pre_logits: bool = False):
        """Pool (mean over positions when ``global_pool`` is 'avg') and classify a
        ``forward_features`` map; ``pre_logits`` returns the pooled features."""
        if self.global_pool == "avg":
            x = x.flatten(2).mean(dim=2)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        if self.features_only:
            maps = self.forward_stages(x)
            return [maps[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))


def _take_indices(indices, n: int) -> List[int]:
    """Stage indices in 0..n-1 from timm's ``indices`` (None, an int, a sequence), n stages kept."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices as an int takes the last k of {n} stages, k in 1..{n}, got {indices}")
        return list(range(n - indices, n))
    take = [i + n if i < 0 else i for i in indices]
    if not take or any(i not in range(n) for i in take):
        raise ValueError(f"stage indices must be a non-empty sequence in -{n}..{n - 1}, got {list(indices)}")
    return take


def _build(variant, img_size=224, num_classes=1000, drop_path_rate=0.0, features_only=False,
           out_indices=(0, 1, 2, 3), pretrained=False, checkpoint_path=None, **kwargs):
    if checkpoint_path is not None and not os.path.isfile(os.fspath(checkpoint_path)):
        raise FileNotFoundError(f"SG-Former checkpoint not found: {os.fspath(checkpoint_path)!r}")
    model = SGFormer(**VARIANTS[variant], img_size=img_size, num_classes=num_classes,
                     drop_path_rate=drop_path_rate, features_only=features_only,
                     out_indices=out_indices, **kwargs)
    if checkpoint_path is not None:
        _load_keeping_head(model, read_checkpoint(checkpoint_path))
    elif pretrained:
        raise ValueError(f"{variant}(pretrained=True) needs checkpoint_path=...: sgattn ships no weights and "
                         "downloads none. The authors publish theirs (see the README, 'Pretrained weights'); "
                         "pass the downloaded file as checkpoint_path")
    return model


def _load_keeping_head(model: SGFormer, checkpoint: dict):
    """Strict load, except that a classifier of another shape is left as initialised."""
    state = checkpoint_state_dict(checkpoint, model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("head.") and k in own and own[k].shape != v.shape)}
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith("head.")]
    if bad:
        raise RuntimeError(f"checkpoint does not fit {type(model).__name__}: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    return result


_FACTORY_DOC = """{title}: {params} parameters at 1000 classes.

    Keyword arguments: ``img_size`` (224: the position-embedding grid),
    ``num_classes``, ``drop_path_rate``, ``features_only``/``out_indices``
    (return the normalised stage maps), ``in_chans``, ``global_pool``,
    ``drop_rate``, ``attn_drop_rate``, ``attn_layer``; ``checkpoint_path``
    loads weights as ``load_checkpoint`` does (the authors' ``.pth`` layouts or
    a ``.safetensors`` file; a classifier of another ``num_classes`` is left
    initialised); ``pretrained=True`` requires ``checkpoint_path``.
    """


def sgformer_s(pretrained=False, **kwargs) -> SGFormer:
    return _build("sgformer_s", pretrained=pretrained, **kwargs)


def sgformer_m(pretrained=False, **kwargs) -> SGFormer:
    return _build("sgformer_m", pretrained=pretrained, **kwargs)


def sgformer_b(pretrained=False, **kwargs) -> SGFormer:
    return _build("sgformer_b", pretrained=pretrained, **kwargs)


sgformer_s.__doc__ = _FACTORY_DOC.format(title="SG-Former-S", params="22.55M")
sgformer_m.__doc__ = _FACTORY_DOC.format(title="SG-Former-M", params="38.69M")
sgformer_b.__doc__ = _FACTORY_DOC.format(title="SG-Former-B", params="77.95M")

CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_checkpoint(path) -> dict:
    """Load a checkpoint file: ``.safetensors`` (needs the ``safetensors``
    package) or a ``torch.save`` file (read with ``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SG-Former checkpoint not found: {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"reading {path!r} needs the safetensors package: pip install safetensors "
                              "(or pip install 'sgattn[timm]')") from exc
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_state_dict(checkpoint, model: Optional[SGFormer] = None) -> dict:
    """The model weights of a checkpoint dict in one of the authors' layouts:
    under ``state_dict_ema`` (else ``model_ema``, ``state_dict``, ``model``,
    else the dict itself), DistributedDataParallel's ``module.`` and
    torch.compile's ``_orig_mod.`` prefixes removed. Given ``model``, the
    position embedding is resampled (bicubic) to its grid and the classifier
    dropped for a ``features_only`` model."""
    state = next((checkpoint[k] for k in CHECKPOINT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    state = out
    if model is None:
        return state
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        g = math.isqrt(pos.shape[1])
        if g * g != pos.shape[1] or pos.shape[2] != model.pos_embed.shape[2]:
            raise ValueError(f"checkpoint pos_embed {tuple(pos.shape)} is not a square grid of "
                             f"{model.pos_embed.shape[2]} channels")
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(model.pos_grid, model.pos_grid), mode="bicubic", align_corners=False)
        state["pos_embed"] = grid.flatten(2).transpose(1, 2).to(pos.dtype)
    if model.features_only or not isinstance(getattr(model, "head", None), nn.Linear):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


def load_checkpoint(model: SGFormer, checkpoint, strict: bool = True):
    """Load the authors' weights into ``model``.

    ``checkpoint`` is a path (a ``torch.save`` file or a ``.safetensors``
    file) or an already loaded dict; weights are taken from ``state_dict_ema``,
    else ``model_ema``, ``state_dict``, ``model``, else the dict itself, with
    any DistributedDataParallel ``module.`` prefix removed. The position
    embedding is resampled (bicubic) when the model was built for another
    ``img_size``; the classifier weights are dropped for a ``features_only``
    model or one without a classifier. With ``strict=False``, tensors whose
    shapes differ from the model's (e.g. another classifier) are skipped.
    A missing file raises ``FileNotFoundError`` naming the path.
    Returns ``model.load_state_dict``'s result.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    state = checkpoint_state_dict(checkpoint, model)
    if not strict:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    return model.load_state_dict(state, strict=strict)


def save_safetensors(model_or_state, path) -> None:
    """Write a model's weights (or a checkpoint in any layout ``load_checkpoint``
    takes) to a ``.safetensors`` file (needs the ``safetensors`` package)."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ImportError("save_safetensors needs the safetensors package: pip install safetensors") from exc
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else \
        checkpoint_state_dict(model_or_state)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.fspath(path))
