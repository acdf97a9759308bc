"""Offline compilation of every kernel configuration the Triton backend
accepts, for real GPUs, without a GPU (``triton.compile`` + ``GPUTarget``),
with the register, spill, stack and shared-memory numbers of each.

What is compiled is what runs: every configuration is described by the
launchers' own launch specs (``launch.forward_launches`` /
``backward_launches``, the reallocation and importance launchers' blocks)
built from representative real tensors, and the signature, constexprs and
specialisation attributes (stride == 1, divisibility by 16, pointer
alignment) are derived by Triton's own launcher code
(``create_function_from_signature`` + ``JITFunction._pack_args``, the path
``JITFunction.run`` takes), for the installed Triton version.

Configurations: kinds fp16, bf16, fp32-tf32, fp32-ieee (fp32 follows torch's
matmul precision setting, so both are reachable) x padded head dims 32, 64,
128 (d in 16..128) x every key-tile path (single tiles of 64/128/256 keys with
and without importance, multi-tile rows, key-major importance pass), the
attention-mass flags (grouped-query heads x causal x key padding x query
weights, forward and backward) x window
blocks 64, 128, 256 (w 1..8, 9..11, 12..16) x forward/backward (every mode),
plus the importance and reallocation kernels. Head dims reach the kernels as
multiples of 16 (the ops pad the others), the specialisation compiled here.

Gate (exit status 1): a configuration that fails to compile, spills
registers, uses a stack frame in fp16/bf16, needs more shared memory than
sm_80 (163 KiB opt-in) / sm_90 (227 KiB opt-in) allow, or more than the
``plans.SHARED_BYTES`` table that ``unsupported()`` relies on.

Run as ``python -m sgattn.triton.compile_check [-j JOBS] [--only REGEX] [--sample K] 80 90``
with TRITON_INTERPRET unset (under the interpreter the kernels are not JIT
functions). Prints a table: config, registers, spill bytes, stack bytes,
shared bytes, seconds. A full run is ~1000 compilations (~5 s each on one
core): set SGATTN_COMPILE_CHECK_CACHE to a directory to keep each result
under a key of everything the binary depends on (Triton version, target,
kernel source hash, signature, constexprs, attributes, options), so that
later runs only compile what changed.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time

# Shared memory per block an sm_80 / sm_90 kernel may use (opt-in maximum).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "tf32": "float32", "ieee": "float32"}


@contextlib.contextmanager
def _fp32_precision(kind):
    import torch
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if kind == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _qkv(B, h, N, M, d, dtype):
    """q as a transposed [B, N, h, d] view (what the modules pass), k and v
    as views into one kv tensor [B, M, 2, h, d] (K then V channels)."""
    import torch
    q = torch.empty(B, N, h, d, dtype=dtype).transpose(1, 2)
    kv = torch.empty(B, M, 2, h, d, dtype=dtype)
    k = kv[:, :, 0].transpose(1, 2)
    v = kv[:, :, 1].transpose(1, 2)
    return q, k, v


def _attention_specs(kind, bd, d):
    """Launch specs of every path of one (kind, padded head dim) with head dim d."""
    import torch
    from . import launch as A
    from . import plans as P
    dtype = getattr(torch, TORCH_DTYPES[kind])
    plan = P.PLANS[(kind, bd)]
    specs = []
    B, h = 2, 2
    with _fp32_precision(kind):
        assert P.kind_of(dtype) == kind
        # global: single tiles of each width (with and without importance), then long rows
        key_counts = [n - 7 for n in plan.single_blocks()] + [plan.single_max + 5]
        for M in key_counts:
            for imp in (True, False):
                N = 97
                q, k, v = _qkv(B, h, N, M, d, dtype)
                out = A.new_out(q, d)
                lse = torch.empty(B, h, N, dtype=torch.float32)
                part = torch.empty(B, P.partial_rows(plan, h, N, M, 0, imp), M, dtype=torch.float32)
                single, block_n = P.global_config(plan, M)
                tag = f"keys<={block_n}" if single else "long-rows"
                for spec in A.forward_launches(q, k, v, out, lse, part, 0.1, 0, None, imp):
                    specs.append((f"fwd {tag} imp={int(imp)}", spec))
                if imp:
                    continue
                do = torch.empty(B, N, h, d, dtype=dtype).transpose(1, 2)
                dq = torch.empty(B, h, N, d, dtype=dtype)
                dk = torch.empty(B, h, M, d, dtype=dtype)
                delta = torch.empty(B, h, N, dtype=torch.float32)
                for spec in A.backward_launches(do, q, k, v, out, lse, dq, dk, dk, delta, 0.1, 0, None):
                    specs.append(("bwd", spec))
        # attention mass: every flag combination (grouped-query heads, causal,
        # key padding, query weights); its rows always take the key-tile loop
        N, M = 97, plan.single_max + 5
        for G in (1, 2):
            q, _, _ = _qkv(B, h * G, N, M, d, dtype)
            _, k, v = _qkv(B, h, N, M, d, dtype)
            out = A.new_out(q, d)
            lse = torch.empty(B, h * G, N, dtype=torch.float32)
            colsum = torch.empty(B, h * G, M, dtype=torch.float32)
            for causal in (False, True):
                for pad in (None, torch.empty(B, M, dtype=torch.uint8)):
                    for weight in (None, torch.empty(N, dtype=torch.float32)):
                        tag = f"mass gqa={int(G > 1)} causal={int(causal)} pad={int(pad is not None)}"
                        for spec in A.forward_launches(q, k, v, out, lse, colsum, 0.1, 0, None, True, mass=True,
                                                       causal=causal, pad=pad, weight=weight, first=5):
                            specs.append((f"{tag} weight={int(weight is not None)} fwd", spec))
                    do = torch.empty(B, N, h * G, d, dtype=dtype).transpose(1, 2)
                    dq = torch.empty(B, h * G, N, d, dtype=dtype)
                    dk = torch.empty(B, h, M, d, dtype=dtype)
                    delta = torch.empty(B, h * G, N, dtype=torch.float32)
                    for spec in A.backward_launches(do, q, k, v, out, lse, dq, dk, dk, delta, 0.1, 0, None,
                                                    causal=causal, pad=pad):
                        specs.append((f"{tag} bwd", spec))
        # windows: one per padded window size
        for w in (7, 11, 16):
            hw = (w + 3, w + 2)
            N = hw[0] * hw[1]
            q, k, v = _qkv(B, h, N, N, d, dtype)
            out = A.new_out(q, d)
            lse = torch.empty(B, h, N, dtype=torch.float32)
            L = P.window_block(w)
            for imp in (True, False):
                part = torch.empty(B, P.partial_rows(plan, h, N, N, w, imp), N, dtype=torch.float32)
                for spec in A.forward_launches(q, k, v, out, lse, part, 0.1, w, hw, imp):
                    specs.append((f"window{L} fwd imp={int(imp)}", spec))
            do = torch.empty(B, N, h, d, dtype=dtype).transpose(1, 2)
            dq = torch.empty(B, h, N, d, dtype=dtype)
            for spec in A.backward_launches(do, q, k, v, out, lse, dq, dq, dq, lse, 0.1, w, hw):
                specs.append((f"window{L} bwd mode={spec[3]['MODE']}", spec))
    return [(f"{kind} D{bd} d{d} {label}", spec) for label, spec in specs]


def _other_specs(kind):
    """Importance reduction (fp32 partials, once) and token reallocation."""
    import torch
    from . import importance_kernels as I
    from . import plans as P
    from . import reallocation_kernels as R
    from ..composition import REALLOCATION_GROUPS
    specs = []
    if kind == "fp16":
        for has_g in (False, True):
            part = torch.empty(2, 4, 100, dtype=torch.float32)
            g = torch.empty(2, 2, 25, dtype=torch.float32)
            src = torch.empty(100, dtype=torch.int64)
            out = torch.empty(2, 100, dtype=torch.float32)
            specs.append((f"importance has_g={int(has_g)}", (
                I._importance_reduce, 1, [part, g if has_g else part, src if has_g else part, out, 4, 2, 100, 25, 1,
                                          0.5, 0.5], dict(BLOCK=P.IMPORTANCE_BLOCK, HAS_G=has_g), 4)))
    if kind == "ieee":
        return specs  # the aggregation kernels do not use tf32: fp32 once
    dtype = getattr(torch, TORCH_DTYPES[kind])
    # channels: every BLOCK_C the forward picks (16..128); the ops pad C to a multiple of 16
    for C in (16, 32, 64, 96, 128, 256):
        for sizes in sorted(set(REALLOCATION_GROUPS.values()) | {(7, 3, 2)}):
            block_c, block_r = P.reallocation_blocks(C, sizes)
            x = torch.empty(2, 97, C, dtype=dtype)
            idx = torch.empty(2, 2, 97, dtype=torch.int64)
            w = torch.empty(sum(sizes), dtype=dtype)
            b = torch.empty(len(sizes), dtype=dtype)
            p, _, groups = P.reallocation_plan(97, sizes)
            out = torch.empty(2, 2, sum(groups), C, dtype=dtype)
            specs.append((f"aggregate_fwd C{C} R{block_r}", (
                R._aggregate_fwd, 1, [x, idx, w, b, out, x.stride(0), x.stride(1), 2, 97, C, sum(groups), 1, *p.values()],
                dict(BLOCK_R=block_r, BLOCK_C=block_c), 4)))
        p, _, groups = P.reallocation_plan(97, (7, 3, 2))
        dout = torch.empty(2, 2, sum(groups), C, dtype=dtype)
        x = torch.empty(2, 97, C, dtype=dtype)
        t = torch.empty(2, 2, 97, dtype=torch.float32)
        for two in (True, False):
            specs.append((f"aggregate_bwd C{C} two={int(two)}", (
                R._aggregate_bwd, 1, [x, idx, w, dout, x, t, x.stride(0), x.stride(1), *dout.stride()[:3],
                                      2, 97, C, sum(groups), 1, *p.values()],
                dict(TWO=two, BLOCK_T=P.REALLOCATION_BWD_BLOCKS[0], BLOCK_C=min(P.REALLOCATION_BWD_BLOCKS[1], 1 << (C - 1).bit_length())), 4)))
    return [(f"{kind} {label}", spec) for label, spec in specs]


def configurations():
    """(label, launch spec) of every configuration, before deduplication."""
    from . import plans as P
    out = []
    for kind in P.KINDS:
        for bd in P.HEAD_BLOCKS:
            # The ops zero-pad head dims to multiples of 16 (sgattn.triton.ops), so
            # every head dim the kernels see compiles as the padded size does.
            out += _attention_specs(kind, bd, bd)
        out += _other_specs(kind)
    return out


def _bind(spec, arch):
    """(ASTSource, options dict) exactly as JITFunction.run would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel, _grid, args, constexprs, num_warps = spec
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(constexprs, num_warps=num_warps, debug=False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, consts, attrs), options


