"""Attention-mass benchmarks: sgattn.attention_with_mass (and SDPA's LSE +
sgattn.attention_mass) against the attention alone (SDPA) and today's
workarounds (eager attention, SDPA + a second pass, SDPA + SnapKV's window
recompute, two FlexAttention calls on a GPU) at B=1, Hq=32, Hkv=8, D=128,
causal: prefill, SnapKV windows and decode steps, forward only (scoring runs
at inference). Rows of one case run one after another, so a load change on a
shared machine hits them alike."""
import functools
import os

import pytest
import torch

import sgattn

import cases
import report

DEVICE = report.resolve_device(os.environ.get("SGATTN_BENCH_DEVICE"))
SHAPES = cases.mass_shapes(device_type=DEVICE.type)


def _params():
    return [pytest.param(shape, impl, id=f"{cases.mass_case_id(shape)}-{impl}")
            for shape in SHAPES for impl in cases.mass_impls(shape, DEVICE)]


@pytest.mark.parametrize("shape,impl", _params())
def test_attention_mass(run_case, shape, impl):
    fn, why = cases.mass_impls(shape, DEVICE)[impl]
    case = cases.mass_case_id(shape)
    if fn is None:
        run_case.skip("mass", case, "fwd", impl, why, shape)
    q, k, v = cases.mass_inputs(shape, DEVICE)
    flops, nbytes = cases.mass_counts(shape, DEVICE)

    def call():
        with torch.no_grad():
            return fn(q, k, v)
    run_case("mass", case, "fwd", impl, call, shape=shape, flops=flops, bytes_moved=nbytes)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape", cases.mass_shapes("smoke"), ids=cases.mass_case_id)
def test_mass_rows_agree(shape):
    """Every row of the smoke cases computes the same output and mass (float32 on the CPU; the
    rows differ in summation order only, ~1e-6 here, and a wrong reduction is off by >= 1/Lq)."""
    q, k, v = cases.mass_inputs(shape, torch.device("cpu"))
    impls = cases.mass_impls(shape, torch.device("cpu"))
    with torch.no_grad():
        ref_out, ref_mass = impls["naive"][0](q, k, v)
        torch.testing.assert_close(impls["sdpa"][0](q, k, v), ref_out, rtol=1e-4, atol=1e-5)
        # the GPU's FlexAttention row: its arithmetic, checked here uncompiled (flex's CPU reference path)
        opts = cases.MASS_OPTIONS[shape["kind"]](shape)
        impls["flex+2call"] = (functools.partial(cases.flex_two_calls_mass, opts=opts, compile=False), None)
        for name, (fn, _) in impls.items():
            if name in ("naive", "sdpa"):
                continue
            try:
                out, mass = fn(q, k, v)
            except sgattn.BackendError:  # a backend that declines these options (it says so in the timed rows)
                continue
            torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} output: {m}")
            torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} mass: {m}")
