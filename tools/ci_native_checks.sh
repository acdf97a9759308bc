#!/usr/bin/env bash
# Native checks for CI, run after `pip install --no-build-isolation -e .` with
# SGATTN_BUILD_CPU=1 SGATTN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_HOME=/usr/local/cuda:
#  1. compiles kernels/ standalone for sm_80 and sm_90 with `nvcc -Xptxas -v` and
#     fails if any kernel spills registers (or uses a stack frame);
#  2. imports both extensions and checks every op of sgattn/_ops_names.py has a
#     CPU and a CUDA kernel registered (the CUDA one cannot run without a GPU);
#  3. runs the native-backend tests with the extensions required (skipped with
#     --no-tests when the main pytest run sets SGATTN_REQUIRE_NATIVE=1 and
#     SGATTN_REQUIRE_CUDA_BUILD=1 itself).
# Usage: tools/ci_native_checks.sh [--no-tests] [python]   (default: python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_TESTS=1
if [ "${1:-}" = "--no-tests" ]; then RUN_TESTS=0; shift; fi
PY=${1:-python}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

echo "== 1. standalone kernels/ compile with -Xptxas -v (sm_80, sm_90)"
start=$SECONDS
pids=()
for arch in 80 90; do
  "$NVCC" -std=c++17 -O3 -I kernels -gencode=arch=compute_${arch},code=sm_${arch} -Xptxas -v \
    -c kernels/sgattn_kernels.cu -o "$OUT/k${arch}.o" > "$OUT/ptxas_${arch}.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { cat "$OUT"/ptxas_*.log; echo "FAIL: nvcc failed"; exit 1; }; done
# One line per kernel: arch, registers, stack, spills, demangled name; fail on spills or stack.
"$PY" - "$OUT" <<'PYEOF'
import re, subprocess, sys
out = sys.argv[1]
bad = []
for arch in ("80", "90"):
    fn = None
    rows = []
    for line in open(f"{out}/ptxas_{arch}.log"):
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            fn = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn:
            stack, st, ld = map(int, m.groups())
            rows.append([fn, stack, st, ld, None])
        m = re.search(r"Used (\d+) registers", line)
        if m and rows and rows[-1][4] is None:
            rows[-1][4] = int(m.group(1))
    names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() or [r[0] for r in rows]
    for (fn, stack, st, ld, regs), name in zip(rows, names):
        short = re.sub(r"\(.*", "", name)
        print(f"sm_{arch} regs={regs:3d} stack={stack:4d} spill_st={st:4d} spill_ld={ld:4d}  {short}")
        if st or ld or stack:
            bad.append(f"sm_{arch} {short}: {stack} B stack, {st} B spill stores, {ld} B spill loads")
    if not rows:
        bad.append(f"sm_{arch}: no kernels found in the ptxas output")
if bad:
    print("FAIL: register spills / stack frames:\n  " + "\n  ".join(bad))
    sys.exit(1)
print("OK: no spills")
PYEOF
echo "   ($((SECONDS - start)) s)"

echo "== 2. extensions import, every op has CPU and CUDA kernels"
"$PY" - <<'PYEOF'
import torch
from sgattn import _native
from sgattn._ops_names import SCHEMAS, qualified
why = _native.load_extension("sgattn._C_cuda")  # loads sgattn._C first; None when both import
assert why is None, why
missing = [(n, k) for n in SCHEMAS for k in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified(n), k)]
assert not missing, f"ops without kernels: {missing}"
print(f"OK: torch {torch.__version__}, ops {sorted(SCHEMAS)} registered for CPU and CUDA")
PYEOF

[ "$RUN_TESTS" = 1 ] || { echo "== 3. skipped (--no-tests)"; exit 0; }
echo "== 3. native backend tests (extensions required)"
SGATTN_REQUIRE_NATIVE=1 SGATTN_REQUIRE_CUDA_BUILD=1 "$PY" -m pytest -q tests/test_cpu_backend.py tests/test_cuda_build.py
