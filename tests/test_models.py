"""SG-Former models: parameter layout, checkpoints, any resolution, modules."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sgattn
from sgattn import nn as sgnn
from sgattn.models import load_checkpoint, sgformer_b, sgformer_m, sgformer_s
from sgattn.models.sgformer import sincos_pos_embed


@pytest.mark.parametrize("factory,millions", [(sgformer_s, 22.55), (sgformer_m, 38.69), (sgformer_b, 77.95)])
def test_parameter_counts(factory, millions):
    model = factory()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_state_dict_layout_of_sgformer_s():
    sd = sgformer_s().state_dict()
    assert len(sd) == 669
    assert sd["pos_embed"].shape == (1, 3136, 64)
    assert sd["patch_embed1.conv.4.c.weight"].shape == (64, 64, 3, 3)
    assert sd["patch_embed1.conv.0.bn.weight"].shape == (64,)
    assert sd["patch_embed3.conv2.c.weight"].shape == (256, 1, 3, 3)
    assert sd["block1.0.attn.sr.weight"].shape == (64, 64, 8, 8)      # hybrid-scale, sr 8
    assert sd["block1.0.attn.q1.weight"].shape == (32, 64)
    assert sd["block1.1.attn.f1.weight"].shape == (1, 196)             # self-guided, sr 8
    assert sd["block1.1.attn.f3.weight"].shape == (1, 28)
    assert sd["block2.3.attn.f3.weight"].shape == (1, 7)               # sr 4
    assert sd["block3.15.attn.f2.weight"].shape == (1, 1)              # sr 2: f1, f2 only
    assert "block3.15.attn.f3.weight" not in sd
    assert sd["block4.0.attn.kv.weight"].shape == (1024, 512)          # plain attention
    assert sd["block1.0.mlp.dwconv.dwconv.weight"].shape == (256, 1, 3, 3)
    assert sd["head.weight"].shape == (1000, 512)
    model = sgformer_s()
    assert model.block1[0].norm1.eps == 1e-6 and model.patch_embed1.norm.eps == 1e-5
    assert model.block1[0].attn.norm.eps == 1e-5


def test_sincos_position_embedding_layout():
    pe = sincos_pos_embed(8, 3)  # first half encodes x (column), second half y (row)
    xs = torch.tensor([0.0, 1.0, 2.0]).repeat(3)
    ys = torch.tensor([0.0, 1.0, 2.0]).repeat_interleave(3)
    omega = torch.tensor([1.0, 0.01])
    expected = torch.cat([torch.sin(xs[:, None] * omega), torch.cos(xs[:, None] * omega),
                          torch.sin(ys[:, None] * omega), torch.cos(ys[:, None] * omega)], dim=1)
    torch.testing.assert_close(pe, expected)


def test_attention_constructor_picks_the_kind_as_the_papers_code():
    assert isinstance(sgnn.Attention(64, False, num_heads=2, sr_ratio=8), sgnn.HybridScaleAttention)
    assert isinstance(sgnn.Attention(64, True, num_heads=2, sr_ratio=8), sgnn.SelfGuidedAttention)
    assert isinstance(sgnn.Attention(64, True, num_heads=2, sr_ratio=1), sgnn.GlobalAttention)
    assert isinstance(sgnn.Attention(64, False, num_heads=2, sr_ratio=1), sgnn.GlobalAttention)
    kinds = [type(b.attn) for b in sgformer_s().block2]
    assert kinds == [sgnn.HybridScaleAttention, sgnn.SelfGuidedAttention] * 2


def test_checkpoint_layouts_load_strictly_and_reproduce_outputs(tmp_path):
    torch.manual_seed(0)
    source = sgformer_s(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = source(x)
    state = source.state_dict()
    for layout in ({"state_dict_ema": state}, {"state_dict": state, "epoch": 3}, {"model": state},
                   {"module." + k: v for k, v in state.items()}):
        path = tmp_path / "ckpt.pth"
        torch.save(layout, path)
        model = sgformer_s(num_classes=10).eval()
        load_checkpoint(model, str(path))
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # strict: a 1000-class head does not fit
        load_checkpoint(sgformer_s(num_classes=1000), {"model": state})


def test_checkpoint_into_larger_img_size_resamples_pos_embed():
    state = sgformer_s(num_classes=10).state_dict()
    model = sgformer_s(img_size=448, num_classes=10)
    load_checkpoint(model, state)
    assert model.pos_embed.shape == (1, 112 * 112, 64)
    grid = state["pos_embed"].reshape(1, 56, 56, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(112, 112), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.pos_embed.data, expected.flatten(2).transpose(1, 2))


def test_features_only_returns_stage_maps_at_odd_resolution():
    model = sgformer_s(features_only=True, out_indices=(0, 2, 3)).eval()
    assert not hasattr(model, "head")
    load_checkpoint(model, sgformer_s().state_dict())  # the classifier is dropped
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 100, 75))
    # stem: ceil(ceil(s/2)/2); each later stage ceil(s/2)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 25, 19), (2, 256, 7, 5), (2, 512, 4, 3)]


def test_model_runs_at_minimum_size_and_rejects_smaller():
    model = sgformer_s(num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 45)).shape == (1, 3)
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 64, 64))


def test_training_step_with_drop_path_and_attention_dropout():
    model = sgformer_s(num_classes=4, drop_path_rate=0.1, attn_drop_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.block1[1].attn.f1.weight.grad.abs().sum() > 0  # reallocation is trained


class Attention(sgnn.HybridScaleAttention):
    """Stands for a module of the authors' code: named Attention, their layout."""


