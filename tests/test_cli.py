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


def test_check_reference_passes():
    r = sgattn("check", "--backend", "reference")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failures" in r.stdout


def test_check_every_available_backend():
    r = sgattn("check")
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
    r = sgattn("bench", "--quick", "--device", "cpu", "--save", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| naive |" in r.stdout and "sgattn:reference" in r.stdout
    assert "importance map of block1[0]" in r.stdout and "entropy" in r.stdout
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))
