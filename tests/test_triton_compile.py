"""Every Triton kernel configuration SG-Former S/M/B uses compiles to PTX for
sm_80 and sm_90, without a GPU (triton.compile + GPUTarget).

The check runs in subprocesses with TRITON_INTERPRET unset: under the
interpreter (which conftest turns on for CPU-only machines) the kernels are
interpreted functions that cannot be compiled. One process per architecture,
each with a fresh TRITON_CACHE_DIR, so nothing is served from a cache.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)


def test_every_sgformer_configuration_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for arch in ARCHS:
        cache = tmp_path / f"cache{arch}"
        cache.mkdir()
        procs[arch] = subprocess.Popen(
            [sys.executable, "-m", "sgattn.triton.compile_check", str(arch)],
            env={**env, "TRITON_CACHE_DIR": str(cache)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
    # the expected number of configurations, counted here with the interpreter's view of the module
    code = "from sgattn.triton.compile_check import configurations as c; print(len(c()))"
    expected = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout)
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        lines = [line for line in out.splitlines() if line.startswith(("ok ", "FAIL "))]
        assert proc.returncode == 0 and out.rstrip().endswith("0 failures"), out[-4000:]
        assert len(lines) == expected and all(line.startswith("ok ") for line in lines), out[-4000:]
        # half-precision attention must use tensor cores: mma.sync on sm_80, wgmma on sm_90
        mma = "wgmma" if arch == 90 else "mma"
        for line in lines:
            if "attn" in line and "fp32" not in line:
                assert f", {mma}," in line, line
