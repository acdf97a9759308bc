"""Offline compilation of every kernel configuration SG-Former S/M/B uses, for
real GPUs, without a GPU (``triton.compile`` + ``GPUTarget``).

Run as ``python -m sgattn.triton.compile_check [--full] 80 90`` with TRITON_INTERPRET
unset (under the interpreter the kernels are not JIT functions). Prints one
line per configuration and exits non-zero if any fails to compile or needs
more shared memory than the architecture has.
"""
from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget

from . import attention as A
from . import importance as I
from . import reallocation as R
from ..reference import REALLOCATION_GROUPS

# Shared memory per block an sm_80 / sm_90 kernel may use (opt-in maximum).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
TT = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
FLOAT_SCALARS = {"scale", "scale_log2", "wa", "wg"}


def _signature(kernel, pointers: dict, constexprs: dict):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def configurations(full: bool = False):
    """(label, kernel, pointer dtypes, constexprs, num_warps) of every launch
    SG-Former S/M/B makes at 224x224, training included; ``full`` adds head
    dim 64 and the paths other resolutions take (long key rows, importance
    over a 256-key tile, key-major importance)."""
    out = []
    # head dims: S/M d=32, B d=24 and 32 -> BLOCK_D 32 (d is a runtime argument)
    for dt in ("fp16", "bf16", "fp32"):
        flags = {"UPCAST": False, "IEEE": dt == "fp32"}
        for bd in ((32, 64) if full else (32,)):
            t = dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DVp"), dt)
            f32 = dict.fromkeys(("LSE", "PART", "DELTA"), "fp32")
            # keys at 224: 49 (HSA global heads with importance; stage 4 without),
            # 60 (SGA sr 8/4), 147 (SGA sr 2): single tiles of 64 or 256 keys
            singles = ((64, True), (64, False), (256, False)) + (((256, True),) if full else ())
            for block_n, imp in singles:
                out.append((f"attn_fwd {dt} d{bd} keys<={block_n} imp={imp}", A._attn_fwd, {**t, **f32},
                            dict(BLOCK_M=A.BLOCK, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bd, SINGLE_TILE=True,
                                 NEED_IMP=imp, **flags), 8 if block_n >= 256 else 4))
            if full:
                out.append((f"attn_fwd {dt} d{bd} long rows", A._attn_fwd, {**t, **f32},
                            dict(BLOCK_M=A.BLOCK, BLOCK_N=A.BLOCK, BLOCK_D=bd, BLOCK_DV=bd, SINGLE_TILE=False,
                                 NEED_IMP=False, **flags), 4))
            out.append((f"attn_bwd_q {dt} d{bd}", A._attn_bwd_q, {**t, **f32},
                        dict(BLOCK_M=A.BLOCK, BLOCK_N=A.BLOCK, BLOCK_D=bd, BLOCK_DV=bd, **flags), 4))
            for grads, imp in ((True, False),) + (((False, True),) if full else ()):
                out.append((f"attn_key_major {dt} d{bd} grads={grads} imp={imp}", A._attn_key_major,
                            {**t, **f32}, dict(BLOCK_M=A.BLOCK, BLOCK_N=A.BLOCK, BLOCK_D=bd, BLOCK_DV=bd,
                                               GRADS=grads, NEED_IMP=imp, **flags), 4))
            for win in ((7, 12) if full else (7,)):
                L, S = A.window_blocks(win)
                for mode in ((0, 1) if L == S else (0, 2, 3)):
                    out.append((f"window_attn w{win} {dt} d{bd} mode={mode}", A._window_attn, {**t, **f32},
                                dict(WIN=win, BLOCK_L=L, BLOCK_S=S, BLOCK_D=bd, BLOCK_DV=bd, MODE=mode,
                                     NEED_IMP=mode == 0, **flags), 4))
        # reallocation: channels 64..384 -> BLOCK_C 64 or 128; group sizes of every plan
        p = {"X": dt, "IDX": "i64", "W": dt, "BIAS": dt, "OUT": dt}
        block_rs = sorted({min(64, triton.next_power_of_2(max(g))) for g in REALLOCATION_GROUPS.values()})
        for block_r in block_rs:
            for bc in (64, 128):
                out.append((f"aggregate_fwd {dt} member-block {block_r} C-block {bc}", R._aggregate_fwd, p,
                            dict(BLOCK_R=block_r, BLOCK_C=bc), 4))
        out.append((f"aggregate_bwd {dt}", R._aggregate_bwd,
                    {"X": dt, "INV": "i64", "W": dt, "DOUT": dt, "DX": dt, "T": "fp32"},
                    dict(TWO=True, BLOCK_T=32, BLOCK_C=64), 4))
    for has_g in (False, True):
        out.append((f"importance_reduce has_g={has_g}", I._importance_reduce,
                    {"A": "fp32", "G": "fp32", "SRC": "i64", "OUT": "fp32"}, dict(BLOCK=256, HAS_G=has_g), 4))
    return out


def compile_one(label, kernel, pointers, constexprs, num_warps, arch):
    src = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs),
                                    constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    shared = compiled.metadata.shared
    ok = ".entry" in ptx and shared <= MAX_SHARED[arch]
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma"
    return ok, f"sm_{arch} {label}: ptx {len(ptx)} chars, {mma}, shared {shared} B"


def main(archs, full=False):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the JIT functions")
    failures = 0
    for arch in archs:
        for cfg in configurations(full):
            try:
                ok, line = compile_one(*cfg, arch)
            except Exception as exc:  # report every failing configuration, not only the first
                ok, line = False, f"sm_{arch} {cfg[0]}: {type(exc).__name__}: {exc}"
            failures += not ok
            print(("ok   " if ok else "FAIL ") + line, flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main([int(a) for a in args if a != "--full"] or [80, 90], full="--full" in args))
