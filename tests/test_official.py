"""Fidelity against the authors' own code, when a copy of it is at hand.

The authors' ``sgformer.py`` (and its ``pos_embed.py``; it needs timm) is not
part of sgattn. Point SGFORMER_OFFICIAL_DIR at a folder holding them to run
these tests; they are skipped otherwise. Weights are spread (std 1/sqrt(fan_in))
and everything runs in float64, so importance ties cannot reorder the sort
(SPEC 2b notes).
"""
import os
import sys

import pytest
import torch

OFFICIAL_DIR = os.environ.get("SGFORMER_OFFICIAL_DIR")
pytestmark = pytest.mark.skipif(not OFFICIAL_DIR, reason="SGFORMER_OFFICIAL_DIR is not set")


@pytest.fixture(scope="module")
def official():
    sys.path.insert(0, OFFICIAL_DIR)
    try:
        import sgformer
    finally:
        sys.path.remove(OFFICIAL_DIR)
    return sgformer


def spread_weights(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant,img_size", [("sgformer_s", 224), ("sgformer_s", 448), ("sgformer_m", 224),
                                              ("sgformer_b", 224)])
def test_logits_and_gradients_equal_the_authors_code(official, variant, img_size):
    from sgattn import models

    theirs = getattr(official, variant)(img_size=img_size).double()
    spread_weights(theirs)
    ours = getattr(models, variant)(img_size=img_size).double()
    models.load_checkpoint(ours, {"state_dict_ema": theirs.state_dict()})
    x = torch.randn(1, 3, img_size, img_size, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = theirs(x1), ours(x2)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    ref.square().sum().backward()
    out.square().sum().backward()
    assert (x2.grad - x1.grad).abs().max() <= 1e-5 * x1.grad.abs().max()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        expected = theirs_params[name].grad
        assert (p.grad - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-30, name
