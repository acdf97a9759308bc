"""Op-level benchmarks: the hybrid-scale op (output + importance map), the
self-guided op (reallocation + attention) and stage-4 (plain) attention,
forward and forward+backward, every sgattn backend against the baselines."""
import os

import pytest
import torch

import cases
import report

DEVICE = report.resolve_device(os.environ.get("SGATTN_BENCH_DEVICE"))
SHAPES = cases.shape_set(device_type=DEVICE.type)
IMPLS = {suite: cases.op_impls(suite, DEVICE) for suite in cases.OP_SUITES}


def _params(suite):
    shapes = SHAPES["stage4"] if suite == "stage4" else SHAPES["ops"]
    return [pytest.param(shape, mode, impl, id=f"{cases.case_id(shape)}-{mode}-{impl}")
            for shape in shapes
            for mode in shape.get("modes", ("fwd", "fwdbwd")) for impl in IMPLS[suite]]


def _bench(run_case, suite, shape, mode, impl):
    fn, why = IMPLS[suite][impl]
    case = cases.case_id(shape)
    if fn is None:
        run_case.skip(suite, case, mode, impl, why, shape)
    backward = mode == "fwdbwd"
    args, kwargs = cases.OP_SUITES[suite](shape, DEVICE, requires_grad=backward)
    flops, nbytes = cases.op_counts(suite, shape, DEVICE, backward)
    if backward:
        inputs = cases.differentiable(args)
        probe = fn(*args, **kwargs)
        out = probe[0] if isinstance(probe, tuple) else probe
        grad_out = torch.randn_like(out)
        del probe, out

        def call():
            res = fn(*args, **kwargs)
            res = res[0] if isinstance(res, tuple) else res
            return torch.autograd.grad(res, inputs, grad_out)
    else:
        def call():
            with torch.no_grad():
                return fn(*args, **kwargs)
    run_case(suite, case, mode, impl, call, shape=shape, flops=flops, bytes_moved=nbytes)


@pytest.mark.parametrize("shape,mode,impl", _params("hybrid"))
def test_hybrid_scale_op(run_case, shape, mode, impl):
    _bench(run_case, "hybrid", shape, mode, impl)


@pytest.mark.parametrize("shape,mode,impl", _params("self_guided"))
def test_self_guided_op(run_case, shape, mode, impl):
    _bench(run_case, "self_guided", shape, mode, impl)


@pytest.mark.parametrize("shape,mode,impl", _params("stage4"))
def test_stage4_attention(run_case, shape, mode, impl):
    _bench(run_case, "stage4", shape, mode, impl)
