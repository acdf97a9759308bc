#!/usr/bin/env bash
# Native checks for CI, run after `pip install --no-build-isolation -e .` with
# SGATTN_BUILD_CPU=1 SGATTN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_HOME=/usr/local/cuda:
#  1. compiles kernels/ standalone for sm_80 and sm_90 with `nvcc -Xptxas -v` and
#     fails if any kernel spills registers (or uses a stack frame), or if a
#     kernel's static + dynamic shared memory, for any configuration the planner
#     (kernels/cuda_plan.h, compiled here with the host compiler)
#     accepts, exceeds the opt-in limit of sm_80 (163 KiB) / sm_90 (227 KiB);
#  2. imports both extensions and checks every op of sgattn/_schemas.py has a
#     CPU and a CUDA kernel registered (the CUDA one cannot run without a GPU);
#     tests/test_cuda_build.py checks that each loads alone;
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
    -c kernels/cuda_launch.cu -o "$OUT/k${arch}.o" > "$OUT/ptxas_${arch}.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { cat "$OUT"/ptxas_*.log; echo "FAIL: nvcc failed"; exit 1; }; done
# The planner as a host program: plan <dtype> <d> <window> <max_smem> -> "warps smem imp_smem" or "error: ...".
cat > "$OUT/plan.cpp" <<'CPPEOF'
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "cuda_plan.h"
int main(int argc, char** argv) {
  if (argc != 5) return 2;
  sgattn::DType t = !strcmp(argv[1], "float32") ? sgattn::DType::F32
                  : !strcmp(argv[1], "float16") ? sgattn::DType::F16 : sgattn::DType::BF16;
  sgattn::AttnParams p{};
  p.B = 2; p.h = 2; p.d = atoll(argv[2]); p.window = atoll(argv[3]);
  p.H = p.W = 64; p.N = p.M = 4096;  // any sizes: shared memory depends on dtype, head dim and warps only
  sgattn::AttnPlan plan = sgattn::plan_attention(t, p, strtoull(argv[4], nullptr, 10));
  if (plan.error) { printf("error: %s\n", plan.error); return 0; }
  if (plan.bwd_error) { printf("error: %s\n", plan.bwd_error); return 0; }
  p.M = 49;  // one key tile (most SG-Former calls at 224): the forward may keep O in the score rows
  const sgattn::AttnPlan one = sgattn::plan_attention(t, p, strtoull(argv[4], nullptr, 10));
  printf("%d %zu %zu %d %zu %d %zu %d %zu\n", plan.warps, plan.smem, plan.imp_smem, plan.kv_warps, plan.kv_smem,
         plan.dq_warps, plan.dq_smem, one.error ? 0 : one.warps, one.error ? size_t(0) : one.smem);
  return 0;
}
CPPEOF
${CXX:-c++} -std=c++17 -O1 -I kernels "$OUT/plan.cpp" -o "$OUT/plan"
# One line per kernel: arch, registers, static smem, stack, spills, demangled name; fail on spills, stack,
# or shared memory above the architecture's opt-in limit.
"$PY" - "$OUT" <<'PYEOF'
import re, subprocess, sys
out = sys.argv[1]
LIMIT = {"80": 163 * 1024, "90": 227 * 1024}  # opt-in shared memory per block
SM_SMEM = {"80": 164 * 1024, "90": 228 * 1024}  # shared memory per SM (1 KiB of it reserved per resident block)


