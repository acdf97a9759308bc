"""pytest-benchmark plumbing for the sgattn suites.

    pytest bench/ --benchmark-only        # time everything, write <out>/<device>-<date>.*
    pytest bench/ --benchmark-disable     # smoke: every case runs once, nothing is written

Environment: SGATTN_BENCH_SHAPES=smoke|cpu|full (default: full on a GPU, cpu
otherwise; smoke whenever --benchmark-disable is given and none is set),
SGATTN_BENCH_DEVICE=cpu|cuda, SGATTN_BENCH_BUDGET_S (skip cases that would
start after this many seconds), SGATTN_BENCH_OUT (results folder; default
./sgattn-bench-results; existing result files are never overwritten),
SGATTN_BENCH_ROUNDS (force the number of timed rounds, e.g. 1 for huge CPU cases).
Each finished case prints a progress line (time so far, case, median); the run
ends with a short table of every sgattn row's ratio to naive with its min-max
range, marking ratios that the spread of the runs makes meaningless.
Each case is recorded (median, peak memory, FLOPs, bytes) and appended to
``<out>/records.jsonl`` as it finishes, so a run cut short keeps what it
measured (``python bench/report.py <out>/records.jsonl`` rebuilds the tables).
"""
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases  # noqa: E402
import report  # noqa: E402

STATE = {"start": time.time(), "records": [], "peaks": None, "device": None, "disabled": False, "config": None}


def pytest_configure(config):
    STATE["config"] = config
    disabled = bool(config.getoption("benchmark_disable", False))
    STATE["disabled"] = disabled
    if disabled and not os.environ.get("SGATTN_BENCH_SHAPES"):
        os.environ["SGATTN_BENCH_SHAPES"] = "smoke"
    STATE["device"] = report.resolve_device(os.environ.get("SGATTN_BENCH_DEVICE"))
    STATE["out"] = Path(os.environ.get("SGATTN_BENCH_OUT") or report.RESULTS_DIR)
    STATE["jsonl"] = None
    if not disabled:
        STATE["out"].mkdir(parents=True, exist_ok=True)
        STATE["jsonl"] = STATE["out"] / "records.jsonl"
        STATE["jsonl"].write_text("")


def pytest_collection_modifyitems(session, config, items):
    """The issue's target cases first, then by resolution: a time budget cuts
    the least important cases."""
    def key(item):
        cs = getattr(item, "callspec", None)
        shape = cs.params.get("shape") if cs else None
        suite = "model" if "model" in item.module.__name__ else "op"
        cpu = STATE["device"].type == "cpu"
        return cases.priority(suite, shape, models_first=cpu) if isinstance(shape, dict) else (9,)
    items.sort(key=key)


@pytest.fixture(scope="session")
def device():
    return STATE["device"]


@pytest.fixture(scope="session")
def shapes(device):
    return cases.shape_set(device_type=device.type)


@pytest.fixture(scope="session")
def peaks(device):
    if STATE["disabled"]:
        return None
    if STATE["peaks"] is None:
        STATE["peaks"] = report.measure_peaks(device)
        _write_line({"_peaks": STATE["peaks"]})
        _write_line({"_env": report.environment(device)})
    return STATE["peaks"]


def _write_line(item):
    if STATE["jsonl"] is not None:
        with open(STATE["jsonl"], "a") as f:
            f.write(json.dumps(item, default=str) + "\n")


def _save(rec):
    STATE["records"].append(rec)
    _write_line(rec)
    _progress(rec)


def _progress(rec):
    """One line per finished case, shown live (pytest captures prints in tests)."""
    config = STATE["config"]
    tr = config.pluginmanager.get_plugin("terminalreporter") if config else None
    if tr is None or STATE["disabled"]:
        return
    what = (f"median {1e3 * rec['median_s']:.2f} ms ({rec['rounds']} rounds)" if rec.get("median_s")
            else f"skipped: {str(rec.get('skipped'))[:80]}")
    line = (f"[{time.time() - STATE['start']:7.0f} s, {len(STATE['records'])} done] {rec['suite']} "
            f"{rec['case']} {rec['mode']} {rec['impl']}: {what}")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line(line)
    else:
        tr.write_line(line)