def unique_configurations(arch=90):
    """Configurations deduplicated by what Triton would compile."""
    seen, out = set(), []
    for label, spec in configurations():
        src, options = _bind(spec, arch)
        key = (spec[0].__name__, str(src.signature), str(sorted(src.constants.items(), key=str)), str(src.attrs),
               spec[4])
        if key not in seen:
            seen.add(key)
            out.append((label, spec))
    return out


_PTXAS = [(re.compile(r"Used (\d+) registers"), "regs"),
          (re.compile(r"(\d+) bytes stack frame"), "stack"),
          (re.compile(r"(\d+) bytes spill stores"), "spill_st"),
          (re.compile(r"(\d+) bytes spill loads"), "spill_ld")]


def compile_one(label, spec, arch):
    """Compile one configuration; returns a dict of its numbers."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    src, options = _bind(spec, arch)
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    res = {"label": label, "arch": arch, "seconds": time.time() - t0, "shared": int(compiled.metadata.shared)}
    log = buf.getvalue()
    for rx, name in _PTXAS:
        m = rx.search(log)
        res[name] = int(m.group(1)) if m else -1
    ptx = compiled.asm["ptx"]
    res["mma"] = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
    return res


def verdict(res):
    """Reasons this configuration fails the gate (empty: it passes)."""
    from . import plans as P
    why = []
    if res["regs"] < 0:
        why.append("no ptxas log")
    if res["spill_st"] > 0 or res["spill_ld"] > 0:
        why.append(f"spills {res['spill_st']}/{res['spill_ld']} B")
    kind = res["label"].split()[0]
    if res["stack"] > 0 and kind in ("fp16", "bf16"):
        why.append(f"stack frame {res['stack']} B")
    if res["shared"] > MAX_SHARED[res["arch"]]:
        why.append(f"shared {res['shared']} B > sm_{res['arch']} limit {MAX_SHARED[res['arch']]}")
    m = re.match(r"(\w+) D(\d+) ", res["label"])
    table = P.SHARED_BYTES[(m.group(1), int(m.group(2)))] if m else P.SHARED_BYTES_AGGREGATE
    if res["shared"] > table:
        why.append(f"shared {res['shared']} B > plans.SHARED_BYTES entry {table}")
    return why


def _result_key(spec, arch):
    """Everything the compiled binary depends on: Triton version, target, the
    kernel's source hash (with its callees), signature, constexprs, attributes, options."""
    import hashlib
    import triton
    src, options = _bind(spec, arch)
    text = repr((triton.__version__, arch, spec[0].cache_key, sorted(src.signature.items()),
                 sorted(((str(k), repr(v)) for k, v in src.constants.items())),
                 sorted(((str(k), repr(v)) for k, v in src.attrs.items())), sorted(options.__dict__.items(), key=str)))
    return hashlib.sha256(text.encode()).hexdigest()


