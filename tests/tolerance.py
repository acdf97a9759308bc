"""Tolerances justified by a higher-precision reference.

The rule (flash-attention's): a backend's result ``out`` in dtype T passes
when |out - ref64| <= factor * |ref_T - ref64| + atol_T elementwise-max, where
ref64 is the reference computed in float64 and ref_T the reference computed
from the same dtype-T inputs. The reference itself accumulates in fp32, so
ref_T's error is the rounding a correct fp32-accumulating kernel also makes;
atol_T covers outputs whose reference error happens to be ~0 (one ulp of T
at the output's magnitude).
"""
import torch

ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23, torch.float64: 2 ** -52}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(out, ref_same_dtype, ref64, factor=2.0, what="output"):
    scale = max(ref64.abs().max().item(), 1e-30)
    atol = 2 * ULP[out.dtype] * scale
    err = max_err(out, ref64)
    ref_err = max_err(ref_same_dtype, ref64)
    bound = factor * ref_err + atol
    assert err <= bound, (f"{what}: max error {err:.3e} vs fp64 exceeds {factor} x reference's "
                          f"{ref_err:.3e} + {atol:.3e} (dtype {out.dtype})")
