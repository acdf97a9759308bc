"""Benchmark measurement helpers and reporting, shared by the pytest suites
(``bench/conftest.py``) and the ``sgattn bench`` command.

A run is a list of *records*, one per (suite, case, mode, impl): the median
time, peak memory, FLOPs and minimal bytes of the case, or the reason it did
not run. ``finalize`` derives per record the speedups over the naive
implementation and over the best baseline of the same case, achieved
TFLOP/s and GB/s as fractions of the device's peaks (measured in the same
run by ``measure_peaks``), and the memory ratio to naive. ``write_results``
stores JSON + a markdown table + a PNG plot (when matplotlib is importable)
in a folder the caller names, and never overwrites a file: a second run of
the same day gets a new name.

Part of the installed package, so that ``sgattn bench`` runs from a normal
(non-editable) install; ``bench/report.py`` of a checkout re-exports it.
"""
from __future__ import annotations

import ctypes
import datetime
import json
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


def is_baseline(impl: str) -> bool:
    return impl.startswith(BASELINE_PREFIXES)


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


def markdown_table(records: list[dict]) -> str:
    head = ("| suite | case | mode | impl | median ms | img/s | x naive | x best baseline | TFLOP/s (% peak) "
            "| GB/s (% peak) | peak MiB | mem / naive |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r.get("skipped"):
            lines.append(f"| {r['suite']} | {r['case']} | {r['mode']} | {r['impl']} | skipped: "
                         f"{str(r['skipped'])[:90]} | | | | | | | |")
            continue
        best = r.get("speedup_vs_best_baseline")
        best_s = f"{best:.2f} ({r['best_baseline']})" if best is not None else "-"
        tf = (f"{r['tflops']:.3g} ({100 * r['frac_flops_peak']:.1f}%)"
              if r.get("tflops") is not None and r.get("frac_flops_peak") is not None else "-")
        gb = (f"{r['gbps']:.3g} ({100 * r['frac_bw_peak']:.1f}%)"
              if r.get("gbps") is not None and r.get("frac_bw_peak") is not None else "-")
        mem = _fmt(r["peak_bytes"] / 2 ** 20 if r.get("peak_bytes") is not None else None, ".1f")
        lines.append(
            f"| {r['suite']} | {r['case']} | {r['mode']} | {r['impl']} | {_fmt(1e3 * r['median_s'], '.3f')} "
            f"| {_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('speedup_vs_naive'), '.2f')} | {best_s} "
            f"| {tf} | {gb} | {mem} | {_fmt(r.get('mem_ratio_vs_naive'), '.3f')} |")
    return "\n".join(lines)


def header_text(env: dict, peaks: dict | None) -> str:
    s = (f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; commit {env['git_commit']}; "
         f"{env['date']}")
    if peaks:
        s += (f"\n\nmeasured peaks (this run): {peaks['matmul_dtype']} matmul "
              f"{peaks['flops_per_s'] / 1e12:.2f} TFLOP/s, copy {peaks['bytes_per_s'] / 1e9:.1f} GB/s "
              "(read + write)")
    return s


def plot(records: list[dict], path: Path) -> str | None:
    """Speedup over naive vs resolution (op suites, forward, stage 1 cases).
    Returns None on success or the reason no plot was made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: matplotlib is not importable ({type(exc).__name__})"
    lines: dict[tuple, list[tuple[int, float, str]]] = {}
    for r in records:
        if r.get("speedup_vs_naive") is None or r["impl"] == NAIVE or not r.get("shape"):
            continue
        res = r["shape"].get("resolution")
        if res is None:
            continue
        key = (r["suite"], r["mode"], r["shape"].get("variant"), r["shape"].get("stage"), r["impl"])
        lines.setdefault(key, []).append((res[0] * res[1], r["speedup_vs_naive"], f"{res[0]}x{res[1]}"))
    if not lines:
        return "no plot: no case has a speedup over naive"
    fig, ax = plt.subplots(figsize=(10, 6))
    for key, pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=" ".join(str(k) for k in key if k is not None))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xlabel("input pixels (224^2 ... 1024^2)")
    ax.set_ylabel("speedup over naive")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_results(records: list[dict], env: dict, peaks: dict | None, out_dir: Path | str = RESULTS_DIR,
                  stem: str | None = None, notes: list[str] | None = None) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (stem defaults to
    ``<device>-<date>``) into ``out_dir``. Existing files are never
    overwritten: the stem gets a ``-2``, ``-3``... suffix instead. Returns the
    paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if stem is None:
        dev = torch.device("cuda" if env["device_type"] == "cuda" else "cpu")
        stem = f"{device_slug(dev)}-{env['date'][:10]}"
    base, n = stem, 1
    while any((out_dir / f"{stem}.{ext}").exists() for ext in ("json", "md", "png")):
        n += 1
        stem = f"{base}-{n}"
    notes = list(notes or [])
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    why_not = plot(records, out_dir / f"{stem}.png")
    if why_not is None:
        paths["png"] = out_dir / f"{stem}.png"
    else:
        notes.append(why_not)
    paths["json"].write_text(json.dumps({"env": env, "peaks": peaks, "notes": notes, "records": records},
                                        indent=1, default=str))
    md = [f"# sgattn benchmarks: {env['device']}", "", header_text(env, peaks), ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
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
