"""Whole-model benchmarks: inference and training-step images/s of SG-Former
(sgattn backends vs the naive model and torch.compile of it), with timm's
Swin-T and PVTv2-b2 at 224 as reference points when timm is importable.
bf16 autocast on a GPU, fp32 on a CPU (SGATTN_BENCH_AUTOCAST overrides)."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import cases
import report
import sgattn
from sgattn import naive

DEVICE = report.resolve_device(os.environ.get("SGATTN_BENCH_DEVICE"))
SHAPES = cases.shape_set(device_type=DEVICE.type)
TIMM = {"timm:swin_t": "swin_tiny_patch4_window7_224", "timm:pvt_v2_b2": "pvt_v2_b2"}
IMPLS = [f"sgattn:{b}" for b in cases.sgattn_backends(DEVICE)] + ["naive", "compile(naive)"] + list(TIMM)
_models = {}
_flops = {}


def build(variant, kind):
    """``kind`` "naive": the naive model (generalised, so it runs at every
    resolution; identical to the paper's at 224, NCHW convolutions as in its
    code); "sgattn": sgattn's own model (its attention modules, channels-last
    convolutions) with the same weights; all sgattn backends share it (the
    backend is chosen at call time). One variant is kept alive at a time."""
    if _models.get("variant") != variant:
        _models.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        _models["variant"] = variant
        _models["naive"] = naive.naive_sgformer(variant, strict=False).to(DEVICE)
    if kind == "sgattn" and "sgattn" not in _models:
        model = getattr(sgattn.models, variant)().to(DEVICE)
        model.load_state_dict(_models["naive"].state_dict())
        _models["sgattn"] = model
    return _models[kind]


# SGATTN_BENCH_AUTOCAST: bf16 / fp16 / off; default bf16 on a GPU, off (fp32) on a CPU.
AUTOCAST = os.environ.get("SGATTN_BENCH_AUTOCAST", "bf16" if DEVICE.type == "cuda" else "off")
if AUTOCAST not in ("bf16", "fp16", "off"):
    raise ValueError(f"SGATTN_BENCH_AUTOCAST must be bf16, fp16 or off, got {AUTOCAST!r}")


def autocast():
    if AUTOCAST == "off":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16 if AUTOCAST == "bf16" else torch.float16)


def backend_ctx(impl):
    return sgattn.use_backend(impl.split(":", 1)[1]) if impl.startswith("sgattn:") else contextlib.nullcontext()


@pytest.mark.parametrize("shape,mode,impl", [
    pytest.param(s, m, i, id=f"{cases.case_id(s)}-{m}-{i}") for s in SHAPES["models"]
    for m in s.get("modes", ("infer", "train"))
    for i in IMPLS])
def test_model(run_case, shape, mode, impl):
    variant, res, batch = shape["variant"], tuple(shape["resolution"]), shape["batch"]
    case = cases.case_id(shape)
    if impl == "compile(naive)" and DEVICE.type != "cuda":
        run_case.skip("model", case, mode, impl, "torch.compile baselines are timed on GPU only", shape)
    if impl in TIMM:
        if res != (224, 224) or variant != "sgformer_s":
            run_case.skip("model", case, mode, impl, "timm reference models are timed at 224 (S rows) only", shape)
        try:
            import timm
        except Exception as exc:
            run_case.skip("model", case, mode, impl, f"timm not importable ({type(exc).__name__})", shape)
        torch.manual_seed(0)
        model = timm.create_model(TIMM[impl], pretrained=False).to(DEVICE)
    else:
        model = build(variant, "sgattn" if impl.startswith("sgattn:") else "naive")
    flops = None
    if impl not in TIMM and not run_case.disabled:
        if (variant, res) not in _flops:
            _flops[(variant, res)] = cases.model_flops(variant, res)
        flops = _flops[(variant, res)] * batch * (3 if mode == "train" else 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *res, generator=g).to(DEVICE)
    y = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    net = cases.compiled(model) if impl == "compile(naive)" else model
    if mode == "infer":
        model.eval()

        def call():
            with torch.no_grad(), autocast(), backend_ctx(impl):
                return net(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def call():
            opt.zero_grad(set_to_none=True)
            with autocast(), backend_ctx(impl):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            opt.step()
    run_case("model", case, mode, impl, call, shape=shape, flops=flops, images=batch)
