"""Tolerances justified by a higher-precision reference.

The rule (flash-attention's): a backend's result ``out`` in dtype T passes
when |out - ref64| <= factor * |ref_T - ref64| + atol_T elementwise-max, where
ref64 is the reference computed in float64 and ref_T the reference computed
from the same dtype-T inputs. The reference itself accumulates in fp32, so
ref_T's error is the rounding a correct fp32-accumulating kernel also makes;
atol_T covers outputs whose reference error happens to be ~0 (one ulp of T
at the output's magnitude).
"""
import math

import torch

ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23, torch.float64: 2 ** -52}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(out, ref_same_dtype, ref64, factor=2.0, what="output", extra=0.0):
    """``extra``: an absolute allowance for errors the reference cannot make (see flash_row_errors)."""
    scale = max(ref64.abs().max().item(), 1e-30)
    atol = 2 * ULP[out.dtype] * scale
    err = max_err(out, ref64)
    ref_err = max_err(ref_same_dtype, ref64)
    bound = factor * ref_err + atol + extra
    assert err <= bound, (f"{what}: max error {err:.3e} vs fp64 exceeds {factor} x reference's "
                          f"{ref_err:.3e} + {atol:.3e} + {extra:.3e} (dtype {out.dtype})")


def flash_row_errors(q, k, v, dout, out64, imp64, dq64, scale):
    """What a correct flash-style kernel, accumulating in fp32, may add beyond
    the reference's own error to the importance and the gradients.

    It takes delta_i = rowsum(dO_i * O_i) (a length-d fp32 dot: error
    e_delta <= d 2**-24 max_i sum_c |dO_ic O_ic|) and P = exp(s - lse_i) from a
    stored fp32 lse (one ulp: relative error rho = 2**-23 (max|s| + ln M) on
    every P of a row). Both are the same for all keys of a row, so they do not
    average out of dS_ij = P_ij (dP_ij - delta_i): its error is at most
    P_ij (e_delta + rho |dP_ij - delta_i|), with |dP_ij - delta_i| <= 2 max|dP|
    and sum_i P_ij <= h N max(importance) (importance: the mean over heads and
    queries). Hence importance (rho relative), dq_i = scale sum_j dS_ij k_j
    (sum_j P_ij = 1; dq_i scaled by rho), dk_j = scale sum_i dS_ij q_i and
    dv_j = sum_i P_ij dO_i. All from float64 values of the rounded inputs;
    for fp16/bf16 outputs the terms are far below one ulp.
    """
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    h, N, d, M = q.shape[1], q.shape[2], q.shape[3], k.shape[2]
    s_max = (q @ k.transpose(-1, -2)).abs().max().item() * scale
    dp_max = (dout @ v.transpose(-1, -2)).abs().max().item()
    e_delta = d * 2.0 ** -24 * (dout * out64.double()).abs().sum(-1).max().item()
    rho = 2.0 ** -23 * (s_max + math.log(M))
    col = h * N * imp64.max().item()
    return {"importance": rho * imp64.abs().max().item(),
            "dq": scale * k.abs().max().item() * e_delta + rho * dq64.abs().max().item(),
            "dk": scale * q.abs().max().item() * col * (e_delta + 2 * rho * dp_max),
            "dv": rho * dout.abs().max().item() * col}
