"""Bad input raises a clear exception naming the problem: the public ops'
own arguments (options, layouts, importance, modules). The bad tensor
arguments they share with the registered ops of every backend are the table
of tests/test_contract.py."""
import pytest
import torch

import sgattn
from sgattn import nn as sgnn

R = torch.randn


def attn_args(**over):
    args = dict(q=R(1, 2, 12, 8), k=R(1, 2, 12, 8), v=R(1, 2, 12, 8))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(k=R(1, 3, 12, 8)), "k must be"),
    (dict(q=R(1, 2, 12, 8, device="meta")), "device mismatch"),
    (dict(q=[[1.0]]), "must be a torch.Tensor"),
])
def test_attention_rejects_bad_tensors(over, match):
    with pytest.raises(ValueError, match=match):
        sgattn.attention_with_importance(**attn_args(**over))


def test_window_mode_needs_a_grid():
    with pytest.raises(ValueError, match="hw must be a pair"):
        sgattn.attention_with_importance(**attn_args(), window=7)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        sgattn.attention_with_importance(**attn_args(), window=0, hw=(3, 4))


def test_hybrid_scale_attention_checks_the_reduced_grid():
    q, kv = R(1, 1, 16, 8), R(1, 1, 4, 8)
    local = R(1, 1, 16, 8)
    with pytest.raises(ValueError, match="number of global keys M = 4"):
        sgattn.hybrid_scale_attention(q, kv, kv, local, local, local, hw=(4, 4), reduced_hw=(1, 3))


def realloc_args(**over):
    args = dict(x=R(2, 10, 4), importance=R(2, 10), weights=[R(2), R(1)], biases=[R(1), R(1)])
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(importance=R(2, 9)), "importance must be \\[B, N\\]"),
    (dict(weights=[R(2)], biases=[R(1)]), "need 2 or 3 parts"),
    (dict(biases=[R(2), R(1)]), "bias one element"),
    (dict(importance=torch.tensor([[0.0] * 9 + [float("nan")]] * 2)), "NaN or infinite"),
])
def test_reallocation_rejects_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        sgattn.reallocate_tokens(**realloc_args(**over))


def sga_args(**over):
    C = 16
    args = dict(q=R(1, 4, 12, 4), x=R(1, 12, C), importance=R(1, 12), kv1_weight=R(C, C), kv1_bias=R(C),
                kv2_weight=R(C, C), kv2_bias=None, agg_weights=[R(2), R(1)], agg_biases=[R(1), R(1)], hw=(3, 4))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(q=R(1, 3, 12, 4), x=R(1, 12, 12), kv1_weight=R(12, 12), kv1_bias=R(12), kv2_weight=R(12, 12)),
     "number of heads must be even"),
    (dict(x=R(1, 12, 15)), "x must be \\[B, N, h\\*d\\]"),
    (dict(hw=(4, 4)), "does not match N = 12"),
    (dict(kv1_weight=R(16, 8)), "kv1 weight must be"),
    (dict(importance=R(1, 11)), "importance\\[0\\] must be \\[1, 12\\] or \\[1, 3, 4\\]"),
    (dict(importance=(R(1, 12), torch.full((1, 12), float("inf")))), "importance\\[1\\] contains NaN"),
])
def test_self_guided_attention_rejects_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        sgattn.self_guided_attention(**sga_args(**over))


def test_modules_reject_bad_configuration_and_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        sgnn.Attention(30, False, num_heads=4, sr_ratio=2)
    with pytest.raises(ValueError, match="num_heads 3 is odd"):
        sgnn.Attention(48, False, num_heads=3, sr_ratio=2)
    with pytest.raises(ValueError, match="sr_ratio in"):
        sgnn.Attention(48, True, num_heads=2, sr_ratio=3)
    hsa = sgnn.Attention(32, False, num_heads=2, sr_ratio=2)
    with pytest.raises(ValueError, match="does not match N = 16"):
        hsa(R(1, 16, 32), 3, 5, None)
    with pytest.raises(ValueError, match="x has 16 channels"):
        hsa(R(1, 16, 16), 4, 4, None)
    with pytest.raises(ValueError, match="takes mask=None"):
        hsa(R(1, 16, 32), 4, 4, [R(1, 16), R(1, 16)])
    sga = sgnn.Attention(32, True, num_heads=2, sr_ratio=2)
    with pytest.raises(ValueError, match="needs the importance orderings"):
        sga(R(1, 16, 32), 4, 4, None)


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="unknown sgattn backend 'nope'"):
        with sgattn.use_backend("nope"):
            pass
    status = sgattn.available_backends()
    assert status["reference"] is None
    assert set(status) >= {"reference", "triton", "cuda", "cpu"}
    assert all(reason is None or isinstance(reason, str) and reason for reason in status.values())


