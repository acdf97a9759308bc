"""Every Triton kernel configuration the backend accepts compiles for sm_80 and
sm_90 without a GPU (triton.compile + GPUTarget), with no register spills, no
stack frame in fp16/bf16 and shared memory within each architecture's opt-in
limit and within the table ``unsupported()`` uses (sgattn.triton.compile_check).

The check runs in a subprocess with TRITON_INTERPRET unset: under the
interpreter (which conftest turns on for CPU-only machines) the kernels are
interpreted functions that cannot be compiled. A fresh TRITON_CACHE_DIR, so
that nothing is served from a cache (ptxas must run to report its numbers).
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cache = tmp_path / "cache"
    cache.mkdir()
    return {**env, "TRITON_CACHE_DIR": str(cache)}


def test_specialisation_is_tritons(tmp_path):
    """The compile check binds arguments with Triton's launcher code: there is
    no last-dim stride (the kernels take none), strides and head dims divisible
    by 16 carry the divisibility attribute, others do not, and loop bounds are
    not specialised."""
    code = r"""
import torch
from sgattn.triton import compile_check as C, launch as A
torch.set_float32_matmul_precision("highest")
for d, expect in ((32, True), (24, False)):
    q, k, v = C._qkv(1, 2, 33, 40, d, torch.float16)
    out = A.new_out(q, d); lse = torch.empty(1, 2, 33)
    spec = A.forward_launches(q, k, v, out, lse, lse, 0.1, 0, None, False)[0]
    src, _ = C._bind(spec, 90)
    names = list(src.signature)
    attrs = {names[p[0]]: a for p, a in src.attrs.items()}
    # head stride (= d) and D itself: divisible by 16 for d = 32, not for 24
    assert bool(attrs["sqh"]) == expect and bool(attrs["D"]) == expect, (d, attrs)
    assert attrs["sqn"] and attrs["Q"], attrs  # h*d = 64 / 48 and an aligned pointer
    assert "sqd" not in src.signature  # no last-dim stride: the kernels take it as 1
    assert "N" not in attrs and "M" not in attrs and "H" not in attrs, attrs  # not specialised
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# The full gate is ~1400 compilations (698 unique configurations per architecture,
# 432 of them the attention-mass flag combinations; 1-5 s each): CI compiles
# every SAMPLE-th unique configuration (every kind, head block and kernel
# family keeps members); SGATTN_FULL_COMPILE_CHECK=1 runs all of them, as
# whoever changes a kernel or a plan must (with SGATTN_COMPILE_CHECK_CACHE
# set, unchanged configurations are not compiled again).
FULL = os.environ.get("SGATTN_FULL_COMPILE_CHECK") == "1"
SAMPLE = 1 if FULL else 3


def test_every_configuration_compiles_for_sm80_and_sm90(tmp_path):
    jobs = str(max(1, os.cpu_count() or 1))
    proc = subprocess.run([sys.executable, "-m", "sgattn.triton.compile_check", "-j", jobs,
                           "--sample", str(SAMPLE), *map(str, ARCHS)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and re.search(r"^0 failures", out, re.M), out[-6000:]
    head = re.search(r"(\d+) configurations \((\d+) per architecture\)", out)
    lines = [line for line in out.splitlines() if line.startswith(("ok ", "FAIL "))]
    per_arch = int(head.group(2)) if head else 0
    expected = len(ARCHS) * (per_arch if FULL else per_arch // SAMPLE)
    assert head and len(lines) == int(head.group(1)) == expected and per_arch > 200, out[-6000:]
    for line in lines:
        assert line.startswith("ok "), line
        # half precision and tf32 attention must use tensor cores: mma.sync on sm_80, wgmma (or mma) on sm_90
        if re.search(r"(fp16|bf16|tf32) D\d+", line):
            assert re.search(r" (wgmma|mma) ", line), line
