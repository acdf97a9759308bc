"""The reference ops against the specification, on small hand-checked cases."""
import math

import pytest
import torch
import torch.nn.functional as F

import sgattn
from sgattn import composition, reference

from tolerance import assert_close_to_reference


def materialised_attention(q, k, v, scale):
    """Global attention with the whole probability matrix in float64."""
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return p @ v.double(), p


def test_window_importance_of_uniform_probabilities_counts_real_keys():
    # q = 0 makes every real key of a window equally likely; a 9x9 grid in 7x7
    # windows has windows of 49, 14, 14 and 4 real tokens.
    B, h, H, W, d = 1, 2, 9, 9, 8
    q = torch.zeros(B, h, H * W, d)
    k, v = torch.randn(2, B, h, H * W, d).unbind(0)
    out, imp = reference.attention(q, k, v, window=7, hw=(H, W))
    expected = torch.empty(H, W)
    expected[:7, :7], expected[:7, 7:], expected[7:, :7], expected[7:, 7:] = 1 / 49, 1 / 14, 1 / 14, 1 / 4
    torch.testing.assert_close(imp.reshape(H, W), expected)
    # each query's output is the plain mean of its window's real values
    vg = v.reshape(B, h, H, W, d)
    torch.testing.assert_close(out.reshape(B, h, H, W, d)[:, :, 8, 8], vg[:, :, 7:, 7:].mean(dim=(2, 3)))


def test_importance_of_known_probabilities():
    # d = 1, scale 1, q = 1 and keys (0, ln 2, 0, 0): every query puts
    # probabilities (1, 2, 1, 1) / 5 on the keys, in both modes.
    q = torch.ones(1, 1, 4, 1)
    k = torch.tensor([0.0, math.log(2), 0.0, 0.0]).reshape(1, 1, 4, 1)
    v = torch.arange(4.0).reshape(1, 1, 4, 1)
    expected = torch.tensor([[0.2, 0.4, 0.2, 0.2]])
    for window, hw in ((None, None), (2, (2, 2))):
        out, imp = reference.attention(q, k, v, scale=1.0, window=window, hw=hw)
        torch.testing.assert_close(imp, expected)
        torch.testing.assert_close(out, torch.full((1, 1, 4, 1), (0 + 2 + 2 + 3) / 5))


@pytest.mark.parametrize("N,M", [(1, 1), (97, 50), (130, 1), (64, 130)])
def test_global_attention_and_importance_match_materialised(N, M):
    B, h, d = 2, 3, 16
    q, k, v = torch.randn(B, h, N, d), torch.randn(B, h, M, d), torch.randn(B, h, M, d)
    out, imp = reference.attention(q, k, v)
    ref_out, p = materialised_attention(q, k, v, d ** -0.5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.double(), p.mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(imp.sum(dim=1), torch.ones(B))  # every query's row sums to 1


def test_global_attention_chunking_changes_nothing(monkeypatch):
    q, k, v = torch.randn(2, 2, 97, 8), torch.randn(2, 2, 33, 8), torch.randn(2, 2, 33, 8)
    whole = reference.attention(q, k, v)
    monkeypatch.setattr(reference, "MAX_BLOCK_ELEMENTS", 2 * 2 * 33 * 10)  # chunks of 10 queries
    chunked = reference.attention(q, k, v)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("H,W,w", [(14, 14, 7), (9, 11, 7), (5, 3, 4), (1, 1, 7)])
def test_window_attention_matches_per_window_loop(H, W, w):
    B, h, d = 2, 2, 8
    N = H * W
    q, k, v = torch.randn(3, B, h, N, d).unbind(0)
    out, imp = reference.attention(q, k, v, window=w, hw=(H, W))
    ref_out = torch.zeros(B, h, N, d, dtype=torch.float64)
    ref_imp = torch.zeros(B, N, dtype=torch.float64)
    idx = torch.arange(N).reshape(H, W)
    for y0 in range(0, H, w):
        for x0 in range(0, W, w):
            tokens = idx[y0:y0 + w, x0:x0 + w].reshape(-1)  # real tokens of this window only
            o, p = materialised_attention(q[:, :, tokens], k[:, :, tokens], v[:, :, tokens], d ** -0.5)
            ref_out[:, :, tokens] = o
            ref_imp[:, tokens] = p.mean(dim=(1, 2))
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.double(), ref_imp, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 7])
def test_reduced_precision_within_rounding_of_fp64(dtype, window):
    B, h, H, W, d = 2, 2, 9, 10, 24
    q, k, v = (torch.randn(B, h, H * W, d).to(dtype) for _ in range(3))
    out, imp = reference.attention(q, k, v, window=window, hw=(H, W))
    out64, imp64 = reference.attention(q.double(), k.double(), v.double(), window=window, hw=(H, W))
    assert out.dtype == dtype and imp.dtype == torch.float32 and imp64.dtype == torch.float64
    # computed in fp32 from the same inputs: the final cast to dtype (one rounding)
    # plus fp32 accumulation over d and M terms (a few dozen fp32 ulps)
    bound = (torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps) * out64.abs().max()
    assert (out.double() - out64).abs().max() <= bound
    torch.testing.assert_close(imp.double(), imp64, rtol=1e-5, atol=1e-7)


