"""Benchmark measurement helpers and reporting, shared by the pytest suites
(``bench/conftest.py``) and the ``sgattn bench`` command.

A run is a list of *records*, one per (suite, case, mode, impl): the median
time, peak memory, FLOPs and minimal bytes of the case, or the reason it did
not run. ``finalize`` derives per record the speedups over the naive
implementation and over the best baseline of the same case, achieved
TFLOP/s and GB/s as fractions of the device's peaks (measured in the same
run by ``measure_peaks``), and the memory ratio to naive. ``write_results``
stores JSON, a markdown table (each ratio to naive with its min-max range and
a mark when the runs' spread makes it meaningless) and two small PNG plots,
speed-up and memory against resolution (when matplotlib is importable), in a
folder the caller names, and never overwrites a file: a second run of
the same day gets a new name.

Part of the installed package, so that ``sgattn bench`` runs from a normal
(non-editable) install; ``bench/report.py`` of a checkout re-exports it.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

# Default results folder (relative to the working directory): never the repository's committed bench/results.
RESULTS_DIR = Path("sgattn-bench-results")
NAIVE = "naive"
# impl names that are baselines (everything else is an sgattn candidate).
BASELINE_PREFIXES = ("naive", "compile(naive)", "sdpa", "flex", "timm:")


# A ratio to naive is not meaningful when either side's runs spread more than
# SPREAD_LIMIT (max/min), when the two min-max intervals overlap (the ratio's
# range includes 1), or when either side has fewer than MIN_ROUNDS timed runs.
SPREAD_LIMIT = 1.25
MIN_ROUNDS = 3


def is_baseline(impl: str) -> bool:
    return impl.startswith(BASELINE_PREFIXES)


def ratio_to_naive(rec: dict, naive_rec: dict) -> dict:
    """naive's median over ``rec``'s (the speed-up), its range (naive's min over
    rec's max, naive's max over rec's min) and ``noise``: why the ratio is not
    meaningful, or None."""
    ratio = naive_rec["median_s"] / rec["median_s"]
    reasons = []
    rounds = min(rec.get("rounds") or 0, naive_rec.get("rounds") or 0)
    if rounds < MIN_ROUNDS:
        reasons.append(f"{rounds} rounds")
    if all(r.get("min_s") and r.get("max_s") for r in (rec, naive_rec)):
        lo, hi = naive_rec["min_s"] / rec["max_s"], naive_rec["max_s"] / rec["min_s"]
        spread = max(rec["max_s"] / rec["min_s"], naive_rec["max_s"] / naive_rec["min_s"])
        if spread > SPREAD_LIMIT:
            reasons.append(f"runs spread {spread:.2f}x (max/min)")
        if lo <= 1.0 <= hi:
            reasons.append("range includes 1.0")
    else:
        lo = hi = None
        reasons.append("no min/max recorded")
    return {"ratio": ratio, "lo": lo, "hi": hi, "noise": ", ".join(reasons) or None}


# ---------------------------------------------------------------- device ----

def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    name = device_name(device)
    if device.type == "cpu":
        name = "cpu-" + name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import sgattn
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
        "sgattn": sgattn.__version__, "git_commit": git_commit(), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backends": {k: v for k, v in sgattn.available_backends().items()},
    }


# ---------------------------------------------------------------- timing ----

def time_once(fn, device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def time_median(fn, device, *, min_rounds=3, max_rounds=100, target_s=0.5, warmup=1) -> tuple[float, int]:
    """Median wall time of ``fn`` (synchronised) and the rounds used: at least
    ``min_rounds``, more while the total stays under ``target_s``."""
    for _ in range(warmup):
        time_once(fn, device)
    first = time_once(fn, device)
    rounds = rounds_for(first, min_rounds, max_rounds, target_s)
    times = [first] + [time_once(fn, device) for _ in range(rounds - 1)]
    return statistics.median(times), len(times)


def time_stats(fn, device, *, min_rounds=3, max_rounds=100, target_s=0.5, warmup=1) -> dict:
    """Like ``time_median`` but returns ``{"min_s", "median_s", "max_s", "rounds"}``."""
    for _ in range(warmup):
        time_once(fn, device)
    first = time_once(fn, device)
    rounds = rounds_for(first, min_rounds, max_rounds, target_s)
    times = [first] + [time_once(fn, device) for _ in range(rounds - 1)]
    return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times), "rounds": len(times)}


def rounds_for(single_s: float, min_rounds=3, max_rounds=100, target_s=0.5) -> int:
    return int(max(min_rounds, min(max_rounds, target_s / max(single_s, 1e-6))))


# ---------------------------------------------------------------- memory ----

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for its dynamic threshold (64-bit)


class _MeasuredMalloc:
    """While measuring a resident-set peak: large CPU allocations go to mmap
    and return to the OS when freed, and freed heap memory is trimmed first,
    so the peak is this case's. Afterwards the threshold is 32 MiB, where
    glibc's dynamic threshold settles in a long-running process: the timed
    calls then reuse memory as a user's process does instead of page-faulting
    every large tensor in (which a 1 MiB threshold would make them do)."""

    def __init__(self):
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def __enter__(self):
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
            self.libc.malloc_trim(0)
        return self

    def __exit__(self, *exc):
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        return False


def _proc_status(key):
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024 if m else None


def peak_memory(fn, device) -> int | None:
    """Bytes of memory ``fn`` needs at its peak above what was allocated before
    it. CUDA: the caching allocator's peak. CPU: the resident-set high-water
    mark (reset through /proc/self/clear_refs; None where unsupported)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _MeasuredMalloc():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _proc_status("VmRSS")
            fn()
            return max(0, _proc_status("VmHWM") - base)
        except OSError:
            fn()
            return None


# ----------------------------------------------------------------- peaks ----

def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """The device's compute and memory ceilings, measured now: a large matmul
    (bf16 on GPU, fp32 on CPU) and a large copy (bytes read + written)."""
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = (1024 if quick else 2048), torch.float32, (64 << 20 if quick else 256 << 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm, _ = time_median(lambda: a @ b, device, min_rounds=3, max_rounds=20, target_s=0.3 if quick else 1.0)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_cp, _ = time_median(lambda: dst.copy_(src), device, min_rounds=3, max_rounds=50,
                          target_s=0.3 if quick else 1.0)
    del a, b, src, dst
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n,
            "flops_per_s": 2 * n ** 3 / t_mm, "copy_bytes": copy_bytes,
            "bytes_per_s": 2 * copy_bytes / t_cp}


# -------------------------------------------------------------- records ----

def record(suite, case, mode, impl, *, median_s=None, rounds=None, peak_bytes=None, flops=None,
           bytes_moved=None, images=None, shape=None, skipped=None, **extra) -> dict:
    return {"suite": suite, "case": case, "mode": mode, "impl": impl, "median_s": median_s, "rounds": rounds,
            "peak_bytes": peak_bytes, "flops": flops, "bytes": bytes_moved, "images": images,
            "shape": shape, "skipped": skipped, **extra}


def finalize(records: list[dict], peaks: dict | None) -> list[dict]:
    """Add derived metrics in place (and return the list)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["suite"], r["case"], r["mode"]), []).append(r)
    for rs in groups.values():
        timed = [r for r in rs if r.get("median_s")]
        naive = next((r for r in timed if r["impl"] == NAIVE), None)
        # timm models compute another function: not a baseline for speedups
        base = [r for r in timed if is_baseline(r["impl"]) and not r["impl"].startswith("timm:")]
        best = min(base, key=lambda r: r["median_s"]) if base else None
        for r in rs:
            t = r.get("median_s")
            if not t:
                continue
            r["speedup_vs_naive"] = naive["median_s"] / t if naive else None
            if naive and r is not naive:
                vs = ratio_to_naive(r, naive)
                r["speedup_range"] = [vs["lo"], vs["hi"]] if vs["lo"] is not None else None
                r["speedup_noise"] = vs["noise"]
            others = [b for b in base if b is not r]
            best_other = min(others, key=lambda b: b["median_s"]) if others else None
            r["best_baseline"] = best_other["impl"] if best_other else None
            r["speedup_vs_best_baseline"] = best_other["median_s"] / t if best_other else None
            r["is_best_baseline"] = best is r
            if r.get("images"):
                r["images_per_s"] = r["images"] / t
            if r.get("flops"):
                r["tflops"] = r["flops"] / t / 1e12
                r["frac_flops_peak"] = r["flops"] / t / peaks["flops_per_s"] if peaks else None
            if r.get("bytes"):
                r["gbps"] = r["bytes"] / t / 1e9
                r["frac_bw_peak"] = r["bytes"] / t / peaks["bytes_per_s"] if peaks else None
            fr = [f for f in (r.get("frac_flops_peak"), r.get("frac_bw_peak")) if f is not None]
            r["frac_dominant_peak"] = max(fr) if fr else None
            if naive and naive.get("peak_bytes") and r.get("peak_bytes") is not None:
                r["mem_ratio_vs_naive"] = r["peak_bytes"] / naive["peak_bytes"]
    return records


def _fmt(v, spec, default="-"):
    return default if v is None else format(v, spec)


def _speedup_text(r: dict) -> str:
    """'2.60 (2.21-3.13)': the ratio to naive and its min-max range."""
    text = _fmt(r.get("speedup_vs_naive"), ".2f")
    if r.get("speedup_range"):
        text += " ({:.3g}-{:.3g})".format(*r["speedup_range"])
    return text


NOISE_NOTE = (f"A ratio to naive is marked NOT MEANINGFUL when either side's runs spread more than "
              f"{SPREAD_LIMIT}x (max/min), when the min-max intervals of the two overlap (the range of the "
              f"ratio includes 1.0) or with fewer than {MIN_ROUNDS} timed rounds; x naive shows the median ratio "
              "and, in brackets, its range (naive's min over this row's max, naive's max over this row's min).")


def markdown_table(records: list[dict]) -> str:
    head = ("| suite | case | mode | impl | median ms | rounds | img/s | x naive (range) | ratio | x best baseline "
            "| TFLOP/s (% peak) | GB/s (% peak) | peak MiB | mem / naive |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r.get("skipped"):
            lines.append(f"| {r['suite']} | {r['case']} | {r['mode']} | {r['impl']} | skipped: "
                         f"{str(r['skipped'])[:90]} | | | | | | | | | |")
            continue
        noise = r.get("speedup_noise")
        verdict = f"**NOT MEANINGFUL**: {noise}" if noise else ("ok" if "speedup_noise" in r else "-")
        best = r.get("speedup_vs_best_baseline")
        best_s = f"{best:.2f} ({r['best_baseline']})" if best is not None else "-"
        tf = (f"{r['tflops']:.3g} ({100 * r['frac_flops_peak']:.1f}%)"
              if r.get("tflops") is not None and r.get("frac_flops_peak") is not None else "-")
        gb = (f"{r['gbps']:.3g} ({100 * r['frac_bw_peak']:.1f}%)"
              if r.get("gbps") is not None and r.get("frac_bw_peak") is not None else "-")
        mem = _fmt(r["peak_bytes"] / 2 ** 20 if r.get("peak_bytes") is not None else None, ".1f")
        lines.append(
            f"| {r['suite']} | {r['case']} | {r['mode']} | {r['impl']} | {_fmt(1e3 * r['median_s'], '.3f')} "
            f"| {_fmt(r.get('rounds'), 'd')} | {_fmt(r.get('images_per_s'), '.1f')} | {_speedup_text(r)} "
            f"| {verdict} | {best_s} | {tf} | {gb} | {mem} | {_fmt(r.get('mem_ratio_vs_naive'), '.3f')} |")
    return "\n".join(lines)


def ratio_table(records: list[dict]) -> str:
    """A short plain-text table for the console: every sgattn row's ratio to
    naive with its range, '!' marking the ratios that are not meaningful."""
    rows = [r for r in records if r.get("speedup_vs_naive") is not None and not is_baseline(r["impl"])]
    if not rows:
        return "no sgattn row has a naive row to compare with"
    width = max(len(r["case"]) for r in rows)
    lines = ["sgattn vs naive (x naive: naive's median time / this row's; range from min/max; "
             "'!' = not meaningful)",
             f"  {'suite':<11} {'case':<{width}} {'mode':<7} {'impl':<18} {'x naive':>8} {'range':>13}"]
    for r in rows:
        rng = "{:.3g}-{:.3g}x".format(*r["speedup_range"]) if r.get("speedup_range") else "-"
        noise = r.get("speedup_noise")
        lines.append(f"{'!' if noise else ' '} {r['suite']:<11} {r['case']:<{width}} {r['mode']:<7} "
                     f"{r['impl']:<18} {r['speedup_vs_naive']:>7.3g}x {rng:>13}" + (f"  {noise}" if noise else ""))
    bad = sum(1 for r in rows if r.get("speedup_noise"))
    if bad:
        lines.append(f"! {bad} of {len(rows)} ratios are not meaningful (runs spread over {SPREAD_LIMIT}x, "
                     f"min-max intervals overlap, or under {MIN_ROUNDS} rounds): rerun them on a quiet machine "
                     "or with more rounds (SGATTN_BENCH_ROUNDS)")
    return "\n".join(lines)


def header_text(env: dict, peaks: dict | None) -> str:
    s = (f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; commit {env['git_commit']}; "
         f"{env['date']}")
    if peaks:
        s += (f"\n\nmeasured peaks (this run): {peaks['matmul_dtype']} matmul "
              f"{peaks['flops_per_s'] / 1e12:.2f} TFLOP/s, copy {peaks['bytes_per_s'] / 1e9:.1f} GB/s "
              "(read + write)")
    return s


SERIES = {("model", "infer"): "model inference", ("model", "train"): "model training step",
          ("hybrid", "fwd"): "hybrid-scale op, fwd", ("hybrid", "fwdbwd"): "hybrid-scale op, fwd+bwd",
          ("self_guided", "fwd"): "self-guided op, fwd", ("self_guided", "fwdbwd"): "self-guided op, fwd+bwd",
          ("stage4", "fwd"): "stage-4 attention, fwd", ("stage4", "fwdbwd"): "stage-4 attention, fwd+bwd"}


def plotted_impl(records: list[dict]) -> str | None:
    """The sgattn row the plots show: the backend automatic dispatch prefers among those timed."""
    from .backends import PREFERENCE
    timed = {r["impl"] for r in records if r.get("speedup_vs_naive") is not None}
    return next((f"sgattn:{b}" for b in PREFERENCE if f"sgattn:{b}" in timed), None)


def _gmean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def plot_series(records: list[dict], key: str) -> dict:
    """{series label: [(pixels, resolution label, value, lo, hi, noisy)]} for
    ``plotted_impl``'s rows of SG-Former-S (ops: the S/M stage shapes). ``key``
    is a record field (``speedup_vs_naive`` or ``mem_ratio_vs_naive``); the
    stages of an op at one resolution are combined by their geometric mean,
    noisy when any of them is."""
    impl = plotted_impl(records)
    points: dict[tuple, list[dict]] = {}
    for r in records:
        shape = r.get("shape") or {}
        # (a zero memory ratio, a peak below the resident set's resolution, has no place on a log axis)
        if (r["impl"] != impl or not r.get(key) or (r["suite"], r["mode"]) not in SERIES
                or shape.get("variant") not in ("S/M", "sgformer_s") or not shape.get("resolution")):
            continue
        points.setdefault((r["suite"], r["mode"], tuple(shape["resolution"])), []).append(r)
    series: dict[str, list] = {}
    order = list(SERIES)
    for (suite, mode, res), rs in sorted(points.items(), key=lambda kv: (order.index(kv[0][:2]), kv[0][2])):
        value = _gmean([r[key] for r in rs])
        ranges = [r.get("speedup_range") for r in rs]
        lo, hi = (_gmean([x[0] for x in ranges]), _gmean([x[1] for x in ranges])) \
            if key == "speedup_vs_naive" and all(ranges) else (None, None)
        noisy = key == "speedup_vs_naive" and any(r.get("speedup_noise") for r in rs)
        series.setdefault(SERIES[(suite, mode)], []).append(
            (res[0] * res[1], "x".join(map(str, res)) if res[0] != res[1] else str(res[0]), value, lo, hi, noisy))
    return series


def plot(records: list[dict], path: Path, key: str, ylabel: str, device: str = "") -> str | None:
    """One small plot: ``key`` of ``plotted_impl`` against resolution, one
    line per suite and mode (log-log; error bars: the ratio's min-max range;
    hollow markers: not meaningful). Returns None on success or the reason no
    plot was made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: matplotlib is not importable ({type(exc).__name__})"
    series = plot_series(records, key)
    if not series:
        return f"no {key} plot: no sgattn row of SG-Former-S has a naive row to compare with"
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ticks = {}
    for i, (label, pts) in enumerate(series.items()):
        pts.sort()
        colour = f"C{i}"
        xs, ys = [p[0] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, color=colour, lw=1.2, label=label)
        for x, res, y, lo, hi, noisy in pts:
            ticks[x] = res
            if lo is not None:
                ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], color=colour, lw=0.8, capsize=2)
            ax.plot([x], [y], "o", color=colour, mfc="white" if noisy else colour, ms=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.minorticks_off()
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("input resolution (pixels per side)")
    ax.set_ylabel(ylabel)
    note = "; hollow = ratio not meaningful (spread)" if key == "speedup_vs_naive" else ""
    ax.set_title(f"{plotted_impl(records)} vs naive, SG-Former-S shapes{note}\n{device}", fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


PLOTS = {"speedup": ("speedup_vs_naive", "speed-up over naive (x, higher is better)"),
         "memory": ("mem_ratio_vs_naive", "peak memory / naive's (lower is better)")}


def write_results(records: list[dict], env: dict, peaks: dict | None, out_dir: Path | str = RESULTS_DIR,
                  stem: str | None = None, notes: list[str] | None = None) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md``, ``<stem>-speedup.png`` and
    ``<stem>-memory.png`` (stem defaults to ``<device>-<date>``) into
    ``out_dir``. Existing files are never overwritten: the stem gets a ``-2``,
    ``-3``... suffix instead. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        dev = torch.device("cuda" if env["device_type"] == "cuda" else "cpu")
        stem = f"{device_slug(dev)}-{env['date'][:10]}"
    base, n = stem, 1
    names = ["{}.json", "{}.md"] + [f"{{}}-{q}.png" for q in PLOTS]
    while any((out_dir / name.format(stem)).exists() for name in names):
        n += 1
        stem = f"{base}-{n}"
    notes = list(notes or [])
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    for question, (key, ylabel) in PLOTS.items():
        path = out_dir / f"{stem}-{question}.png"
        why_not = plot(records, path, key, ylabel, device=env["device"])
        if why_not is None:
            paths[f"png_{question}"] = path
        else:
            notes.append(why_not)
    paths["json"].write_text(json.dumps({"env": env, "peaks": peaks, "notes": notes, "records": records},
                                        indent=1, default=str))
    md = [f"# sgattn benchmarks: {env['device']}", "", header_text(env, peaks), ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    noisy = [r for r in records if r.get("speedup_noise")]
    if noisy:
        md += [f"**{len(noisy)} of {sum('speedup_noise' in r for r in records)} ratios to naive are not "
               f"meaningful** (column 'ratio'). {NOISE_NOTE}", ""]
    else:
        md += [NOISE_NOTE, ""]
    md += [markdown_table(records), ""]
    paths["md"].write_text("\n".join(md))
    return paths


def load_records(path: Path | str):
    """Records, env and peaks from a ``records.jsonl`` a run left behind."""
    records, env, peaks = [], None, None
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "_env" in item:
            env = item["_env"]
        elif "_peaks" in item:
            peaks = item["_peaks"]
        else:
            records.append(item)
    return records, env, peaks


def main(argv=None):
    """python -m sgattn._report RECORDS.jsonl [OUT_DIR]: rebuild the JSON,
    markdown and plot of a run that was cut short."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__)
        return 2
    path = Path(argv[0])
    records, env, peaks = load_records(path)
    if env is None:
        env = environment(resolve_device(None))
    finalize(records, peaks)
    paths = write_results(records, env, peaks, out_dir=argv[1] if len(argv) > 1 else path.parent,
                          notes=["rebuilt from records.jsonl (the run may have been cut short)"])
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