def blocks_per_sm(arch, regs, threads, smem):
    """Theoretical resident blocks per SM (CUDA occupancy rules of sm_80/sm_90: 64K registers in 4
    sub-partitions allocated per warp in units of 256, 2048 threads, 32 blocks, 1 KiB reserved smem per block)."""
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 4 * (16384 // per_warp) // warps
    by_smem = SM_SMEM[arch] // (-(-(smem + 1024) // 128) * 128)
    return min(by_regs, by_smem, 2048 // threads, 32), {"regs": by_regs, "smem": by_smem, "threads": 2048 // threads}


TNAME = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}
bad = []
for arch in ("80", "90"):
    fn = None
    rows = []
    props = None
    for line in open(f"{out}/ptxas_{arch}.log"):
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            fn = m.group(1)
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and (props != fn or fn is None) and any(map(int, m.groups())):
            bad.append(f"sm_{arch} device function {props}: {m.group(0)}")
        if m and fn and props == fn:
            stack, st, ld = map(int, m.groups())
            rows.append([fn, stack, st, ld, None, 0])
        m = re.search(r"Used (\d+) registers", line)
        if m and rows and rows[-1][4] is None and rows[-1][0] == fn:
            rows[-1][4] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            rows[-1][5] = int(sm.group(1)) if sm else 0
            cs = re.search(r"(\d+) bytes cumulative stack size", line)
            rows[-1][1] = max(rows[-1][1], int(cs.group(1)) if cs else 0)
    names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() or [r[0] for r in rows]
    static, nregs = {}, {}
    for (fn, stack, st, ld, regs, smem), name in zip(rows, names):
        short = re.sub(r"\(.*", "", name)
        print(f"sm_{arch} regs={regs:3d} smem={smem:6d} stack={stack:4d} spill_st={st:4d} spill_ld={ld:4d}  {short}")
        if st or ld or stack:
            bad.append(f"sm_{arch} {short}: {stack} B stack, {st} B spill stores, {ld} B spill loads")
        if smem > 48 * 1024:
            bad.append(f"sm_{arch} {short}: {smem} B static shared memory (> 48 KiB)")
        m = re.search(r"attention_(fwd|imp|bwd_kv|bwd_dq)_kernel<(\w+), (\d+)>", short)
        if m:
            static[(m.group(1), TNAME[m.group(2)], int(m.group(3)))] = smem
            nregs[(m.group(1), TNAME[m.group(2)], int(m.group(3)))] = regs
    if not rows:
        bad.append(f"sm_{arch}: no kernels found in the ptxas output")
    # Every configuration the planner accepts: dtype x padded head dim, global and window mode.
    for dtype in ("float32", "float16", "bfloat16"):
        for d in (32, 64, 96, 128):
            st = {k: static.get((k, dtype, d)) for k in ("fwd", "imp", "bwd_kv", "bwd_dq")}
            if None in st.values():
                bad.append(f"sm_{arch}: attention kernels for {dtype}, head dim {d} not all instantiated: {st}")
                continue
            for window in (0, 7):
                res = subprocess.run([f"{out}/plan", dtype, str(d), str(window),
                                      str(LIMIT[arch] - max(st.values()))], capture_output=True, text=True).stdout
                if res.startswith("error"):
                    bad.append(f"sm_{arch} {dtype} d={d} window={window}: planner refuses ({res.strip()})")
                    continue
                w_f, fwd, imp, w_kv, kv, w_dq, dq, w_f1, fwd1 = map(int, res.split())
                tot = {"forward": st["fwd"] + fwd, "importance": st["imp"] + imp,
                       "backward dK/dV": st["bwd_kv"] + kv, "backward dQ": st["bwd_dq"] + dq,
                       "forward (one key tile)": st["fwd"] + fwd1}
                print(f"sm_{arch} {dtype:8s} d={d:3d} window={window}: warps fwd/kv/dq {w_f}/{w_kv}/{w_dq}, smem "
                      + ", ".join(f"{k} {v}" for k, v in tot.items()) + f" (limit {LIMIT[arch]})")
                if window == 0:  # informational: theoretical occupancy (same in window mode)
                    occ = []
                    for k, kern, warps in (("forward", "fwd", w_f), ("forward (one key tile)", "fwd", w_f1),
                                           ("importance", "imp", 4),
                                           ("backward dK/dV", "bwd_kv", w_kv), ("backward dQ", "bwd_dq", w_dq)):
                        n, lim = blocks_per_sm(arch, nregs[(kern, dtype, d)], 32 * warps, tot[k])
                        by = min(lim, key=lim.get)
                        occ.append(f"{kern if k != 'forward (one key tile)' else 'fwd1'} {nregs[(kern, dtype, d)]} regs {tot[k]} B {n} blk "
                                   f"{100 * n * warps // 64}% ({by})")
                    print(f"sm_{arch} {dtype:8s} d={d:3d} occupancy: " + "; ".join(occ))
                for k, v in tot.items():
                    if v > LIMIT[arch]:
                        bad.append(f"sm_{arch} {dtype} d={d}: {k} shared memory {v} B > {LIMIT[arch]} B")
if bad:
    print("FAIL:\n  " + "\n  ".join(bad))
    sys.exit(1)
print("OK: no spills, no stack, shared memory within the sm_80/sm_90 limits")
PYEOF
echo "   ($((SECONDS - start)) s)"

echo "== 2. extensions import, every op has CPU and CUDA kernels"
"$PY" - <<'PYEOF'
import torch
from sgattn import _native
from sgattn._schemas import SCHEMAS, qualified
for module in ("sgattn._C_cuda", "sgattn._C"):  # either order: each implements only its own key
    why = _native.load_extension(module)
    assert why is None, why
missing = [(n, k) for n in SCHEMAS for k in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified(n), k)]
assert not missing, f"ops without kernels: {missing}"
print(f"OK: torch {torch.__version__}, ops {sorted(SCHEMAS)} registered for CPU and CUDA")
PYEOF

[ "$RUN_TESTS" = 1 ] || { echo "== 3. skipped (--no-tests)"; exit 0; }
echo "== 3. native backend tests (extensions required)"
SGATTN_REQUIRE_NATIVE=1 SGATTN_REQUIRE_CUDA_BUILD=1 "$PY" -m pytest -q tests/test_cpu_backend.py tests/test_cuda_build.py
# the cpu backend's rows of the agreement table (its comparisons with float64)
SGATTN_REQUIRE_NATIVE=1 "$PY" -m pytest -q tests/test_backend_agreement.py -k "cpu-"
