"""Call every sgattn kernel once on small shapes, forward and backward, for
each GPU backend that can run: the program compute-sanitizer checks.

    for tool in memcheck racecheck initcheck; do
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool \
          --error-exitcode 1 python bench/sanitize_ops.py [--backends cuda] [--dtypes float32,float16]
    done

(without the caching allocator an out-of-bounds access lands outside any
allocation, where memcheck sees it). Exits non-zero if a call raises.
CUDA backend kernels covered: attention forward with one and several key
tiles (global, window with padded windows, windows of more than 64 keys),
importance pass and reduction, fused backward (forward rerun, delta, dK/dV
with and without query splits and their reduction, dQ), reallocation
forward, inverse, dx, row sums and reduction (3 and 2 parts). Triton also: the
attention-mass kernels (causal, GQA/MQA, key padding, query subsets, from an lse).
racecheck is slow: pass --backends cuda.
"""
import argparse
import sys

import torch

import sgattn
from sgattn import ops


def calls(device, dtype):
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)

    B, h, d = 2, 2, 32
    yield "attention global", lambda: sgattn.attention_with_importance(r(B, h, 67, d), r(B, h, 23, d), r(B, h, 23, d))
    yield "attention plain", lambda: (ops.attention(r(B, h, 70, d), r(B, h, 70, d), r(B, h, 70, d)),)
    yield "attention 300 keys d40", lambda: sgattn.attention_with_importance(
        r(1, 1, 75, 40), r(1, 1, 300, 40), r(1, 1, 300, 40))
    yield "attention 1100 queries (dK/dV query splits)", lambda: sgattn.attention_with_importance(
        r(1, 1, 1100, 32), r(1, 1, 23, 32), r(1, 1, 23, 32))
    yield "attention window 9 on 10x11", lambda: sgattn.attention_with_importance(
        r(1, h, 110, 24), r(1, h, 110, 24), r(1, h, 110, 24), window=9, hw=(10, 11))
    yield "attention window 10x9", lambda: sgattn.attention_with_importance(
        r(B, h, 90, d), r(B, h, 90, d), r(B, h, 90, d), window=7, hw=(10, 9))
    yield "hybrid 15x14 sr2", lambda: sgattn.hybrid_scale_attention(
        r(B, 1, 210, d), r(B, 1, 49, d), r(B, 1, 49, d), r(B, 1, 210, d), r(B, 1, 210, d), r(B, 1, 210, d),
        hw=(15, 14), reduced_hw=(7, 7))
    imp = torch.rand(B, 90, generator=g).to(device)
    yield "reallocate_tokens", lambda: (sgattn.reallocate_tokens(
        r(B, 90, 48), imp, [r(49), r(14), r(7)], [r(1), r(1), r(1)]),)
    C = 64
    imp2 = torch.rand(B, 7, 7, generator=g).to(device)
    yield "self_guided 7x7", lambda: (sgattn.self_guided_attention(
        r(B, 4, 49, C // 4), r(B, 49, C), imp2, r(C, C, scale=C ** -0.5), r(C), r(C, C, scale=C ** -0.5), r(C),
        [r(2), r(1)], [r(1), r(1)], hw=(7, 7)),)
    # attention mass (causal, grouped-query heads, key padding with a wholly padded batch row,
    # weighted query subsets, a decode step, the mass from a given lse)
    pad = torch.rand(B, 45, generator=g) < 0.3
    pad[0] = True
    pad = pad.to(device)
    yield "mass causal GQA padded", lambda: sgattn.attention_with_mass(
        r(B, 4, 37, d), r(B, 2, 45, d), r(B, 2, 45, d), causal=True, key_padding_mask=pad, mass_queries=8,
        mass_reduce="causal_mean", mass_heads="group_sum")
    yield "mass decode 3 queries, 300 keys", lambda: sgattn.attention_with_mass(
        r(1, 8, 3, 40), r(1, 2, 300, 40), r(1, 2, 300, 40), causal=True, mass_heads="mean")

    def from_lse():
        q, k = r(B, 4, 70, d), r(B, 1, 70, d)
        out, _, lse = sgattn.attention_with_mass(q, k, r(B, 1, 70, d), causal=True, return_lse=True)
        return out, sgattn.attention_mass(q, k, lse, causal=True, mass_queries=torch.tensor([3, 69], device=device))
    yield "mass from lse (MQA, index queries)", from_lse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated, run in this order")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = ap.parse_args()
    wanted = args.backends.split(",")
    dtypes = [getattr(torch, n) for n in args.dtypes.split(",")]
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        return 0
    device = torch.device("cuda")
    available = sgattn.available_backends()
    names = [n for n in wanted if n in available and available[n] is None]  # in the order asked for
    print("GPU backends:", names or "none", sgattn.available_backends())
    failed = 0
    for name in names:
        for dtype in dtypes:
            for label, make in calls(device, dtype):
                try:
                    with sgattn.use_backend(name):
                        outs = make()
                        out = outs[0]
                        out.backward(torch.randn_like(out))
                    torch.cuda.synchronize()
                    print(f"ok   {name} {dtype} {label}")
                except sgattn.BackendError as exc:
                    print(f"skip {name} {dtype} {label}: {exc}")
                except Exception as exc:
                    failed += 1
                    print(f"FAIL {name} {dtype} {label}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