def test_patch_model_replaces_modules_named_attention_and_keeps_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.add_module("attn", Attention(32, num_heads=2, sr_ratio=4))
    x = torch.randn(2, 14 * 14, 32)
    expected, _ = model.attn(x, 14, 14)
    assert sgattn.patch_model(model) == 1
    assert type(model.attn) is sgnn.HybridScaleAttention
    out, _ = model.attn(x, 14, 14)
    torch.testing.assert_close(out, expected)
    assert sgattn.patch_model(model) == 0  # sgattn's own modules are left alone


def _conv_weights(model):
    """Weights of the convolutions on token maps (all but the stem's)."""
    return [m.weight for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and not name.startswith("patch_embed1.")]


def test_sgattn_model_keeps_channels_last_convolutions_and_matches_the_naive_model():
    """sgattn's model stores conv weights channels-last (the token maps' memory
    order); the naive model keeps the paper's NCHW. Same weights, same outputs
    (float64: the importance sort makes fp32 comparisons tie-sensitive), and
    the layout survives load_state_dict, dtype changes and deepcopy."""
    import copy

    from sgattn import naive

    torch.manual_seed(0)
    ref = naive.naive_sgformer("sgformer_s", strict=False, num_classes=10).double().eval()
    model = sgformer_s(num_classes=10)
    model.load_state_dict(ref.state_dict())
    model = copy.deepcopy(model.double()).eval()
    for w in _conv_weights(model):  # stride 1 on channels (also for depthwise [C, 1, k, k])
        assert w.stride(1) == 1 and w.is_contiguous(memory_format=torch.channels_last), w.shape
    assert any(w.stride(1) != 1 for w in _conv_weights(ref))
    assert all(w.is_contiguous() for w in _conv_weights(sgformer_s(channels_last=False)))
    assert all(m.weight.is_contiguous() for m in model.patch_embed1.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(2, 3, 96, 160, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-10, atol=1e-10)
    model.train()
    model(x).sum().backward()  # gradients take the parameters' layout
    for w in _conv_weights(model):
        assert w.grad is not None and w.grad.stride() == w.stride()


RESOLUTION_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from sgattn.models import sgformer_s
    torch.manual_seed(0)
    model = sgformer_s().eval()
    for h, w in [(256, 256), (384, 384), (448, 640), (800, 1344), (1024, 1024)]:
        with torch.no_grad():
            logits = model(torch.randn(1, 3, h, w))
        assert logits.shape == (1, 1000) and torch.isfinite(logits).all(), (h, w)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_sgformer_s_runs_at_high_resolution_on_cpu_within_a_few_gb():
    # The reference backend (the CPU fallback) in a fresh process, so that its
    # peak resident memory is the model's alone.
    result = subprocess.run([sys.executable, "-c", RESOLUTION_SCRIPT], capture_output=True, text=True,
                            env=dict(os.environ, SGATTN_BACKEND="reference"), timeout=900)
    assert result.returncode == 0, result.stderr
    peak_gib = int(result.stdout.split()[-1]) / 2 ** 20  # ru_maxrss is in KiB on Linux
    assert peak_gib < 3.0, f"peak resident memory {peak_gib:.2f} GiB"


def test_import_sgattn_exposes_models_without_importing_timm():
    code = "import sys, sgattn; m = sgattn.models.sgformer_s; print('timm' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"  # timm (seconds to import) is registered lazily, on its own import


def test_forward_features_is_unpooled_and_head_pools():
    model = sgformer_s(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 512, 2, 2)
        torch.testing.assert_close(model(x), model.head(feats.mean(dim=(2, 3))))
    assert model.feature_info[2] == dict(num_chs=256, reduction=16, module="norm3")


def test_checkpoint_path_keeps_everything_but_a_resized_classifier(tmp_path):
    source = sgformer_s()
    torch.save({"state_dict_ema": source.state_dict()}, tmp_path / "w.pth")
    model = sgformer_s(num_classes=10, checkpoint_path=str(tmp_path / "w.pth"))
    assert torch.equal(model.block2[1].attn.f2.weight, source.block2[1].attn.f2.weight)
    assert model.head.weight.shape == (10, 512)
    with pytest.raises(ValueError, match="checkpoint_path"):
        sgformer_s(pretrained=True)


def _public_op_calls(device, dtype):
    """Every public op once, on seeded inputs of ``dtype`` moved to ``device``."""
    g = torch.Generator().manual_seed(0)

    def R(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    B, h, H, W, d = 2, 2, 6, 9, 8
    N, C = H * W, h * d
    q, kv = R(B, h, N, d), R(B, h, N, d)
    reduced = R(B, h, 6, d)  # a 2 x 3 reduced grid
    importance = (R(B, N).float(), R(B, N).float())
    agg = dict(agg_weights=[R(2), R(1)], agg_biases=[R(1), R(1)])
    return {
        "attention_with_importance": sgattn.attention_with_importance(q, kv, kv),
        "attention_with_importance window": sgattn.attention_with_importance(q, kv, kv, window=4, hw=(H, W)),
        "attention": sgattn.ops.attention(q, reduced, reduced),
        "hybrid_scale_attention": sgattn.hybrid_scale_attention(q, reduced, reduced, q, kv, kv, hw=(H, W),
                                                                reduced_hw=(2, 3)),
        "reallocate_tokens": sgattn.reallocate_tokens(R(B, N, C), importance[0].to(dtype),
                                                      agg["agg_weights"], agg["agg_biases"]),
        "self_guided_attention": sgattn.self_guided_attention(q, R(B, N, C), importance, R(C, C), R(C), R(C, C),
                                                              None, **agg, hw=(H, W)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_public_op_infers_shapes_on_the_meta_device(dtype):
    # shape inference and model surgery under torch.device("meta") (timm's config tests do both)
    expected = _public_op_calls("cpu", dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast must leave meta tensors alone
        got = _public_op_calls("meta", dtype)
    for name, out in expected.items():
        outs, metas = (out, got[name]) if isinstance(out, tuple) else ((out,), (got[name],))
        assert [(t.shape, t.dtype) for t in metas] == [(t.shape, t.dtype) for t in outs], name
        assert all(t.is_meta for t in metas), name


def test_models_build_on_the_given_device_and_dtype():
    model = sgformer_s(device="meta", dtype=torch.float64)
    assert {(t.device.type, t.dtype) for t in model.parameters()} == {("meta", torch.float64)}
    with torch.device("meta"):
        model = sgformer_s(drop_path_rate=0.1)
    assert {t.device.type for t in model.parameters()} == {"meta"}
    torch.testing.assert_close(model.block3[15].drop_path.p, 0.1 * 21 / 22)  # the 22nd of 23 linspace rates
    model.eval().reset_classifier(7)  # the new head takes the model's device, dtype and mode
    assert model.head.weight.is_meta and not model.head.training
    assert model(torch.randn(1, 3, 64, 96, device="meta")).shape == (1, 7)
    torch.manual_seed(0)
    model = sgformer_s(num_classes=3, dtype=torch.float64).eval()
    assert model.pos_embed.dtype == torch.float64
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed(64, 56).double())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_pruning_drops_the_later_stages():
    model = sgformer_s(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_stages(x)
        assert model.prune_intermediate_layers([0, -3]) == [0, 1]
        assert not hasattr(model, "block3") and not hasattr(model, "norm4")
        assert model.num_features == model.head_hidden_size == 128
        torch.testing.assert_close(model.forward_features(x), maps[1], rtol=0, atol=0)
        final, inter = model.forward_intermediates(x, indices=1)
        assert torch.equal(final, maps[1]) and torch.equal(inter[0], maps[1])
        assert model(x).shape == (1, 128, 8, 12)  # the head (sized for stage 4) went, and pooling
        model.reset_classifier(5, "avg")
        assert model(x).shape == (1, 5)
    with pytest.raises(ValueError, match="in -2..1"):
        model.forward_intermediates(x, indices=[2])
