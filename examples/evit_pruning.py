"""EViT-style token pruning of a timm ViT, ranked by sgattn's attention mass.

At each chosen block the CLS query's attention, averaged over heads, ranks
the patch tokens (EViT's ``attn[:, :, 0, 1:].mean(1)``); the top ``keep_rate``
of them go on to the block's MLP and the blocks after it, the rest are dropped
(EViT's variant without fusing the dropped tokens). sgattn returns that row
from the attention pass itself (``sgattn.attention_with_mass`` with
``mass_queries`` = the CLS index), so no [B, H, N, N] matrix is formed; the
ranking is detached, as in EViT, where only the fused token would carry its
gradient. ``eager=True`` computes the same with timm's eager attention matrix
(what EViT does today), for comparison.

    python examples/evit_pruning.py --model vit_small_patch16_224 --layers 3 6 9 --keep 0.7
"""
import argparse
import math
import time

import torch
from torch import nn

import sgattn


def attention_with_cls_mass(attn, x, eager=False):
    """timm ``Attention`` on ``x`` [B, N, C]: (its output, the CLS query's
    attention averaged over heads [B, N]); ``eager`` through the full matrix."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if eager:
        p = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        out, cls = p @ v, p[:, :, 0].mean(1).detach()
    else:
        cls_index = torch.zeros(1, dtype=torch.long, device=x.device)
        out, cls = sgattn.attention_with_mass(q, k, v, scale=attn.scale, mass_queries=cls_index,
                                              mass_reduce="sum", mass_heads="mean")
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls


class EViTBlock(nn.Module):
    """A timm ViT ``Block`` that keeps the CLS token and the ``keep_rate`` most
    attended patch tokens (in their original order) after its attention."""

    def __init__(self, block, keep_rate, eager=False):
        super().__init__()
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        self.block, self.keep_rate, self.eager = block, keep_rate, eager
        self.kept = None  # the last call's kept token indices [B, 1 + k] (0 = CLS), for inspection

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("EViT pruning needs unmasked, non-causal attention")
        b = self.block
        out, cls = attention_with_cls_mass(b.attn, b.norm1(x), self.eager)
        x = x + b.drop_path1(b.ls1(out))
        n_keep = math.ceil(self.keep_rate * (x.shape[1] - 1))
        top = cls[:, 1:].topk(n_keep, dim=1).indices.sort(dim=1).values + 1
        self.kept = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
        x = x.gather(1, self.kept[..., None].expand(-1, -1, x.shape[-1]))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def evit(model, layers, keep_rate, eager=False):
    """Make blocks ``layers`` of a timm ``VisionTransformer`` prune tokens (in place; returns the model)."""
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "cls_token", None) is None:
        raise ValueError("EViT pruning needs a ViT with exactly one prefix token, the CLS token "
                         f"(this one has {getattr(model, 'num_prefix_tokens', None)})")
    if model.global_pool != "token":
        raise ValueError(f"EViT pruning drops patch tokens: use global_pool='token', not {model.global_pool!r}")
    for i in layers:
        if not 0 <= i < len(model.blocks):
            raise ValueError(f"layer {i} out of range: the model has {len(model.blocks)} blocks")
        model.blocks[i] = EViTBlock(model.blocks[i], keep_rate, eager)
    return model


def main(argv=None):
    import copy

    import timm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()  # random weights: no download
    x = torch.randn(args.batch, 3, *base.default_cfg["input_size"][1:])
    for eager in (True, False):
        model = evit(copy.deepcopy(base), args.layers, args.keep, eager=eager)
        with torch.no_grad():
            t0 = time.perf_counter()
            y = model(x)
            dt = time.perf_counter() - t0
        tokens = [model.blocks[i].kept.shape[1] for i in args.layers]
        print(f"{'eager ' if eager else 'sgattn'}: logits {tuple(y.shape)}, tokens kept {tokens}, "
              f"{1e3 * dt:.0f} ms")


if __name__ == "__main__":
    main()
