"""The ``sgattn`` command (also ``python -m sgattn``).

    sgattn --version
    sgattn info                       backends (with the reason one cannot run), device, versions
    sgattn check [--device D] [--backend NAME] [--skip-compile]
                                      correctness self-test of every kernel backend, every dtype,
                                      against the plain-PyTorch reference and float64
    sgattn bench [--quick] [--device cpu|cuda] [--batch B] [--size S] [--save DIR]
                                      SG-Former-S inference: sgattn vs the naive implementation,
                                      and the importance map of the first hybrid-scale block
    sgattn viz IMAGE [--checkpoint PTH] --out FILE.png
                                      importance maps and token reallocation drawn over an image
    sgattn demo [--steps N] [--out DIR]
                                      train a small SG-Former and show its importance evolve
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from pathlib import Path

import torch

# ------------------------------------------------------------------- info ---


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception as exc:
        tv = f"not importable ({type(exc).__name__})"
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": tv,
            "cuda (torch build)": torch.version.cuda or "none"}


def _extensions_line() -> str:
    """Which native extensions are built; says so when the CUDA one is built
    but this machine has no GPU to run it (e.g. nvcc present, no driver)."""
    from sgattn._native import load_extension
    parts = []
    for module, what in (("sgattn._C", "CPU kernels"), ("sgattn._C_cuda", "CUDA kernels")):
        built = load_extension(module) is None
        parts.append(f"{module} ({what}) {'built' if built else 'not built'}")
        if module == "sgattn._C_cuda" and built and not torch.cuda.is_available():
            parts[-1] += ", but no GPU is present: the cuda backend stays unused here"
    return "; ".join(parts)


def cmd_info(args) -> int:
    import sgattn
    from sgattn.backends import PREFERENCE, capability_table, forced_backend
    print(f"sgattn {sgattn.__version__}")
    for k, v in _versions().items():
        print(f"{k:>18}: {v}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"{'device':>18}: cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"{'device':>18}: cpu only ({torch.get_num_threads()} threads); no CUDA device visible")
    print(f"{'native extensions':>18}: {_extensions_line()}")
    print(f"{'forced backend':>18}: {forced_backend() or 'none (automatic dispatch)'}")
    print(f"backends (dispatch order {', '.join(PREFERENCE)}):")
    for name, why in sgattn.available_backends().items():
        print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    print("capabilities:\n  " + "\n  ".join(capability_table()))
    return 0


# ------------------------------------------------------------------ check ---

def cmd_check(args) -> int:
    import sgattn
    from sgattn import testing
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    available = [n for n, why in sgattn.available_backends().items() if why is None]
    # The reference is the oracle: a kernel backend is checked against it (same dtype) and float64;
    # the reference itself only against float64, and only when asked for.
    names = [n for n in available if n != "reference"]
    if args.backend:
        if args.backend not in available:
            print(f"backend {args.backend!r} is not available here: "
                  f"{sgattn.available_backends().get(args.backend, 'unknown backend')}")
            return 1
        names = [args.backend]
    if not names:
        print("no kernel backend is available here (only the reference, which is the oracle); "
              "`sgattn info` says why. `sgattn check --backend reference` checks it against float64.")
        return 1
    print(f"sgattn check on {device}: backends {', '.join(names)}; dtypes "
          f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    # the rows of the test suite's agreement table marked for the command, judged by the same rule
    cases = [c for c in testing.CASES if c.check]
    failures = checked = 0
    t0 = time.time()
    for dtype in dtypes:
        for case in cases:
            if dtype not in case.dtypes:
                continue
            for name in names:
                label = f"{name:<10} {str(dtype).replace('torch.', ''):<8} {case.name}"
                try:
                    verdicts = testing.compare(case, name, dtype, device)
                except testing.Skipped as exc:
                    print(f"  skip {label}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - reported, not raised
                    failures += 1
                    print(f"  FAIL {label}: raised {type(exc).__name__}: {exc}")
                    continue
                checked += 1
                problems = [str(v) for v in verdicts if not v.ok]
                if problems:
                    failures += 1
                    print(f"  FAIL {label}: " + "; ".join(problems))
                else:
                    print(f"  ok   {label}")
    for name in names:
        for label, problem in _check_user_paths(name, device, compile_too=not args.skip_compile):
            checked += 1
            failures += problem is not None
            print(f"  {'FAIL' if problem else 'ok  '} {name:<10} {label}" + (f": {problem}" if problem else ""))
    print(f"{checked} checks, {failures} failures in {time.time() - t0:.1f} s")
    return 1 if failures or not checked else 0


def _check_user_paths(name, device, compile_too=True):
    """The ways users run the ops: under torch.autocast (bf16), each case must
    equal the op on bf16-cast inputs; under torch.compile (inductor,
    fullgraph), the hybrid-scale case must equal eager, forward and backward.
    Yields (label, None or what went wrong)."""
    import sgattn
    from sgattn import testing
    cases = [c for c in testing.CASES if c.check]
    runs = {}
    for case in cases:
        inputs, fn = case.make(torch.Generator().manual_seed(case.seed()), device)
        inputs = [t.float() for t in inputs]
        runs[case.name] = (inputs, fn)
        label = f"autocast bf16 {case.name}"
        try:
            with sgattn.use_backend(name):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    got = testing.forward_backward(fn, inputs, cot_gen=torch.Generator().manual_seed(1))
                want = testing.forward_backward(fn, [t.bfloat16() for t in inputs], got[2])
            same = all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
            yield label, None if same else "differs from the op on bf16-cast inputs"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            yield label, f"raised {type(exc).__name__}: {exc}"
    if not compile_too:
        return
    case_name = next(c.name for c in cases if c.name.startswith("hybrid"))
    inputs, fn = runs[case_name]
    label = f"torch.compile inductor fullgraph {case_name}"
    try:
        torch._dynamo.reset()
        with sgattn.use_backend(name):
            got = testing.forward_backward(torch.compile(fn, fullgraph=True), inputs,
                                           cot_gen=torch.Generator().manual_seed(1))
            want = testing.forward_backward(fn, inputs, got[2])
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            if a is not None or b is not None:
                torch.testing.assert_close(a, b)
        yield label, None
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        yield label, f"{type(exc).__name__}: {str(exc)[:500]}"


# ------------------------------------------------------------------ bench ---


def load_report():
    """The benchmark reporting module (``sgattn._report``, part of the package)."""
    from . import _report
    return _report


NAIVE_WHAT = ("naive = sgattn.naive: the authors' algorithm in plain PyTorch (their Attention module, "
              "every attention matrix materialised; NCHW convolutions as in their code); sgattn:<backend> = "
              "sgattn's SG-Former-S (its attention modules, channels-last convolutions) with the same weights")


def importance_stats(mask) -> dict:
    """Statistics of the first hybrid block's importance map (row-major [B, N]):
    min/max/mean, and the entropy of the map normalised to a distribution
    over tokens (mean over images), also as a fraction of log N (1 = uniform)."""
    m = mask.detach().double()
    p = m / m.sum(dim=1, keepdim=True)
    ent = -(p * p.clamp_min(1e-300).log()).sum(dim=1)
    n = m.shape[1]
    return {"min": m.min().item(), "max": m.max().item(), "mean": m.mean().item(),
            "entropy": ent.mean().item(), "entropy_over_log_n": (ent / math.log(n)).mean().item(), "tokens": n}


def ratio_line(rec: dict, naive_rec: dict) -> str:
    """'<impl> vs naive: R x (range lo-hi x)', with a warning when the spread
    of the runs makes the ratio meaningless (``sgattn._report.ratio_to_naive``)."""
    vs = load_report().ratio_to_naive(rec, naive_rec)
    line = f"{rec['impl']} vs naive: {vs['ratio']:.2f}x (range {vs['lo']:.2f}-{vs['hi']:.2f}x)"
    if vs["noise"]:
        line += f"  WARNING: {vs['noise']}: this ratio is not meaningful on this (busy?) machine; rerun without --quick"
    return line


def cmd_bench(args) -> int:
    import sgattn
    from sgattn import naive
    report = load_report()
    device = report.resolve_device(args.device)
    cpu = device.type == "cpu"
    # On a CPU attention is ~11% of SG-Former-S at 224 and dominates at high resolution: the default
    # CPU case is high resolution, where sgattn's attention (and its memory bound) matters.
    size = args.size or ((384 if args.quick else 896) if cpu else 224)
    batch = args.batch or (1 if cpu else (8 if args.quick else 64))
    rounds = dict(min_rounds=3, max_rounds=3, target_s=0.0) if args.quick else \
        dict(min_rounds=3, max_rounds=20 if cpu else 100, target_s=2.0)
    t_start = time.time()
    peaks = report.measure_peaks(device, quick=args.quick)
    torch.manual_seed(0)
    ref_model = naive.naive_sgformer("sgformer_s", strict=False).to(device).eval()
    model = sgattn.models.sgformer_s().to(device).eval()
    model.load_state_dict(ref_model.state_dict())
    x = torch.randn(batch, 3, size, size, device=device)
    flops = None
    try:
        flops = _model_flops(naive, size) * batch
    except Exception:
        pass
    backends = [n for n, why in sgattn.available_backends().items() if why is None
                and not (cpu and n == "triton")]
    impls = [("naive", ref_model, None)] + [(f"sgattn:{n}", model, n) for n in backends]
    case = f"sgformer_s-{size}-b{batch}"
    records = []
    captured = {}
    def keep_mask(module, inputs, output):  # returns None: the output is left as it is
        captured.setdefault("mask", output[1][0].detach())

    hook = model.block1[0].attn.register_forward_hook(keep_mask)
    print(f"sgattn bench: sgformer_s at {size}x{size}, batch {batch}, on {device} "
          f"({'bf16 autocast' if not cpu else 'fp32'}); {NAIVE_WHAT}", flush=True)
    for impl, net, backend in impls:
        def call(net=net, backend=backend):
            amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                   else contextlib.nullcontext())
            with torch.no_grad(), amp, (sgattn.use_backend(backend) if backend else contextlib.nullcontext()):
                return net(x)
        try:
            peak = report.peak_memory(call, device)
            st = report.time_stats(call, device, warmup=0, **rounds)
        except Exception as exc:
            records.append(report.record("model", case, "infer", impl, skipped=f"{type(exc).__name__}: {exc}"))
            continue
        print(f"  {impl:<18} min {st['min_s'] * 1e3:9.1f} ms  median {st['median_s'] * 1e3:9.1f} ms  "
              f"max {st['max_s'] * 1e3:9.1f} ms  ({st['rounds']} runs)", flush=True)
        records.append(report.record("model", case, "infer", impl, median_s=st["median_s"], rounds=st["rounds"],
                                     min_s=st["min_s"], max_s=st["max_s"], peak_bytes=peak,
                                     flops=flops, images=batch,
                                     shape={"variant": "sgformer_s", "resolution": [size, size], "batch": batch}))
    hook.remove()
    report.finalize(records, peaks)
    env = report.environment(device)
    print(report.header_text(env, peaks))
    print()
    print(report.markdown_table(records))
    naive_rec = next((r for r in records if r["impl"] == "naive" and r.get("median_s")), None)
    for r in records:
        if naive_rec is not None and r is not naive_rec and r.get("median_s"):
            print(ratio_line(r, naive_rec))
    if "mask" in captured:
        s = importance_stats(captured["mask"])
        print(f"\nimportance map of block1[0] (hybrid-scale, {s['tokens']} tokens, sgattn model): "
              f"min {s['min']:.4g}  max {s['max']:.4g}  mean {s['mean']:.4g}  entropy {s['entropy']:.4f} nats "
              f"({s['entropy_over_log_n']:.4f} of uniform)")
    if args.save:
        paths = report.write_results(records, env, peaks, out_dir=args.save)
        print("written: " + ", ".join(str(p) for p in paths.values()))
    else:
        print("\n(results not written: pass --save DIR)")
    print(f"({NAIVE_WHAT}; random weights; {time.time() - t_start:.1f} s)")
    ok = any(r.get("median_s") and r["impl"].startswith("sgattn:") for r in records)
    return 0 if ok else 1


def _model_flops(naive, size):
    from torch.utils.flop_counter import FlopCounterMode
    model = naive.naive_sgformer("sgformer_s", strict=False).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops()


# ------------------------------------------------------------------- main ---


def cmd_viz(args) -> int:
    from . import viz
    try:
        summary = viz.visualize(args.image, args.out, checkpoint=args.checkpoint, variant=args.model,
                                size=args.size, max_blocks=args.blocks)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        print(f"sgattn viz: {exc}", file=sys.stderr)
        return 1
    if not args.checkpoint:
        print("note: random weights (no --checkpoint): the maps show an untrained model")
    print(f"image {summary['image_shape'][1]}x{summary['image_shape'][0]}; importance per hybrid-scale block "
          "(cv = std/mean, 0 for a uniform map; top10 = share of importance in the top 10% of tokens):")
    for b in summary["blocks"]:
        flag = "  near-uniform" if b["near_uniform"] else ""
        print(f"  {b['block']:<16} {b['tokens']:>6} tokens  cv {b['cv']:.4f}  top10 {b['top10_share']:.3f}{flag}")
    uniform = sum(b["near_uniform"] for b in summary["blocks"])
    if uniform:
        print(f"note: {uniform} of {len(summary['blocks'])} maps are near-uniform (cv < {viz.NEAR_UNIFORM_CV}): "
              "their colours in the picture are noise, not structure")
    print(f"written: {summary['path']}")
    return 0


def cmd_demo(args) -> int:
    from . import demo
    try:
        result = demo.run(steps=args.steps, out_dir=args.out, seed=args.seed, batch=args.batch,
                          verbose=True)
    except ImportError as exc:
        print(f"sgattn demo: {exc}", file=sys.stderr)
        return 1
    return 0 if result["after"]["share"] > result["before"]["share"] else 2


def _version() -> str:
    import sgattn
    return f"sgattn {sgattn.__version__} (torch {torch.__version__})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sgattn", description="sgattn: kernel-accelerated SG-Former attention")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="backends, device and versions")
    p = sub.add_parser("check", help="correctness self-test of every kernel backend and dtype against the reference")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--backend", default=None, help="check only this backend ('reference': against float64)")
    p.add_argument("--skip-compile", action="store_true",
                   help="skip the torch.compile (inductor) check, which takes about a minute on a small CPU")
    p = sub.add_parser("bench", help="SG-Former-S inference: sgattn vs naive on this device")
    p.add_argument("--quick", action="store_true", help="small and fast (about a minute on a 2-core CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="input resolution (square)")
    p.add_argument("--save", default=None, metavar="DIR", help="write JSON/markdown/PNG results to DIR")
    p = sub.add_parser("viz", help="draw importance maps and token reallocation over an image")
    p.add_argument("image", help="image file, or sample:china / sample:flower (photos bundled with scikit-learn)")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--checkpoint", default=None, help="weights (.pth in the authors' layouts, or .safetensors)")
    p.add_argument("--model", default="sgformer_s", choices=["sgformer_s", "sgformer_m", "sgformer_b"])
    p.add_argument("--size", type=int, default=224, help="shorter image side fed to the model")
    p.add_argument("--blocks", type=int, default=6, help="how many hybrid-scale blocks to draw")
    p = sub.add_parser("demo", help="train a small SG-Former to find digits in clutter; importance evolves")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sgattn-demo", metavar="DIR", help="where the PNG and JSON go")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench, "viz": cmd_viz,
            "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
