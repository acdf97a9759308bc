"""Registration of sgformer_s/m/b with timm (only imported when timm is installed).

After registration ``timm.create_model("sgformer_s", ...)`` builds an
``SGFormer`` through timm's ``build_model_with_cfg``: ``features_only=True``
wraps it in timm's feature getter (``forward_intermediates``), and
``pretrained=True`` loads a local file given as
``pretrained_cfg_overlay=dict(file=PATH)`` (the authors' ``.pth`` layouts or
``.safetensors``). sgattn downloads nothing.
"""
from __future__ import annotations

import os

from .. import nn as sgnn
from .sgformer import SGFormer, VARIANTS, checkpoint_state_dict, resample_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_registered = False


def _cfg(**kwargs):
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                first_conv="patch_embed1.conv.0.c", classifier="head", fixed_input_size=False,
                paper_ids="arXiv:2308.12216", paper_name="SG-Former: Self-guided Transformer with "
                "Evolving Token Reallocation", origin_url="https://github.com/OliverRensu/SG-Former", **kwargs)


def _filter(state_dict, model):
    return checkpoint_state_dict(state_dict, model)


def _create(variant, pretrained=False, **kwargs):
    from timm.models import build_model_with_cfg

    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        cfg = kwargs.get("pretrained_cfg")
        path = overlay.get("file") or (cfg.get("file") if isinstance(cfg, dict) else getattr(cfg, "file", None))
        if not path and not overlay.get("state_dict"):
            raise ValueError(
                f"timm.create_model({variant!r}, pretrained=True) needs a local weights file: sgattn ships none "
                "and downloads none. Pass pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth') (the "
                "authors' .pth, or .safetensors); the README's 'Pretrained weights' says where to get them")
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"SG-Former checkpoint not found: {path!r}")
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(SGFormer, variant, pretrained, pretrained_filter_fn=_filter,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **VARIANTS[variant], **kwargs)


def register() -> None:
    """Register sgformer_s/m/b (and their default pretrained configs) with timm; idempotent."""
    global _registered, default_cfgs
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model, register_notrace_function, register_notrace_module
    from timm.models._registry import _model_entrypoints

    # torch.fx with timm's tracer settings (timm's fx feature extraction): leaves that run as they are
    # when the graph runs. The attention modules check their inputs and pick a backend in Python; the
    # position embedding compares the grid size.
    for module in (sgnn.HybridScaleAttention, sgnn.SelfGuidedAttention, sgnn.GlobalAttention):
        register_notrace_module(module)
    register_notrace_function(resample_pos_embed)

    # register_model reads the entry point's module's ``default_cfgs``
    default_cfgs = generate_default_cfgs({f"{name}.in1k": _cfg() for name in VARIANTS})

    for name in VARIANTS:
        if name in _model_entrypoints:  # registered by another copy of sgattn: keep it
            continue

        def entry(pretrained=False, _name=name, **kwargs) -> SGFormer:
            return _create(_name, pretrained=pretrained, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = __name__
        entry.__doc__ = f"{name} (sgattn): SG-Former with sgattn's attention kernels."
        globals()[name] = entry
        register_model(entry)
    _registered = True


default_cfgs: dict = {}
