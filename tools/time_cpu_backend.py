"""Quick timing: backend "cpu" vs "reference" on SG-Former-S shapes at 224 (CPU tensors).

Usage: python tools/time_cpu_backend.py [--threads N] [--batch B] [--reps R]
Prints the best time of forward (and forward+backward) for each op and the speedup.

python tools/time_cpu_backend.py --issue11 [--threads N] [--reps R] [--only I,J]
times attention_with_importance on the cpu backend against
F.scaled_dot_product_attention (which computes no importance; window shapes run
it on pre-partitioned windows) at the issue-11 shapes, forward and
forward+backward, interleaved, and prints min/median/max.
With --threads 1 it measures the calling thread's CPU time (time.thread_time),
which preemption on a shared machine does not inflate; otherwise wall time.

python tools/time_cpu_backend.py --bwd [--old DIR] [--rounds K] [--threads N] [--reps R]
times the cpu backend's attention backward alone (autograd.grad of a saved
forward, float32) at the SG-Former-S attention shapes at 224 (batch 8) and
896 (batch 1) and prints min/median/max. With --old DIR it alternates K
processes running DIR's sgattn (another checkout with its extension built)
with K running this one, and reports both over all their samples.

python tools/time_cpu_backend.py --models [--threads N] [--reps R]
times sgformer_s inference at 896x896 and a training step at 512x512 (batch 1):
the naive model, sgattn's model on the cpu backend, and the naive model with
channels-last convolutions, interleaved (wall time).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from sgattn import composition, reference
from sgattn.backends import get_backend

SHAPES = [
    # name, op, kwargs builder
    ("stage1 HSA global  B,h,N,M,d=B,1,3136,49,32", "attn", dict(h=1, N=3136, M=49, d=32)),
    ("stage1 HSA window  B,h,N,d=B,1,3136,32 w7", "win", dict(h=1, N=3136, d=32, hw=(56, 56))),
    ("stage1 SGA global  B,h,N,M,d=B,2,3136,60,32", "attn", dict(h=2, N=3136, M=60, d=32)),
    ("stage2 HSA window  B,h,N,d=B,2,784,32 w7", "win", dict(h=2, N=784, d=32, hw=(28, 28))),
    ("stage3 SGA global  B,h,N,M,d=B,8,196,147,32", "attn", dict(h=8, N=196, M=147, d=32)),
    ("stage4 plain       B,h,N,M,d=B,16,49,49,32", "attn", dict(h=16, N=49, M=49, d=32)),
    ("stage1 realloc sr8 G,B,N,C=2,B,3136,64", "agg", dict(N=3136, C=64, sr=8)),
    ("stage3 realloc sr2 G,B,N,C=2,B,196,256", "agg", dict(N=196, C=256, sr=2)),
]


def bench(fn, reps, clock):
    fn()
    times = []
    for _ in range(reps):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)  # best of reps: the shared CI/dev machines are noisy


def make(kind, B, dtype, cfg, grad):
    if kind in ("attn", "win"):
        M = cfg.get("M", cfg["N"])
        q = torch.randn(B, cfg["h"], cfg["N"], cfg["d"], dtype=dtype, requires_grad=grad)
        k = torch.randn(B, cfg["h"], M, cfg["d"], dtype=dtype, requires_grad=grad)
        v = torch.randn(B, cfg["h"], M, cfg["d"], dtype=dtype, requires_grad=grad)
        kw = dict(window=7, hw=cfg["hw"]) if kind == "win" else {}
        return lambda be: be.attention(q, k, v, **kw)
    groups = composition.REALLOCATION_GROUPS[cfg["sr"]]
    x = torch.randn(B, cfg["N"], cfg["C"], dtype=dtype, requires_grad=grad)
    idx = torch.stack([torch.argsort(torch.rand(B, cfg["N"]), -1) for _ in range(2)])
    w = [torch.randn(r, dtype=dtype, requires_grad=grad) for r in groups]
    b = [torch.randn(1, dtype=dtype, requires_grad=grad) for _ in groups]
    return lambda be: (be.aggregate_sorted(x, idx, w, b), None)


ISSUE11 = [
    # name, (B, h, N, M, d), window grid or None
    ("stage-1 global half at 224", (8, 1, 3136, 49, 32), None),
    ("1024x1024 global (sr 8)", (2, 1, 65536, 1024, 32), None),
    ("self-guided at 512", (1, 2, 16384, 1254, 32), None),
    ("stage-1 window 7 at 224", (8, 1, 3136, 3136, 32), (56, 56)),
    ("self-guided stage 3 at 896", (1, 8, 3136, 2352, 32), None),
    ("self-guided stage 1 at 896", (1, 2, 50176, 960, 32), None),
]


def issue11(args, clock):
    import torch.nn.functional as F

    cpu = get_backend("cpu")
    only = [int(i) for i in args.only.split(",")] if args.only else range(len(ISSUE11))
    print(f"{'shape':44s} {'pass':8s} {'cpu ms min/med/max':>26s} {'sdpa ms min/med/max':>26s} {'ratio(med)':>10s}")
    for i in only:
        name, (B, h, N, M, d), hw = ISSUE11[i]
        g = torch.Generator().manual_seed(0)
        for grad in (False, True):
            q, k, v = (torch.randn(B, h, n, d, generator=g, requires_grad=grad) for n in (N, M, M))
            if hw:
                kw = dict(window=7, hw=hw)
                part = lambda t: reference.window_partition(t.detach(), 7, hw).transpose(1, 2).reshape(-1, h, 49, d)  # noqa: E731
                qs, ks, vs = (part(t).requires_grad_(grad) for t in (q, k, v))
            else:
                kw = {}
                qs, ks, vs = q, k, v
            do = torch.randn(B, h, N, d, generator=g)
            dos = part(do) if hw else do

            def run_cpu():
                out, imp = cpu.attention(q, k, v, **kw)
                if grad:
                    out.backward(do)

            def run_sdpa():
                out = F.scaled_dot_product_attention(qs, ks, vs)
                if grad:
                    out.backward(dos)

            run_cpu(), run_sdpa()
            tc, ts = [], []
            for _ in range(args.reps):
                for fn, acc in ((run_cpu, tc), (run_sdpa, ts)):
                    t = clock()
                    with torch.set_grad_enabled(grad):
                        fn()
                    acc.append((clock() - t) * 1e3)
            fmt = lambda a: f"{min(a):8.2f}/{statistics.median(a):8.2f}/{max(a):8.2f}"  # noqa: E731
            print(f"{name + ' ' + str((B, h, N, M, d)):44s} {'fwd+bwd' if grad else 'fwd':8s} {fmt(tc):>26s} "
                  f"{fmt(ts):>26s} {statistics.median(tc) / statistics.median(ts):9.2f}x", flush=True)


BWD_SHAPES = [
    # name, (B, h, N, M, d), window grid or None. 896: the 224 shapes' tokens and keys x 16, batch 1.
    ("224 stage1 HSA global", (8, 1, 3136, 49, 32), None),
    ("224 stage1 HSA window", (8, 1, 3136, 3136, 32), (56, 56)),
    ("224 stage1 SGA global", (8, 2, 3136, 60, 32), None),
    ("224 stage2 HSA window", (8, 2, 784, 784, 32), (28, 28)),
    ("224 stage3 SGA global", (8, 8, 196, 147, 32), None),
    ("224 stage4 plain", (8, 16, 49, 49, 32), None),
    ("896 stage1 HSA global", (1, 1, 50176, 784, 32), None),
    ("896 stage1 HSA window", (1, 1, 50176, 50176, 32), (224, 224)),
    ("896 stage1 SGA global", (1, 2, 50176, 960, 32), None),
    ("896 stage2 HSA window", (1, 2, 12544, 12544, 32), (112, 112)),
    ("896 stage3 SGA global", (1, 8, 3136, 2352, 32), None),
    ("896 stage4 plain", (1, 16, 784, 784, 32), None),
]


def bwd_samples(args, clock):
    """{shape name: [ms, ...]}: the attention backward alone, args.reps times per shape."""
    cpu = get_backend("cpu")
    res = {}
    for name, (B, h, N, M, d), hw in BWD_SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, n, d, generator=g, requires_grad=True) for n in (N, M, M))
        do = torch.randn(B, h, N, d, generator=g)
        out = cpu.attention(q, k, v, **(dict(window=7, hw=hw) if hw else {}))[0]
        grad = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
        grad()
        times = []
        for _ in range(args.reps):
            t = clock()
            grad()
            times.append((clock() - t) * 1e3)
        res[name] = times
    return res


def bwd(args, clock):
    fmt = lambda a: f"{min(a):9.2f}/{statistics.median(a):9.2f}/{max(a):9.2f}"  # noqa: E731
    if not args.old:
        samples = bwd_samples(args, clock)
        if args.json:
            return print(json.dumps(samples))
        for name, shape, _ in BWD_SHAPES:
            print(f"{name:24s} {str(shape):28s} backward ms min/med/max {fmt(samples[name])}")
        return None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"old": os.path.abspath(args.old), "new": here}
    samples = {tree: {} for tree in trees}
    cmd = [sys.executable, os.path.abspath(__file__), "--bwd", "--json", "--threads", str(args.threads),
           "--reps", str(args.reps)]
    for _ in range(args.rounds):
        for tree, path in trees.items():  # alternating processes: old, new, old, new, ...
            out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, check=True, capture_output=True,
                                 text=True).stdout
            for name, ts in json.loads(out.splitlines()[-1]).items():
                samples[tree].setdefault(name, []).extend(ts)
    print(f"old = {trees['old']}, new = {trees['new']}; {args.rounds} alternating processes each")
    print(f"{'shape':24s} {'(B, h, N, M, d)':28s} {'old ms min/med/max':>30s} {'new ms min/med/max':>30s} "
          f"{'old/new (med)':>13s}")
    for name, shape, _ in BWD_SHAPES:
        o, n = samples["old"][name], samples["new"][name]
        print(f"{name:24s} {str(shape):28s} {fmt(o):>30s} {fmt(n):>30s} "
              f"{statistics.median(o) / statistics.median(n):12.2f}x", flush=True)
    return None


def models(args):
    """sgformer_s inference at 896x896 and a training step at 512x512, batch 1:
    the naive model (the authors' attention, NCHW convolutions as in their
    code), sgattn's model on the cpu backend (channels-last convolutions) and,
    to separate the two effects, the naive model with channels-last
    convolutions; same weights, interleaved, wall time."""
    import torch.nn.functional as F

    import sgattn
    from sgattn import naive

    torch.manual_seed(0)
    ref = naive.naive_sgformer("sgformer_s", strict=False)
    own = sgattn.models.sgformer_s()
    own.load_state_dict(ref.state_dict())
    ref_cl = naive.naive_sgformer("sgformer_s", strict=False, channels_last=True)
    ref_cl.load_state_dict(ref.state_dict())
    impls = {"naive": ref, "sgattn:cpu": own, "naive, channels-last convs": ref_cl}
    for mode, res in (("infer", 896), ("train", 512)):
        x, y = torch.randn(1, 3, res, res), torch.tensor([1])

        def step(model):
            with sgattn.use_backend("cpu"):
                if mode == "infer":
                    model.eval()
                    with torch.no_grad():
                        model(x)
                else:
                    model.train()
                    F.cross_entropy(model(x), y).backward()

        times = {k: [] for k in impls}
        for model in impls.values():
            step(model)
        for _ in range(args.reps):
            for k, model in impls.items():
                t = time.perf_counter()
                step(model)
                times[k].append(time.perf_counter() - t)
        base = statistics.median(times["naive"])
        for k, ts in times.items():
            print(f"sgformer_s {mode} {res}x{res} b1  {k:28s} min/med/max {min(ts) * 1e3:8.0f}/"
                  f"{statistics.median(ts) * 1e3:8.0f}/{max(ts) * 1e3:8.0f} ms   naive/this "
                  f"{base / statistics.median(ts):.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--issue11", action="store_true", help="issue-11 shapes against SDPA")
    ap.add_argument("--only", default="", help="with --issue11: comma-separated shape indices")
    ap.add_argument("--models", action="store_true",
                    help="sgformer_s 896 inference / 512 training: naive vs sgattn:cpu, interleaved")
    ap.add_argument("--bwd", action="store_true", help="attention backward alone at 224 and 896")
    ap.add_argument("--old", default="", help="with --bwd: a checkout to compare with, in alternating processes")
    ap.add_argument("--rounds", type=int, default=3, help="with --bwd --old: processes per checkout")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # --bwd child output
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    cpu, ref = get_backend("cpu"), get_backend("reference")
    batch = "" if (args.issue11 or args.models or args.bwd) else f", batch {args.batch}"  # those fix their own shapes
    if not args.json:
        print(f"torch {torch.__version__}, threads {args.threads}{batch}; {args.reps} repetitions, "
              f"{'thread CPU time' if args.threads == 1 and not args.models else 'wall time'}")
    if args.bwd:
        return bwd(args, clock)
    if args.issue11:
        return issue11(args, clock)
    if args.models:
        return models(args)
    print(f"{'shape':48s} {'dtype':9s} {'pass':8s} {'reference ms':>12s} {'cpu ms':>9s} {'speedup':>8s}")
    for name, kind, cfg in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (False, True):
                run = make(kind, args.batch, dtype, cfg, grad)

                def step(be):
                    out = run(be)[0]
                    if grad:
                        out.float().square().mean().backward()

                t_ref = bench(lambda: step(ref), args.reps, clock)
                t_cpu = bench(lambda: step(cpu), args.reps, clock)
                print(f"{name:48s} {str(dtype)[6:]:9s} {'fwd+bwd' if grad else 'fwd':8s} "
                      f"{t_ref * 1e3:12.2f} {t_cpu * 1e3:9.2f} {t_ref / t_cpu:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
