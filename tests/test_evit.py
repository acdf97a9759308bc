"""examples/evit_pruning.py: the CLS row of sgattn's attention mass equals the
one from timm's eager attention matrix, so the pruned timm ViT keeps the same
tokens and gives the same logits; timm's attention output is reproduced; and
SG-Former's outputs are bitwise unchanged by importing and using the
integrations."""
import copy
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm", reason="the example prunes a timm ViT (pip install 'sgattn[timm]')")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("evit_pruning", ROOT / "examples" / "evit_pruning.py")
evit_pruning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evit_pruning)

# The mass is float64 for float64 inputs (then the two paths differ by summation order alone: measured
# 7e-16 relative) and float32 otherwise, where both sides round the softmax (measured 3e-7 relative);
# outputs against timm's own attention: measured 6e-17 (float64) and 3e-8 (float32) absolute.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _vit(dtype, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, **kw).eval().to(dtype)


def _images(dtype, batch=2):
    return torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cls_row_and_output_match_eager(dtype):
    model = _vit(dtype)
    x = model.norm_pre(model._pos_embed(model.patch_embed(_images(dtype))))
    with torch.no_grad():
        for blk in model.blocks:
            h = blk.norm1(x)
            out, cls = evit_pruning.attention_with_cls_mass(blk.attn, h)
            ref_out, ref_cls = evit_pruning.attention_with_cls_mass(blk.attn, h, eager=True)
            assert cls.shape == (x.shape[0], x.shape[1]) and cls.dtype == dtype
            torch.testing.assert_close(cls, ref_cls, **TOL[dtype])
            torch.testing.assert_close(cls.sum(-1), torch.ones(x.shape[0], dtype=dtype), rtol=0, atol=1e-5)
            torch.testing.assert_close(out, blk.attn(h), **TOL[dtype])  # timm's own attention output
            torch.testing.assert_close(ref_out, blk.attn(h), **TOL[dtype])
            x = blk(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pruned_model_matches_eager_pruning(dtype):
    layers, keep = (2, 5, 8), 0.6
    base = _vit(dtype)
    models = {eager: evit_pruning.evit(copy.deepcopy(base), layers, keep, eager=eager) for eager in (True, False)}
    x = _images(dtype)
    with torch.no_grad():
        ref, got = models[True](x), models[False](x)
    # 36 patch tokens at 96 px: ceil(0.6 * 36) = 22, ceil(0.6 * 22) = 14, ceil(0.6 * 14) = 9
    for i, n in zip(layers, (22, 14, 9)):
        kept_ref, kept = models[True].blocks[i].kept, models[False].blocks[i].kept
        assert kept.shape == (2, 1 + n)
        assert torch.equal(kept, kept_ref), f"block {i} kept different tokens"
        assert bool((kept[:, 0] == 0).all()) and bool((kept[:, 1:].diff(dim=1) > 0).all())
    torch.testing.assert_close(got, ref, **TOL[dtype])
    assert not torch.allclose(got, base(x), atol=1e-3)  # pruning changed the model


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep_rate"):
        evit_pruning.evit(_vit(torch.float32), [1], 0.0)
    with pytest.raises(ValueError, match="out of range"):
        evit_pruning.evit(_vit(torch.float32), [12], 0.5)
    with pytest.raises(ValueError, match="global_pool"):
        evit_pruning.evit(_vit(torch.float32, global_pool="avg"), [1], 0.5)
    with pytest.raises(ValueError, match="prefix token"):
        evit_pruning.evit(_vit(torch.float32, reg_tokens=4), [1], 0.5)


def test_sgformer_outputs_unchanged_by_the_integrations():
    """In a fresh process: SG-Former's logits before and after importing and
    running the EViT example and the kvpress integration are bitwise equal."""
    script = textwrap.dedent(f"""
        import importlib.util, torch, timm
        import sgattn
        torch.manual_seed(0)
        model = sgattn.models.sgformer_s(img_size=64).eval()
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = model(x)
        spec = importlib.util.spec_from_file_location("evit_pruning", {str(ROOT / "examples" / "evit_pruning.py")!r})
        evit_pruning = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(evit_pruning)
        vit = evit_pruning.evit(timm.create_model("vit_tiny_patch16_224", img_size=64).eval(), [1], 0.5)
        try:
            import sgattn.integrations.kvpress as sgkv
            sgkv.register()
        except ImportError:
            pass
        with torch.no_grad():
            vit(x)
            after = model(x)
        assert torch.equal(before, after), (before - after).abs().max()
        print("unchanged")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "unchanged" in r.stdout, r.stdout + r.stderr