class Runner:
    """Times one case with pytest-benchmark and records it."""

    def __init__(self, benchmark, device, peaks):
        self.benchmark, self.device, self.peaks = benchmark, device, peaks
        self.disabled = STATE["disabled"]

    def skip(self, suite, case, mode, impl, why, shape=None):
        _save(report.record(suite, case, mode, impl, skipped=why, shape=shape))
        pytest.skip(why)

    def __call__(self, suite, case, mode, impl, fn, *, shape=None, flops=None, bytes_moved=None, images=None):
        budget = float(os.environ.get("SGATTN_BENCH_BUDGET_S") or 0)
        if budget and time.time() - STATE["start"] > budget:
            self.skip(suite, case, mode, impl, f"time budget of {budget:.0f} s spent", shape)
        device = self.device
        bm = self.benchmark
        bm.group = f"{suite} {case} {mode}"
        bm.extra_info.update(impl=impl, flops=flops, bytes=bytes_moved)

        def timed():
            fn()
            report.synchronize(device)

        try:
            if STATE["disabled"]:
                bm.pedantic(timed, rounds=1)
                return
            peak = report.peak_memory(fn, device)  # also the first (compiling) call
            cpu = device.type == "cpu"
            forced = int(os.environ.get("SGATTN_BENCH_ROUNDS") or 0)
            if forced:  # e.g. very large CPU cases: the peak-memory call is the only warm-up
                rounds = forced
            else:
                single = report.time_once(fn, device)
                # the peak-memory call and the single call are the warm-up on a CPU
                # at least MIN_ROUNDS: fewer say nothing about the spread, and the ratio is marked meaningless
                rounds = report.rounds_for(single, report.MIN_ROUNDS if cpu else 5, 10 if cpu else 200,
                                           1.0 if cpu else 0.5)
            bm.pedantic(timed, rounds=rounds, warmup_rounds=0 if cpu or forced else 1, iterations=1)
        except Exception as exc:
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)
            expected = oom or type(exc).__name__ in ("BackendError", "NotImplementedError")
            if oom and device.type == "cuda":
                torch.cuda.empty_cache()
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            _save(report.record(suite, case, mode, impl, skipped=("" if expected else "ERROR ") + msg, shape=shape))
            if expected:
                pytest.skip(msg)
            raise
        stats = bm.stats.stats
        _save(report.record(suite, case, mode, impl, median_s=stats.median, min_s=stats.min, max_s=stats.max,
                            rounds=rounds, peak_bytes=peak, flops=flops, bytes_moved=bytes_moved, images=images, shape=shape))


@pytest.fixture
def run_case(benchmark, device, peaks):
    return Runner(benchmark, device, peaks)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """After pytest-benchmark's wide tables: write the results and end with the
    short table of ratios to naive, noisy ratios marked."""
    tr = terminalreporter
    if STATE["disabled"] or not STATE["records"]:
        tr.write_line("sgattn bench: benchmarks disabled (smoke run) or nothing timed: no results written")
        return
    env = report.environment(STATE["device"])
    env["shape_set"] = os.environ.get("SGATTN_BENCH_SHAPES") or ("full" if STATE["device"].type == "cuda" else "cpu")
    records = report.finalize(STATE["records"], STATE["peaks"])
    paths = report.write_results(records, env, STATE["peaks"], out_dir=STATE["out"])
    tr.section("sgattn: ratios to naive")
    tr.write_line(report.ratio_table(records))
    tr.write_line(f"({env['device']}; {time.time() - STATE['start']:.0f} s in all)")
    tr.write_line("sgattn bench results: " + ", ".join(str(p) for p in paths.values()))