def _work(item):
    label, arch, index = item
    spec = _UNIQUE[index][1]
    cache = os.environ.get("SGATTN_COMPILE_CHECK_CACHE")
    try:
        if cache:
            import json
            path = os.path.join(cache, _result_key(spec, arch) + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    return dict(json.load(f), label=label, cached=True)
        res = compile_one(label, spec, arch)
        if cache:
            os.makedirs(cache, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(res, f)
            os.replace(path + ".tmp", path)
        return res
    except Exception as exc:  # report every failing configuration, not only the first
        return {"label": label, "arch": arch, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}


_UNIQUE: list = []


def _sampled(index, every):
    """``--sample K``: every K-th unique configuration, the heaviest first
    (the last of each run of K, so that every kind, head block and kernel
    family keeps members). K = 1: all of them (the full gate)."""
    return every <= 1 or index % every == every - 1


def main(argv):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the JIT functions")
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m sgattn.triton.compile_check",
        description="Compile every Triton kernel configuration the backend accepts for the given "
                    "architectures (no GPU needed) and check registers, spills, stack and shared memory.")
    parser.add_argument("archs", nargs="*", type=int, default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("-j", dest="jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--only", help="a regular expression the configuration labels must match")
    parser.add_argument("--sample", type=int, default=1, help="compile every K-th unique configuration")
    args = parser.parse_args(argv)
    jobs, only, sample, archs = args.jobs, args.only, args.sample, args.archs
    global _UNIQUE
    _UNIQUE = unique_configurations()
    items = [(label, arch, i) for arch in archs for i, (label, _) in enumerate(_UNIQUE)
             if (only is None or re.search(only, label)) and _sampled(i, sample)]
    print(f"{len(items)} configurations ({len(_UNIQUE)} per architecture), {jobs} processes", flush=True)
    t0 = time.time()
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs) as pool:
            results = pool.imap_unordered(_work, items)
            results = list(_report(results))
    else:
        results = list(_report(map(_work, items)))
    failures = sum(1 for r in results if r.get("error") or verdict(r))
    print(f"{failures} failures, {len(results)} compiled in {time.time() - t0:.0f} s")
    return 1 if failures else 0


def _report(results):
    print(f"{'':5} {'arch':6} {'regs':>4} {'spill':>9} {'stack':>6} {'shared':>7} {'mma':>5} {'s':>5}  config",
          flush=True)
    for r in results:
        if r.get("error"):
            print(f"FAIL  sm_{r['arch']}  {r['label']}: {r['error']}", flush=True)
        else:
            why = verdict(r)
            print(f"{'FAIL ' if why else 'ok   '} sm_{r['arch']} {r['regs']:4d} {r['spill_st']:4d}/{r['spill_ld']:<4d} "
                  f"{r['stack']:6d} {r['shared']:7d} {r['mma']:>5} {r['seconds']:5.1f}  {r['label']}"
                  + (f"  <- {'; '.join(why)}" if why else ""), flush=True)
        yield r


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
