"""The sgattn command: info, check and bench --quick run on this machine."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sgattn(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the command as a user runs it, not under the test interpreter
    return subprocess.run([sys.executable, "-m", "sgattn", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_info():
    r = sgattn("info")
    assert r.returncode == 0, r.stderr
    assert "reference  available" in r.stdout
    assert "torch" in r.stdout and "backends" in r.stdout


def test_version_and_bare_command():
    import sgattn as pkg
    r = sgattn("--version")
    assert r.returncode == 0 and f"sgattn {pkg.__version__}" in r.stdout
    r = sgattn()
    assert r.returncode == 0 and "usage: sgattn" in r.stdout
    for cmd in ("info", "check", "bench", "viz", "demo"):
        assert cmd in r.stdout


def test_check_reference_against_float64_in_every_dtype():
    r = sgattn("check", "--backend", "reference")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failures" in r.stdout
    assert "dtypes float32, bfloat16, float16" in r.stdout
    assert all(f"reference  {dt}" in r.stdout for dt in ("float32 ", "bfloat16", "float16 "))


def test_check_every_available_backend():
    r = sgattn("check")
    import sgattn as pkg
    kernels = [n for n, why in pkg.available_backends().items() if why is None and n not in ("reference", "triton")]
    if not kernels:
        assert r.returncode == 1 and "no kernel backend" in r.stdout
        return
    # the reference is the oracle, not a candidate; every dtype is checked, on the CPU too
    assert "reference  float32" not in r.stdout and "bfloat16" in r.stdout and "float16" in r.stdout
    # and the paths users take: autocast on every case, torch.compile (inductor) on one
    assert all(f"ok   {n:<10} autocast bf16" in r.stdout for n in kernels), r.stdout
    assert all(f"ok   {n:<10} torch.compile inductor" in r.stdout for n in kernels), r.stdout
    summary = r.stdout.strip().splitlines()[-1]
    assert "checks" in summary, r.stdout + r.stderr
    # exit status and summary agree; a failure names the backend, op and error
    assert (r.returncode == 0) == (" 0 failures" in summary), r.stdout
    assert r.returncode == 0, "sgattn check found backends off the reference:\n" + "\n".join(
        line for line in r.stdout.splitlines() if "FAIL" in line)


def test_check_rejects_unknown_backend():
    r = sgattn("check", "--backend", "nope")
    assert r.returncode == 1


def test_bench_quick(tmp_path):
    r = sgattn("bench", "--quick", "--device", "cpu", "--size", "128", "--save", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| naive |" in r.stdout and "sgattn:reference" in r.stdout
    assert "naive = sgattn.naive" in r.stdout  # says what naive is
    assert "min" in r.stdout and "median" in r.stdout and "max" in r.stdout
    assert "vs naive:" in r.stdout and "range" in r.stdout
    assert "importance map of block1[0]" in r.stdout and "entropy" in r.stdout
    first = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".json") for n in first) and any(n.endswith(".md") for n in first)
    # a second run the same day writes new files, never over the first run's
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = sgattn("bench", "--quick", "--device", "cpu", "--size", "64", "--save", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_bench_ratio_warns_when_the_spread_makes_it_meaningless():
    from sgattn.cli import ratio_line
    naive = {"impl": "naive", "min_s": 1.00, "median_s": 1.02, "max_s": 1.05, "rounds": 3}
    steady = {"impl": "sgattn:cpu", "min_s": 0.50, "median_s": 0.51, "max_s": 0.52, "rounds": 3}
    noisy = {"impl": "sgattn:cpu", "min_s": 0.50, "median_s": 0.9, "max_s": 1.30, "rounds": 3}
    assert "2.00x" in ratio_line(steady, naive) and "WARNING" not in ratio_line(steady, naive)
    line = ratio_line(noisy, naive)
    assert "WARNING" in line and "range includes 1.0" in line and "runs spread 2.60x" in line
    line = ratio_line(dict(steady, rounds=2), naive)  # two runs say nothing about the spread
    assert "WARNING: 2 rounds" in line


def test_bench_runs_from_an_installed_package_without_the_checkout(tmp_path):
    # sgattn bench no longer needs bench/report.py: the reporting module is part of the package
    from sgattn import _report
    assert Path(_report.__file__).parent.name == "sgattn"
    assert not Path(_report.RESULTS_DIR).is_absolute()  # defaults to the working directory, not bench/results


def test_info_says_when_the_cuda_extension_is_built_but_no_gpu_is_present():
    import torch
    from sgattn._native import load_extension
    r = sgattn("info")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "native extensions" in line)
    built = load_extension("sgattn._C_cuda") is None
    assert ("sgattn._C_cuda (CUDA kernels) built" in line) == built
    assert ("but no GPU is present" in line) == (built and not torch.cuda.is_available())


def test_bench_report_marks_noisy_ratios_and_draws_one_plot_per_question(tmp_path):
    import torch
    from sgattn import _report

    def rec(impl, res, times, rounds=5, peak=100):
        return _report.record("model", f"sgformer_s-{res}-b1", "infer", impl, median_s=sorted(times)[1],
                              min_s=min(times), max_s=max(times), rounds=rounds, peak_bytes=peak,
                              shape={"variant": "sgformer_s", "resolution": [res, res], "batch": 1})
    records = [rec("naive", 224, (0.98, 1.0, 1.02), peak=200), rec("sgattn:cpu", 224, (0.49, 0.5, 0.51)),
               rec("naive", 512, (0.7, 1.0, 1.5)), rec("sgattn:cpu", 512, (0.8, 0.9, 1.2)),
               rec("naive", 896, (9.9, 10.0, 10.1), rounds=2), rec("sgattn:cpu", 896, (3.9, 4.0, 4.1), rounds=2)]
    _report.finalize(records, None)
    steady, noisy, few = records[1], records[3], records[5]
    assert steady["speedup_noise"] is None
    assert steady["speedup_range"] == pytest.approx([0.98 / 0.51, 1.02 / 0.49])
    assert "range includes 1.0" in noisy["speedup_noise"] and "runs spread 2.14x" in noisy["speedup_noise"]
    assert few["speedup_noise"] == "2 rounds"
    table = _report.ratio_table(records).splitlines()
    rows = [line for line in table if "sgformer_s-" in line]
    assert [line[0] for line in rows] == [" ", "!", "!"] and "2 of 3 ratios are not meaningful" in table[-1]
    assert max(len(line) for line in table[:-1]) < 140  # readable in a terminal, unlike pytest-benchmark's
    paths = _report.write_results(records, _report.environment(torch.device("cpu")), None, out_dir=tmp_path)
    md = paths["md"].read_text()
    assert "**2 of 3 ratios to naive are not meaningful**" in md and md.count("**NOT MEANINGFUL**") == 2
    assert "| 2.00 (1.92-2.08) | ok |" in md
    assert _report.plot_series(records, "speedup_vs_naive")["model inference"][2][5] is True  # hollow marker
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    PIL = pytest.importorskip("PIL.Image", reason="reading the plots needs Pillow")
    for question in ("speedup", "memory"):
        with PIL.open(paths[f"png_{question}"]) as png:
            assert png.size == (700, 360)  # small: one question per plot