def test_nearest_upsampling_takes_floor_of_scaled_coordinates():
    g = torch.arange(6.0).reshape(1, 6)  # a 2 x 3 reduced map
    up = reference.upsample_nearest(g, (2, 3), (5, 7))[0]
    for y in range(5):
        for x in range(7):
            assert up[y, x] == g[0, (y * 2 // 5) * 3 + x * 3 // 7]
    # at exact multiples every reduced token covers an sr x sr block
    up = reference.upsample_nearest(g, (2, 3), (4, 6))[0]
    torch.testing.assert_close(up, g.reshape(2, 3).repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_hybrid_importance_and_its_two_orderings():
    local = torch.arange(12.0).reshape(1, 12)  # 3 x 4 grid
    glob = torch.tensor([[100.0, 200.0]])  # 1 x 2 reduced map
    imp = reference.hybrid_importance(glob, local, (3, 4), (1, 2))
    expected = local.reshape(3, 4) + torch.tensor([100.0, 100.0, 200.0, 200.0])
    torch.testing.assert_close(imp[0], expected)
    row, col = reference.importance_orderings(imp)
    torch.testing.assert_close(row[0], expected.reshape(-1))
    torch.testing.assert_close(col[0], expected.t().reshape(-1))  # column-major: x*H + y


def test_reallocation_parts_follow_the_plan():
    assert reference.reallocation_parts(3136, 3) == [784, 1568, 784]
    assert reference.reallocation_parts(10, 3) == [2, 4, 4]
    assert reference.reallocation_parts(196, 2) == [98, 98]
    assert reference.reallocation_parts(7, 2) == [3, 4]
    # K/V token counts of the SPEC table at 224
    assert reference.reallocated_length(3136, composition.REALLOCATION_GROUPS[8]) == 60
    assert reference.reallocated_length(784, composition.REALLOCATION_GROUPS[4]) == 60
    assert reference.reallocated_length(196, composition.REALLOCATION_GROUPS[2]) == 147


def test_hand_sorted_reallocation():
    # 8 tokens of 2 channels; three parts of 2, 4 and 2 sorted tokens, groups of 2, 2, 1.
    x = torch.arange(16.0).reshape(1, 8, 2)  # token i = (2i, 2i+1)
    importance = torch.tensor([[5.0, 0.5, 7.0, 1.0, 3.0, 2.0, 6.0, 4.0]])
    # ascending order of importance: tokens 1, 3, 5, 4, 7, 0, 6, 2
    w = [torch.tensor([1.0, 10.0]), torch.tensor([1.0, -1.0]), torch.tensor([2.0])]
    b = [torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([-1.0])]
    out = reference.reallocate_tokens(x, importance, w, b)
    t = x[0]
    expected = torch.stack([
        1 * t[1] + 10 * t[3] + 0.5,   # part 1: tokens 1, 3
        t[5] - t[4], t[7] - t[0],     # part 2: groups (5, 4), (7, 0)
        2 * t[6] - 1, 2 * t[2] - 1,   # part 3: tokens 6, 2
    ])
    torch.testing.assert_close(out[0], expected)


def test_remainder_rule_counts_missing_group_members_as_zero():
    # N = 9 in halves [4, 5] with groups of 3 and 2: ceil(4/3) = 2 and ceil(5/2) = 3 groups.
    x = torch.randn(2, 9, 5)
    importance = torch.arange(9.0).flip(0).expand(2, 9)  # token 8 least important
    w = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]
    b = [torch.tensor([0.25]), torch.tensor([-0.5])]
    out = reference.reallocate_tokens(x, importance, w, b)
    s = x.flip(1)  # sorted order
    expected = torch.stack([
        s[:, 0] + 2 * s[:, 1] + 3 * s[:, 2] + 0.25,
        s[:, 3] + 0.25,  # members 2 and 3 of the group are missing
        4 * s[:, 4] + 5 * s[:, 5] - 0.5,
        4 * s[:, 6] + 5 * s[:, 7] - 0.5,
        4 * s[:, 8] - 0.5,
    ], dim=1)
    torch.testing.assert_close(out, expected)


def test_sort_is_stable_and_column_major_ties_follow_column_order():
    H, W = 2, 3
    imp = torch.zeros(1, H * W)  # all tied
    row, col = reference.importance_orderings(imp.reshape(1, H, W))
    index = reference.self_guided_index((row, col), (H, W))
    assert index[0, 0].tolist() == [0, 1, 2, 3, 4, 5]  # row-major token order
    assert index[1, 0].tolist() == [0, 3, 1, 4, 2, 5]  # column-major token order, as row-major rows
    # distinct values: both orderings select the same token sequence
    imp = torch.randn(2, H, W)
    index = reference.self_guided_index(reference.importance_orderings(imp), (H, W))
    assert torch.equal(index[0], index[1])
    assert torch.equal(index, reference.self_guided_index(imp.reshape(2, -1), (H, W)))


def test_self_guided_attention_matches_explicit_composition():
    B, h, H, W, d = 2, 4, 7, 9, 8
    C, N = h * d, H * W
    g = torch.Generator().manual_seed(184)
    q, x = torch.randn(B, h, N, d, generator=g), torch.randn(B, N, C, generator=g)
    imp = torch.rand(B, H, W, generator=g)
    kv = [(torch.randn(C, C, generator=g) * C ** -0.5, torch.randn(C, generator=g)) for _ in range(2)]
    groups = composition.REALLOCATION_GROUPS[4]
    w = [torch.randn(r, generator=g) for r in groups]
    b = [torch.randn(1, generator=g) for _ in groups]
    out = sgattn.self_guided_attention(q, x, reference.importance_orderings(imp), *kv[0], *kv[1], w, b, hw=(H, W))

    def composed(dtype):
        """Reallocate rows and columns, project to K/V, attend: all in dtype."""
        q_, x_ = q.to(dtype), x.to(dtype)
        w_, b_ = [t.to(dtype) for t in w], [t.to(dtype) for t in b]
        seq1 = reference.reallocate_tokens(x_, imp.reshape(B, N), w_, b_)
        x_col = x_.reshape(B, H, W, C).transpose(1, 2).reshape(B, N, C)
        seq2 = reference.reallocate_tokens(x_col, imp.transpose(1, 2).reshape(B, N), w_, b_)
        M = seq1.shape[1]
        (k1, v1), (k2, v2) = (F.linear(s, wt.to(dtype), bt.to(dtype)).reshape(B, M, 2, h // 2, d)
                              .permute(2, 0, 3, 1, 4) for s, (wt, bt) in zip((seq1, seq2), kv))
        k_, v_ = torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)
        return torch.softmax(q_ @ k_.transpose(-1, -2) * d ** -0.5, dim=-1) @ v_

    assert out.dtype == torch.float32
    assert_close_to_reference(out, composed(torch.float32), composed(torch.float64))


def test_gradients_flow_into_tokens_and_aggregators_but_not_importance():
    B, N, C = 2, 13, 4
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    imp = torch.rand(B, N, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(r, dtype=torch.float64, requires_grad=True) for r in (3, 2, 1)]
    b = [torch.randn(1, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    torch.autograd.gradcheck(lambda x, *p: reference.reallocate_tokens(x, imp, p[:3], p[3:]), (x, *w, *b))
    reference.reallocate_tokens(x, imp, w, b).sum().backward()
    assert imp.grad is None


def test_attention_gradients_and_dropout_semantics():
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda q, k, v: reference.attention(q, k, v, window=3, hw=(2, 5))[0], (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: reference.attention(q, k, v)[0], (q, k, v))
    # dropout: importance averages the dropped (and rescaled) probabilities, as the paper's code does
    torch.manual_seed(1)
    out, imp = reference.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    p = F.dropout(torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1), 0.5, training=True)
    torch.testing.assert_close(out, p @ v)
    torch.testing.assert_close(imp, p.detach().mean(dim=(1, 2)))


def test_public_ops_use_the_reference_backend_on_cpu():
    q, k, v = torch.randn(3, 1, 2, 12, 8).unbind(0)
    with sgattn.use_backend("reference"):
        out, imp = sgattn.attention_with_importance(q, k, v)
    ref = reference.attention(q, k, v)
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(imp, ref[1])
    assert sgattn.available_backends()["reference"] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tolerance_rule_accepts_reference_and_rejects_garbage(dtype):
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    ref64 = reference.attention(q.double(), k.double(), v.double())[0]
    ref_t = reference.attention(q.to(dtype), k.to(dtype), v.to(dtype))[0]
    assert_close_to_reference(ref_t, ref_t, ref64)
    with pytest.raises(AssertionError):
        assert_close_to_reference(ref_t + 0.1, ref_t, ref64)


# ------------------------------------------------ sgattn.composition against the oracle
# The backends compose through sgattn.composition; the reference keeps its own definitions.
# Same operations in the same order, so equal bits.


def test_composition_plan_matches_the_reference():
    for n in (1, 2, 3, 7, 10, 49, 196, 197, 3136):
        for parts in (2, 3):
            assert composition.reallocation_parts(n, parts) == reference.reallocation_parts(n, parts)
        for groups in (*composition.REALLOCATION_GROUPS.values(), (7, 3, 2), (5, 1)):
            assert composition.reallocated_length(n, groups) == reference.reallocated_length(n, groups)
    with pytest.raises(ValueError, match="2 or 3 parts"):
        composition.reallocation_parts(10, 4)


@pytest.mark.parametrize("H,W,w", [(9, 11, 7), (3, 4, 7), (2, 20, 5), (20, 2, 50), (1, 1, 7)])
def test_clipped_window_gives_the_reference_windows(H, W, w):
    clipped = composition.clip_window(w, (H, W))
    assert clipped <= max(H, W)
    assert reference.window_shape(clipped, (H, W)) == reference.window_shape(w, (H, W))
    assert composition.clip_window(None, (H, W)) is None


def test_composition_orderings_and_importance_match_the_reference():
    g = torch.Generator().manual_seed(17)
    H, W, Hr, Wr = 5, 7, 2, 3
    local, glob = torch.rand(2, H * W, generator=g), torch.rand(2, Hr * Wr, generator=g)
    imp = composition.hybrid_importance(glob, local, (H, W), (Hr, Wr))
    assert torch.equal(imp, reference.hybrid_importance(glob, local, (H, W), (Hr, Wr)))
    orderings = composition.importance_orderings(imp)
    for a, b in zip(orderings, reference.importance_orderings(imp)):
        assert torch.equal(a, b)
    tied = torch.zeros(2, H * W)  # ties: stable order in both orderings
    for importance in (orderings, imp.reshape(2, -1), tied, (tied, tied)):
        assert torch.equal(composition.self_guided_index(importance, (H, W)),
                           reference.self_guided_index(importance, (H, W)))
    assert torch.equal(composition.sort_index(local), reference.sort_index(local))


def test_composed_self_guided_attention_is_the_reference():
    # aggregate -> composition.reallocated_kv -> attention, with the reference's primitives
    B, h, H, W, d = 2, 4, 6, 5, 8
    C, N = h * d, H * W
    g = torch.Generator().manual_seed(29)
    q, x = torch.randn(B, h, N, d, generator=g), torch.randn(B, N, C, generator=g)
    imp = composition.importance_orderings(torch.rand(B, H, W, generator=g))
    kv = [torch.randn(C, C, generator=g), torch.randn(C, generator=g), torch.randn(C, C, generator=g), None]
    w = [torch.randn(r, generator=g) for r in (2, 1)]
    b = [torch.randn(1, generator=g) for _ in range(2)]
    seq = reference.aggregate_sorted(x, composition.self_guided_index(imp, (H, W)), w, b)
    k, v = composition.reallocated_kv(seq, *kv, heads=h)
    assert k.shape == v.shape == (B, h, seq.shape[2], d)
    out = reference.attention(q, k, v, need_importance=False)[0]
    assert torch.equal(out, reference.self_guided_attention(q, x, imp, *kv, w, b, hw=(H, W)))
