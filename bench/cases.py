"""Benchmark cases: named shape sets, inputs, the implementations timed
(sgattn backends as candidates; naive, torch.compile(naive), the best
composition of PyTorch primitives and FlexAttention as baselines), and the
FLOP / minimal-byte counts of every case.

Shape sets (``SGATTN_BENCH_SHAPES``, default ``full`` on a GPU, ``cpu`` on a CPU):
- ``full``: every stage of SG-Former S/M and B at 224 (batch 64), 512 (batch 8),
  1024x1024 and 800x1344 (batch 2); S and M share their per-stage shapes, so the
  op suites list them once as "S/M"; whole models S, M, B.
- ``cpu``: S stages at 224 batch 2 and 1024x1024 batch 1 (forward only);
  sgformer_s at 224 (batch 2, inference and training), 896x896 (batch 1,
  inference) and 512x512 (batch 1, training).
- ``headline``: what a short GPU session times: the S stage-1 ops (the most
  tokens) at 224 (batch 64) and 1024x1024 (batch 2), and sgformer_s at both.
- ``smoke``: tiny shapes that exercise every code path in seconds (CI).

``mass_shapes`` gives the attention-mass cases (bench/test_mass.py) of the same
set names: prefill L = 1k..16k on a CPU (1k..64k on a GPU), SnapKV windows
32/64/128, decode steps Lq = 1 and 16 against Lk up to 128k.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

import sgattn
from sgattn import naive
from sgattn.models.sgformer import SR_RATIOS, VARIANTS

WINDOW = 7
OP_VARIANTS = {"S/M": "sgformer_s", "B": "sgformer_b"}
RESOLUTIONS = {"224": ((224, 224), 64), "512": ((512, 512), 8), "1024": ((1024, 1024), 2),
               "800x1344": ((800, 1344), 2)}


def stage_grid(res, stage):
    """Token grid of stage ``stage`` (1..4) for an input of ``res`` = (H, W):
    stride-4 stem (two stride-2 convs, padding 1), then a stride-2 conv per stage."""
    h, w = res
    for _ in range(2):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    for _ in range(stage - 1):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return h, w


def op_shape(variant_label, res_label, stage, batch=None, res=None):
    variant = OP_VARIANTS.get(variant_label, variant_label)
    res, default_batch = (res, batch) if res is not None else RESOLUTIONS[res_label]
    cfg = VARIANTS[variant]
    return {"variant": variant_label, "stage": stage, "res_label": res_label, "resolution": list(res),
            "batch": batch or default_batch, "grid": list(stage_grid(res, stage)),
            "dim": cfg["embed_dims"][stage - 1], "heads": cfg["num_heads"][stage - 1], "sr": SR_RATIOS[stage - 1]}


def shape_set(name=None, device_type="cpu"):
    """{"ops": [op shapes of stages 1-3], "stage4": [...], "models": [...]} for a named set."""
    name = name or os.environ.get("SGATTN_BENCH_SHAPES") or ("full" if device_type == "cuda" else "cpu")
    if name == "smoke":
        ops = [op_shape("S/M", "smoke", s, batch=1, res=(112, 112)) for s in (1, 3)]
        return {"name": name, "ops": ops, "stage4": [op_shape("S/M", "smoke", 4, batch=1, res=(112, 112))],
                "models": [{"variant": "sgformer_s", "res_label": "112", "resolution": [112, 112], "batch": 1}]}
    if name == "cpu":
        ops = [op_shape("S/M", "224", s, batch=2) for s in (1, 2, 3)]
        ops += [dict(op_shape("S/M", "1024", s, batch=1), modes=["fwd"]) for s in (1, 2, 3)]
        st4 = [op_shape("S/M", "224", 4, batch=2), dict(op_shape("S/M", "1024", 4, batch=1), modes=["fwd"])]
        models = [{"variant": "sgformer_s", "res_label": "224", "resolution": [224, 224], "batch": 2},
                  {"variant": "sgformer_s", "res_label": "896", "resolution": [896, 896], "batch": 1,
                   "modes": ["infer"]},
                  {"variant": "sgformer_s", "res_label": "512", "resolution": [512, 512], "batch": 1,
                   "modes": ["train"]}]
        return {"name": name, "ops": ops, "stage4": st4, "models": models}
    if name == "headline":
        res_labels = ("224", "1024")
        return {"name": name, "ops": [op_shape("S/M", r, 1) for r in res_labels], "stage4": [],
                "models": [{"variant": "sgformer_s", "res_label": r, "resolution": list(RESOLUTIONS[r][0]),
                            "batch": RESOLUTIONS[r][1]} for r in res_labels]}
    if name == "full":
        ops, st4, models = [], [], []
        for res_label in RESOLUTIONS:
            for v in OP_VARIANTS:
                ops += [op_shape(v, res_label, s) for s in (1, 2, 3)]
                st4.append(op_shape(v, res_label, 4))
            for variant in VARIANTS:
                (res, batch) = RESOLUTIONS[res_label]
                models.append({"variant": variant, "res_label": res_label, "resolution": list(res), "batch": batch})
        return {"name": name, "ops": ops, "stage4": st4, "models": models}
    raise ValueError(f"unknown SGATTN_BENCH_SHAPES {name!r}: use smoke, cpu, headline or full")


def case_id(shape):
    if "stage" in shape:
        return f"{shape['variant']}-s{shape['stage']}-{shape['res_label']}-b{shape['batch']}"
    return f"{shape['variant']}-{shape['res_label']}-b{shape['batch']}"


def priority(suite, shape, models_first=False):
    """Lower runs first (the issue's target cases first, then by cost; on a
    CPU the issue's targets are whole-model ones: ``models_first``)."""
    res = shape.get("res_label")
    target = (shape.get("variant") in ("S/M", "sgformer_s") and res in ("224", "1024", "112")
              and shape.get("stage", 1) in (1, 2, 3, 4))
    if suite == "model":
        target = shape["variant"] == "sgformer_s" and res in ("224", "112", "1024", "896", "512")
    order = {"224": 0, "112": 0, "smoke": 0, "1024": 1, "896": 1, "512": 2, "800x1344": 3}.get(res, 4)
    if models_first and suite == "model" and target:
        return (-1, order, 0, 0)
    return (0 if target else 1, order, 1 if suite == "model" else 0, shape.get("stage", 0))


# ---------------------------------------------------------------- inputs ----

def work_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def hybrid_inputs(shape, device, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, (H, W), C, h, sr = shape["batch"], shape["grid"], shape["dim"], shape["heads"], shape["sr"]
    d, half, N = C // h, h // 2, H * W
    Hr, Wr = H // sr, W // sr
    dt = work_dtype(device)

    def t(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt).requires_grad_(requires_grad)

    args = (t(B, half, N, d), t(B, half, Hr * Wr, d), t(B, half, Hr * Wr, d),
            t(B, half, N, d), t(B, half, N, d), t(B, half, N, d))
    return args, {"hw": (H, W), "reduced_hw": (Hr, Wr)}


def self_guided_inputs(shape, device, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, (H, W), C, h, sr = shape["batch"], shape["grid"], shape["dim"], shape["heads"], shape["sr"]
    d, N = C // h, H * W
    dt = work_dtype(device)

    def t(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device=device, dtype=dt).requires_grad_(requires_grad)

    imp = torch.rand(B, H, W, generator=g).to(device)  # distinct values: no sort ties
    pair = (imp.reshape(B, N), imp.transpose(1, 2).reshape(B, N))
    groups = naive.GROUP_SIZES[sr]
    args = (t(B, h, N, d), t(B, N, C), pair, t(C, C, scale=C ** -0.5), t(C), t(C, C, scale=C ** -0.5), t(C),
            [t(r, scale=r ** -0.5) for r in groups], [t(1) for _ in groups])
    return args, {"hw": (H, W)}


def plain_inputs(shape, device, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, (H, W), C, h = shape["batch"], shape["grid"], shape["dim"], shape["heads"]
    dt = work_dtype(device)
    q, k, v = (torch.randn(B, h, H * W, C // h, generator=g).to(device=device, dtype=dt).requires_grad_(requires_grad)
               for _ in range(3))
    return (q, k, v), {}


def differentiable(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += differentiable(a)
    return out


# ------------------------------------------------------------ baselines ----

def colsum_importance(q, k, scale, max_block=1 << 26):
    """Exact mean received probability per key [B, M], in query chunks
    (softmax of a chunk of scores, summed over heads and queries)."""
    B, h, N, _ = q.shape
    M = k.shape[2]
    chunk = max(1, max_block // max(1, B * h * M))
    acc = torch.zeros(B, M, device=q.device, dtype=torch.float32)
    for s in range(0, N, chunk):
        p = torch.softmax((q[:, :, s:s + chunk] @ k.transpose(-1, -2)).float() * scale, dim=-1)
        acc += p.sum(dim=(1, 2))
    return acc / (h * N)


def _window_layout(H, W):
    Hp, Wp = -(-H // WINDOW) * WINDOW, -(-W // WINDOW) * WINDOW
    return Hp, Wp


def _partition(t, H, W):
    return naive._to_windows(t, H, W, *_window_layout(H, W))


def _unpartition(t, H, W):
    return naive._from_windows(t, H, W, *_window_layout(H, W))


def _window_real(H, W, device):
    Hp, Wp = _window_layout(H, W)
    ones = torch.ones(1, 1, H * W, 1, device=device)
    return naive._to_windows(ones, H, W, Hp, Wp)[0, 0, :, :, 0] > 0  # [nW, 49]


def window_importance(q, k, hw, scale, real):
    """Exact local importance [B, H, W] from the windows' probabilities
    (materialised 49x49 per window, padded keys masked, padded queries excluded)."""
    H, W = hw
    qw, kw = _partition(q, H, W), _partition(k, H, W)
    s = (qw @ kw.transpose(-1, -2)).float() * scale
    if not bool(real.all()):
        s = s.masked_fill(~real[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    keep = real.float()
    imp = torch.einsum("bhwqk,wq->bwk", p, keep) / (q.shape[1] * keep.sum(1))[None, :, None]
    return _unpartition(imp[:, None, :, :, None], H, W).reshape(q.shape[0], H, W)


def sdpa_window(q, k, v, hw, scale, real):
    H, W = hw
    B, h, N, d = q.shape
    qw, kw, vw = (_partition(t, H, W) for t in (q, k, v))  # [B, h, nW, 49, d]
    nW = qw.shape[2]
    mask = None
    if not bool(real.all()):
        mask = real[None, :, None, :].expand(B * h, nW, WINDOW * WINDOW, WINDOW * WINDOW)
    o = F.scaled_dot_product_attention(qw.reshape(B * h, nW, -1, d), kw.reshape(B * h, nW, -1, d),
                                       vw.reshape(B * h, nW, -1, d), attn_mask=mask, scale=scale)
    return _unpartition(o.reshape(B, h, nW, -1, d), H, W)


def hybrid_sdpa(q_g, k_g, v_g, q_l, k_l, v_l, *, hw, reduced_hw, scale=None):
    """Best composition of PyTorch primitives: SDPA for both halves (windows
    cut by reshapes), exact importance computed separately."""
    scale = scale or q_g.shape[-1] ** -0.5
    real = _window_real(*hw, q_g.device)
    out_g = F.scaled_dot_product_attention(q_g, k_g, v_g, scale=scale)
    out_l = sdpa_window(q_l, k_l, v_l, hw, scale, real)
    with torch.no_grad():
        imp_g = colsum_importance(q_g, k_g, scale)
        imp = window_importance(q_l, k_l, hw, scale, real)
        imp = imp + F.interpolate(imp_g.reshape(-1, 1, *reduced_hw), size=tuple(hw), mode="nearest")[:, 0]
    return torch.cat([out_g, out_l], dim=1), imp


_flex = None


def flex_available(device):
    if device.type != "cuda":
        return "FlexAttention needs torch.compile on a GPU here (CPU flex is not a performance path)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as exc:
        return f"torch.nn.attention.flex_attention not importable: {exc}"
    return None


def hybrid_flex(q_g, k_g, v_g, q_l, k_l, v_l, *, hw, reduced_hw, scale=None, _masks={}):
    """SDPA for the global half, FlexAttention (compiled) for the window half
    on window-major tokens with a block-diagonal window mask; exact importance
    computed separately."""
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex is None:
        _flex = compiled(flex_attention)
    scale = scale or q_g.shape[-1] ** -0.5
    H, W = hw
    B, h, N, d = q_l.shape
    real = _window_real(H, W, q_g.device)
    L = WINDOW * WINDOW
    nW = real.shape[0]
    key = (B, h, nW, str(q_l.device))
    if key not in _masks:
        real_flat = real.reshape(-1)

        def mask_mod(b, hh, qi, ki):
            return (qi // L == ki // L) & real_flat[ki]

        _masks[key] = create_block_mask(mask_mod, None, None, nW * L, nW * L, device=q_l.device)
    qw, kw, vw = (_partition(t, H, W).reshape(B, h, nW * L, d) for t in (q_l, k_l, v_l))
    o = _flex(qw, kw, vw, block_mask=_masks[key], scale=scale)
    out_l = _unpartition(o.reshape(B, h, nW, L, d), H, W)
    out_g = F.scaled_dot_product_attention(q_g, k_g, v_g, scale=scale)
    with torch.no_grad():
        imp_g = colsum_importance(q_g, k_g, scale)
        imp = window_importance(q_l, k_l, hw, scale, real)
        imp = imp + F.interpolate(imp_g.reshape(-1, 1, *reduced_hw), size=tuple(hw), mode="nearest")[:, 0]
    return torch.cat([out_g, out_l], dim=1), imp


def reallocate_composed(x, order, weights, biases):
    """sort + one gather + per-part grouped einsum (short last group zero-padded)."""
    B, N, C = x.shape
    idx = torch.sort(order, dim=1, stable=True).indices
    t = torch.gather(x, 1, idx.unsqueeze(-1).expand(B, N, C))
    outs, start = [], 0
    for n_p, w, b in zip(naive._part_sizes(N, len(weights)), weights, biases):
        r = w.numel()
        part = t[:, start:start + n_p]
        start += n_p
        g = -(-n_p // r)
        if g * r != n_p:
            part = F.pad(part, (0, 0, 0, g * r - n_p))
        outs.append(torch.einsum("bgrc,r->bgc", part.reshape(B, g, r, C), w) + b)
    return torch.cat(outs, dim=1)


def self_guided_sdpa(q, x, importance, kv1_w, kv1_b, kv2_w, kv2_b, agg_w, agg_b, *, hw, scale=None):
    B, h, N, d = q.shape
    H, W = hw
    C = x.shape[-1]
    row, col = importance
    seq1 = reallocate_composed(x, row, agg_w, agg_b)
    x_t = x.reshape(B, H, W, C).transpose(1, 2).reshape(B, N, C)
    seq2 = reallocate_composed(x_t, col, agg_w, agg_b)
    kv1 = F.linear(seq1, kv1_w, kv1_b).reshape(B, -1, 2, h // 2, d)
    kv2 = F.linear(seq2, kv2_w, kv2_b).reshape(B, -1, 2, h // 2, d)
    kv = torch.cat([kv1, kv2], dim=3).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, kv[0], kv[1], scale=scale or d ** -0.5)


def naive_hybrid(*args, **kw):
    return naive.hybrid_scale_attention(*args, strict=False, **kw)


def naive_self_guided(*args, **kw):
    return naive.self_guided_attention(*args, strict=False, **kw)


def naive_plain(q, k, v):
    return naive.attention(q, k, v, q.shape[-1] ** -0.5)[0]


def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


_compiled: dict = {}


def compiled(fn):
    if fn not in _compiled:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 512)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 4096)
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def sgattn_backends(device):
    """sgattn backends that can run on ``device`` (the interpreted Triton
    backend is no performance path on a CPU and is left out there)."""
    names = [n for n, why in sgattn.available_backends().items() if why is None]
    if device.type != "cuda":
        names = [n for n in names if n != "triton"]
    return names


def with_backend(name, fn):
    def run(*args, **kw):
        with sgattn.use_backend(name):
            return fn(*args, **kw)
    return run


def op_impls(suite, device):
    """{impl name: (callable or None, reason it cannot run)} for an op suite."""
    gpu = device.type == "cuda"
    no_gpu = "torch.compile baselines are timed on GPU only"
    if suite == "hybrid":
        impls = {f"sgattn:{b}": (with_backend(b, sgattn.hybrid_scale_attention), None) for b in sgattn_backends(device)}
        impls["naive"] = (naive_hybrid, None)
        impls["compile(naive)"] = (compiled(naive_hybrid), None) if gpu else (None, no_gpu)
        impls["sdpa+colsum"] = (hybrid_sdpa, None)
        why = flex_available(device)
        impls["flex+colsum"] = (hybrid_flex, None) if why is None else (None, why)
    elif suite == "self_guided":
        impls = {f"sgattn:{b}": (with_backend(b, sgattn.self_guided_attention), None) for b in sgattn_backends(device)}
        impls["naive"] = (naive_self_guided, None)
        impls["compile(naive)"] = (compiled(naive_self_guided), None) if gpu else (None, no_gpu)
        impls["sdpa+colsum"] = (self_guided_sdpa, None)
    elif suite == "stage4":
        from sgattn import ops
        impls = {f"sgattn:{b}": (with_backend(b, ops.attention), None) for b in sgattn_backends(device)}
        impls["naive"] = (naive_plain, None)
        impls["compile(naive)"] = (compiled(naive_plain), None) if gpu else (None, no_gpu)
        impls["sdpa"] = (sdpa_plain, None)  # no importance needed at stage 4: plain SDPA
    else:
        raise ValueError(suite)
    return impls


OP_SUITES = {"hybrid": hybrid_inputs, "self_guided": self_guided_inputs, "stage4": plain_inputs}


# ------------------------------------------------------------ op counts ----

def op_counts(suite, shape, device, backward):
    """(FLOPs, minimal bytes) of one call: each input read once, each output
    written once (backward: inputs, output gradient, input gradients)."""
    B, (H, W), C, h, sr = shape["batch"], shape["grid"], shape["dim"], shape["heads"], shape["sr"]
    d, N = C // h, H * W
    es = torch.finfo(work_dtype(device)).bits // 8
    if suite == "hybrid":
        M = (H // sr) * (W // sr)
        half = h // 2
        fl = 4 * B * half * N * M * d + 4 * B * half * N * WINDOW * WINDOW * d
        io = es * B * half * d * (N + 2 * M + 3 * N) + es * B * h * N * d + 4 * B * N
        if backward:
            fl, io = 3.5 * fl, io + es * B * h * N * d + es * B * half * d * (N + 2 * M + 3 * N)
    elif suite == "self_guided":
        from sgattn.reference import reallocated_length
        M = reallocated_length(N, naive.GROUP_SIZES[sr])
        fl = 2 * (2 * N * C) * B + 2 * (2 * B * M * C * C) + 4 * B * h * N * M * d
        io = es * (B * h * N * d + B * N * C + 2 * C * C + B * h * N * d) + 2 * 4 * B * N
        if backward:
            fl, io = 3 * fl, io + es * (2 * B * h * N * d + B * N * C + 2 * C * C)
    else:
        fl = 4 * B * h * N * N * d
        io = es * 4 * B * h * N * d
        if backward:
            fl, io = 3.5 * fl, io + es * 4 * B * h * N * d
    return int(fl), int(io)


def model_flops(variant, resolution):
    """Forward FLOPs of one image (matmuls and convolutions of the naive model,
    counted by torch.utils.flop_counter on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = naive.naive_sgformer(variant, strict=False).to("meta")
    x = torch.empty(1, 3, *resolution, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


# ------------------------------------------------------- attention mass ----
# attention_with_mass (output + per-key mass in one pass) at a Llama-style GQA layout, against the
# attention alone (SDPA) and what KV-cache eviction does today: eager attention (the [B, Hq, Lq, Lk]
# matrix), SDPA plus a second pass from its log-sum-exp, SDPA plus a window recompute (SnapKV), or
# two FlexAttention calls (GPU: compiled FlexAttention is not a CPU performance path).
# Kinds: "prefill" (every query, kvpress ObservedAttention's causal_mean over the GQA group),
# "snapkv" (the last `window` queries' mean, group mean), "decode" (Lq new queries against an Lk
# cache, H2O's per-head sum).
MASS_LAYOUT = {"batch": 1, "hq": 32, "hkv": 8, "dim": 128}
MASS_OPTIONS = {"prefill": lambda s: {"mass_queries": None, "mass_reduce": "causal_mean", "mass_heads": "group_mean"},
                "snapkv": lambda s: {"mass_queries": s["window"], "mass_reduce": "mean", "mass_heads": "group_mean"},
                "decode": lambda s: {"mass_queries": None, "mass_reduce": "sum", "mass_heads": "none"}}


def _mass_shape(kind, lq, lk, window=None):
    shape = dict(MASS_LAYOUT, kind=kind, lq=lq, lk=lk)
    if window is not None:
        shape["window"] = window
    return shape


def mass_shapes(name=None, device_type="cpu"):
    """The attention-mass cases of a named shape set (the names of ``shape_set``)."""
    name = name or os.environ.get("SGATTN_BENCH_SHAPES") or ("full" if device_type == "cuda" else "cpu")
    if name == "smoke":
        return [_mass_shape("prefill", 256, 256), _mass_shape("snapkv", 256, 256, 32), _mass_shape("decode", 4, 1024)]
    if name == "cpu":
        prefill, snap_l, decode_lk = (1024, 2048, 4096, 8192, 16384), 4096, (8192, 32768, 131072)
    elif name == "headline":
        prefill, snap_l, decode_lk = (8192, 32768), 32768, (131072,)
    elif name == "full":
        prefill, snap_l, decode_lk = (1024, 4096, 8192, 16384, 32768, 65536), 32768, (8192, 32768, 131072)
    else:
        shape_set(name)  # the same error for an unknown name
    shapes = ([_mass_shape("prefill", n, n) for n in prefill]
              + [_mass_shape("snapkv", snap_l, snap_l, w) for w in (32, 64, 128)]
              + [_mass_shape("decode", lq, lk) for lk in decode_lk for lq in (1, 16)])
    return sorted(shapes, key=lambda s: s["lq"] * s["lk"])  # cheapest first: a time budget cuts the largest


def mass_case_id(shape):
    tail = f"-w{shape['window']}" if "window" in shape else ""
    return f"{shape['kind']}-q{shape['lq']}-k{shape['lk']}{tail}"


def mass_inputs(shape, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, hq, hkv, d, lq, lk = (shape[k] for k in ("batch", "hq", "hkv", "dim", "lq", "lk"))
    dt = work_dtype(device)
    return tuple(torch.randn(*s, generator=g).to(device=device, dtype=dt)
                 for s in ((B, hq, lq, d), (B, hkv, lk, d), (B, hkv, lk, d)))


def _causal_allowed(lq, lk, start, stop, device):
    """[stop - start, lk] bool: query i (of lq, bottom-right aligned) sees key j <= i + lk - lq."""
    return torch.arange(lk, device=device)[None] <= torch.arange(start, stop, device=device)[:, None] + lk - lq


def _reduce_mass(per_head, counts, n_chosen, opts, hkv):
    """[B, Hq, Lk] summed probabilities -> the requested mass (counts: [Lk] chosen queries seeing each key)."""
    if opts["mass_reduce"] == "mean":
        per_head = per_head / n_chosen
    elif opts["mass_reduce"] == "causal_mean":
        per_head = per_head / counts.clamp(min=1)
    if opts["mass_heads"] == "group_mean":
        return per_head.unflatten(1, (hkv, -1)).mean(2)
    assert opts["mass_heads"] == "none", opts
    return per_head


def _first_chosen(lq, opts):
    return 0 if opts["mass_queries"] is None else lq - opts["mass_queries"]


def _grouped(q, hkv):
    """[B, Hq, L, D] -> [B, Hkv, G * L, D]: a GQA group's queries as rows against their shared K, V
    (what a careful eager implementation does instead of repeating K and V)."""
    return q.reshape(q.shape[0], hkv, -1, q.shape[-1])


def eager_mass_attention(q, k, v, opts):
    """What eager attention does: the whole probability matrix, its output and sums."""
    hkv, lq, lk = k.shape[1], q.shape[2], k.shape[2]
    allowed = _causal_allowed(lq, lk, 0, lq, q.device)
    s = (_grouped(q, hkv) @ k.transpose(-1, -2)).view(*q.shape[:3], lk) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    first = _first_chosen(lq, opts)
    mass = _reduce_mass(p[:, :, first:].float().sum(2), allowed[first:].sum(0), lq - first, opts, hkv)
    return (_grouped(p, hkv) @ v).view(*q.shape[:3], v.shape[-1]), mass


def sdpa_lse(q, k, v):
    """SDPA's output and log-sum-exp (natural log, bottom-right causal). CPU: the flash kernel's LSE;
    CUDA: the memory-efficient kernel's (a GPU run must confirm it). Prefill repeats K and V for the
    kernel's causal mask (O(L d), small next to the O(L^2 d) attention); a decode step folds each GQA
    group's queries into rows against the shared K and V, with the causal bias tiled per row."""
    B, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if lq == lk:
        k, v = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
        q_rows, bias = q, None
    else:  # these kernels take an additive bias of the query's dtype
        q_rows = _grouped(q, hkv)
        bias = torch.zeros(lq, lk, device=q.device, dtype=q.dtype).masked_fill(
            ~_causal_allowed(lq, lk, 0, lq, q.device), float("-inf")).repeat(hq // hkv, 1).expand(
            B, hkv, q_rows.shape[2], lk)
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q_rows, k, v, bias, True,
                                                                         is_causal=bias is None)[:2]
        lse = lse[..., :q_rows.shape[2]]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_rows, k, v, is_causal=bias is None,
                                                                              attn_mask=bias)
    return out.reshape(B, hq, lq, v.shape[-1]), lse.reshape(B, hq, lq)


def second_pass_mass(q, k, lse, opts, max_block=1 << 26):
    """The mass from a log-sum-exp the caller has, as users write it today: a second pass over Q and K,
    exp(scores - lse) in query chunks (the chunk's [Hq, rows, Lk] probabilities at a time)."""
    B, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    first = _first_chosen(lq, opts)
    chunk = max(1, max_block // (B * hq * lk))
    acc = torch.zeros(B, hq, lk, device=q.device, dtype=torch.float32)
    counts = torch.zeros(lk, device=q.device)
    for s in range(first, lq, chunk):
        e = min(lq, s + chunk)
        allowed = _causal_allowed(lq, lk, s, e, q.device)
        logits = (_grouped(q[:, :, s:e], hkv) @ k.transpose(-1, -2)).view(B, hq, e - s, lk).float() * d ** -0.5
        p = torch.exp(logits - lse[:, :, s:e, None].float()).masked_fill(~allowed, 0.0)
        acc += p.sum(2)
        counts += allowed.sum(0)
    return _reduce_mass(acc, counts, lq - first, opts, hkv)


def _flex_two_calls(q, k, v, attn_mask, swapped_mask):
    """The attention and its LSE, then a call with queries and keys swapped: key j's row of scores
    q_i . k_j * scale minus query i's LSE has log(sum_i P[i, j]) as its own LSE."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention
    out, aux = flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
    lse = aux.lse

    def minus_lse(score, b, h, j, i):
        return score - lse[b, h, i]

    B, hq, lq, _ = q.shape
    key_rows = k.repeat_interleave(hq // k.shape[1], 1)
    _, swapped = flex_attention(key_rows, q, q.new_zeros(B, hq, lq, 16), score_mod=minus_lse,
                                block_mask=swapped_mask, return_aux=AuxRequest(lse=True))
    return out, swapped.lse


def flex_two_calls_mass(q, k, v, opts, *, compile=True, _masks={}):
    """The mass with FlexAttention as its users get it today (attention-gym#19): two calls, the second
    with queries and keys swapped (`_flex_two_calls`), causal and chosen queries as block masks that
    skip the blocks they exclude; compiled, as FlexAttention is meant to run."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    off, first = lk - lq, _first_chosen(lq, opts)
    key = (lq, lk, first, str(q.device))
    if key not in _masks:
        def causal(b, h, i, j):
            return j <= i + off

        def chosen_seeing(b, h, j, i):
            return (j <= i + off) & (i >= first)

        _masks[key] = (create_block_mask(causal, None, None, lq, lk, device=q.device),
                       create_block_mask(chosen_seeing, None, None, lk, lq, device=q.device))
    fn = compiled(_flex_two_calls) if compile else _flex_two_calls
    out, log_mass = fn(q, k, v, *_masks[key])
    counts = (lq - torch.clamp(torch.arange(lk, device=q.device) - off, min=first)).clamp(min=0)
    return out, _reduce_mass(log_mass.float().exp(), counts, lq - first, opts, hkv)


def sdpa_causal(q, k, v):
    lq, lk = q.shape[2], k.shape[2]
    mask = None if lq == lk else _causal_allowed(lq, lk, 0, lq, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


def eager_matrix_bytes(shape, device):
    return shape["batch"] * shape["hq"] * shape["lq"] * shape["lk"] * torch.finfo(work_dtype(device)).bits // 8


def eager_fits(shape, device):
    """None, or why eager attention is not timed (its scores and probabilities would not fit comfortably)."""
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    need = 2 * eager_matrix_bytes(shape, device)
    if need > total // 4:
        return f"eager attention would hold {need / 2 ** 30:.1f} GiB of scores and probabilities ({total / 2 ** 30:.0f} GiB here)"
    return None


def sgattn_mass_from_lse(q, k, v, opts):
    """A user of another attention kernel: its output and LSE, then sgattn's mass alone."""
    out, lse = sdpa_lse(q, k, v)
    return out, sgattn.attention_mass(q, k, lse, causal=True, **opts)


def sdpa_second_pass(q, k, v, opts):
    out, lse = sdpa_lse(q, k, v)
    return out, second_pass_mass(q, k, lse, opts)


def sdpa_window_recompute(q, k, v, opts):
    """kvpress's SnapKV under SDPA: the attention, then the window's rows recomputed eagerly."""
    w = opts["mass_queries"]
    return sdpa_causal(q, k, v), eager_mass_attention(q[:, :, -w:], k, v, dict(opts, mass_queries=None))[1]


def mass_impls(shape, device):
    """{impl: (callable(q, k, v) or None, reason)} for one attention-mass case."""
    opts = MASS_OPTIONS[shape["kind"]](shape)
    impls = {}
    backends = sgattn_backends(device)
    # The reference is the float64 oracle, not a performance path: timed only where no kernel backend runs.
    kernels = [b for b in backends if b != "reference"]
    for b in kernels or backends:
        impls[f"sgattn:{b}"] = (with_backend(b, functools.partial(sgattn.attention_with_mass, causal=True, **opts)), None)
        impls[f"sgattn:{b}:lse"] = (with_backend(b, functools.partial(sgattn_mass_from_lse, opts=opts)), None)
    why = eager_fits(shape, device)
    impls["naive"] = (functools.partial(eager_mass_attention, opts=opts), None) if why is None else (None, why)
    impls["sdpa"] = (sdpa_causal, None)  # the attention alone: what the mass costs on top
    if shape["kind"] == "snapkv":
        impls["sdpa+window"] = (functools.partial(sdpa_window_recompute, opts=opts), None)
    else:
        impls["sdpa+2pass"] = (functools.partial(sdpa_second_pass, opts=opts), None)
    why = flex_available(device)
    impls["flex+2call"] = (functools.partial(flex_two_calls_mass, opts=opts), None) if why is None else (None, why)
    return impls


def mass_counts(shape, device):
    """(FLOPs, minimal bytes): QK^T and PV over the causally visible pairs; Q, K, V read, out and mass written."""
    B, hq, hkv, d, lq, lk = (shape[k] for k in ("batch", "hq", "hkv", "dim", "lq", "lk"))
    pairs = lq * (lk - lq) + lq * (lq + 1) // 2
    es = torch.finfo(work_dtype(device)).bits // 8
    return int(4 * B * hq * pairs * d), int(es * B * d * (2 * hq * lq + 2 * hkv * lk) + 4 * B * hq * lk)
