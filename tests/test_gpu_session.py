"""bench/gpu_session.sh's plumbing, on a machine without a GPU: the dry run
collects what each GPU stage would run, reports it "skipped: no GPU", writes
every file the device would return (at most 8, at most 2 folders deep) and
prints the summary last; a failing or starved stage is named and fails the run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ("build", "tests", "bench", "sanitizer")
FILES = {"summary.txt", "build.log", "tests.txt", "tests.xml", "bench.txt", "sanitizer.txt", "bench/records.jsonl"}


def _session(tmp_path, **env):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    return r, out


def _stage_lines(summary):
    return {line.split()[0]: line for line in summary.splitlines() if line.split()[:1] and line.split()[0] in STAGES}


def test_dry_run_writes_every_file_and_the_summary_last(tmp_path):
    r, out = _session(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == FILES
    assert len(files) <= 8 and all(f.count("/") <= 2 for f in files)  # what the device returns
    summary = (out / "summary.txt").read_text()
    assert r.stdout.endswith(summary)  # printed last
    assert "(dry run)" in summary and "torch" in summary
    lines = _stage_lines(summary)
    assert list(lines) == list(STAGES)
    assert all("skipped: no GPU" in line for line in lines.values()), summary
    # the GPU stages collected what they would run: the test files in order, the headline bench cases
    n_tests = int(re.search(r"(\d+) tests? collected", lines["tests"]).group(1))
    assert n_tests > 100, lines["tests"]
    tests_txt = (out / "tests.txt").read_text()
    order = ["test_cuda_build", "test_backend_agreement", "test_fuzz", "test_triton.py", "test_triton_modules", "test_autocast"]
    firsts = [tests_txt.index(f"tests/{name}") for name in order]
    assert firsts == sorted(firsts), "GPU test files out of order"
    assert "testsuite" in (out / "tests.xml").read_text()
    bench_txt = (out / "bench.txt").read_text()
    assert "S/M-s1-224-b64" in bench_txt and "sgformer_s-1024-b2" in bench_txt
    assert "sgattn:reference" not in bench_txt and "sdpa+colsum" in bench_txt and "compile(naive)" in bench_txt
    assert "nothing to sanitize" in (out / "sanitizer.txt").read_text()


@pytest.mark.parametrize("env,expect", [
    ({"SESSION_S": "0"}, "timeout"),                   # no time left: every stage is cut, none is silent
    ({"PYTHON": "false"}, "FAIL (exit 1)"),            # a stage whose command fails
])
def test_failed_or_starved_stages_are_named_and_fail_the_run(tmp_path, env, expect):
    r, out = _session(tmp_path, **env)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    lines = _stage_lines((out / "summary.txt").read_text())
    assert lines["build"].split()[1] == "skipped:"
    assert all(expect in lines[s] for s in ("tests", "bench", "sanitizer")), lines