@pytest.mark.parametrize("call,match", [
    (lambda: sgattn.attention_with_importance(**attn_args(), window=3.5, hw=(3, 4)), "window must be an int"),
    (lambda: sgattn.attention_with_importance(**attn_args(), window=True, hw=(3, 4)), "window must be an int"),
    (lambda: sgattn.attention_with_importance(**attn_args(), window=3, hw=(3.0, 4)), "hw must be a pair"),
    (lambda: sgattn.attention_with_importance(**attn_args(), dropout_p=-0.1), "dropout_p must be a probability"),
    (lambda: sgattn.attention_with_importance(**attn_args(), dropout_p=1.5), "dropout_p must be a probability"),
    (lambda: sgattn.attention_with_importance(**attn_args(), scale="0.1"), "scale must be finite"),
    # a [B, W, H] map has the right number of values but the wrong layout
    (lambda: sgattn.self_guided_attention(**sga_args(importance=R(1, 4, 3))), "importance\\[0\\] must be"),
    (lambda: sgattn.self_guided_attention(**sga_args(importance=(R(1, 3, 4), R(1, 3, 4)))),
     "importance\\[0\\] must be \\[1, 12\\] on"),
    (lambda: sgattn.self_guided_attention(**sga_args(importance=R(1, 12).int())), "floating-point"),
    (lambda: sgattn.self_guided_attention(**sga_args(importance=[R(1, 12)] * 3)), "importance must be a tensor or"),
    (lambda: sgattn.reallocate_tokens(**realloc_args(weights=(R(2), "w"))), "must be a torch.Tensor"),
])
def test_options_and_layouts_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_importance_check_survives_compilation():
    # Under torch.compile the finiteness check is a device-side assert (no host sync): still an error.
    fn = torch.compile(lambda x, imp: sgattn.reallocate_tokens(x, imp, [R(2), R(1)], [R(1), R(1)]),
                       backend="aot_eager", fullgraph=True)
    x, imp = R(2, 10, 4), R(2, 10)
    assert fn(x, imp).shape == (2, 8, 4)
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        fn(x, imp.masked_fill(imp > 0, float("nan")))


def test_window_larger_than_the_grid_covers_it_whole():
    q, k, v = R(1, 2, 12, 8), R(1, 2, 12, 8), R(1, 2, 12, 8)
    ref = sgattn.attention_with_importance(q, k, v, window=4, hw=(3, 4))
    for backend in ("reference", None):  # the oracle, and what automatic dispatch picks
        with sgattn.use_backend(backend):
            for window in (5, 10 ** 6, 2 ** 40):
                out = sgattn.attention_with_importance(q, k, v, window=window, hw=(3, 4))
                for a, b in zip(out, ref):
                    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_empty_batch_gives_empty_results(backend):
    with sgattn.use_backend(backend):
        out, imp = sgattn.attention_with_importance(R(0, 2, 12, 8), R(0, 2, 5, 8), R(0, 2, 5, 8))
        assert out.shape == (0, 2, 12, 8) and imp.shape == (0, 5)
        out, imp = sgattn.attention_with_importance(R(0, 2, 12, 8), R(0, 2, 12, 8), R(0, 2, 12, 8),
                                                    window=7, hw=(3, 4))
        assert out.shape == (0, 2, 12, 8) and imp.shape == (0, 12)
        assert sgattn.reallocate_tokens(R(0, 10, 4), R(0, 10), [R(2), R(1)], [R(1), R(1)]).shape == (0, 8, 4)
        args = sga_args(q=R(0, 4, 12, 4), x=R(0, 12, 16), importance=R(0, 12))
        assert sgattn.self_guided_attention(**args).shape == (0, 4, 12, 4)


def test_models_accept_an_empty_batch():
    from sgattn.models import sgformer_s
    model = sgformer_s(num_classes=10)
    x = torch.empty(0, 3, 64, 64, requires_grad=True)
    logits = model(x)
    assert logits.shape == (0, 10)
    logits.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_models_reject_integer_images(dtype):
    from sgattn.demo import tiny_sgformer
    images = torch.zeros(1, 3, 64, 64, dtype=dtype)
    with pytest.raises(ValueError, match=f"floating-point images .* got {dtype}"):
        tiny_sgformer()(images)
