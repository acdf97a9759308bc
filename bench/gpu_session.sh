#!/usr/bin/env bash
# First GPU contact in one command: a strict build, the correctness of every GPU
# kernel, the headline benchmarks, compute-sanitizer memcheck; a one-screen
# summary printed last.
#
#   bash bench/gpu_session.sh             GPU machine, repo root; results in $OUT
#   bash bench/gpu_session.sh --dry-run   any machine: the GPU stages report
#       "skipped: no GPU" after collecting what they would run (test files, bench
#       cases, sanitizer script), so the plumbing (files, summary) is exercised
#       (tests/test_gpu_session.py runs it in CI)
#
# What a GPU run must confirm (no sgattn kernel has run on a GPU before):
#   1. the CUDA extension builds for sm_90 and imports (strict: a failed build
#      fails the stage, it does not quietly skip the CUDA tests);
#   2. every CUDA and Triton kernel matches the float64 reference there: the
#      CUDA kernels (test_cuda_build), the agreement table of every backend
#      (shapes, layouts, windows, compositions, modules, and its numerics rows:
#      large dS, saturated rows, tiny-probability key tiles, padded windows:
#      the split-dS backward of both backends), the seeded fuzz, the Triton ops and modules
#      (the attention-mass kernels: causal, GQA, padding, gradients), autocast;
#   3. time and peak memory of SG-Former-S at 224 and 1024x1024 (op suites fwd
#      and fwd+bwd, whole model inference and training) against naive,
#      torch.compile(naive) and the SDPA compositions; the attention-mass cases
#      (prefill, SnapKV, decode; kvpress presses) as far as the budget goes;
#   4. no memcheck error in any kernel (bench/sanitize_ops.py).
#
# Stages, in this order, each under its own SIGINT timeout (pytest then stops,
# names its failures and writes its junit XML; KILL 30 s later); each writes its
# files to $OUT when it ends and appends its line to $OUT/summary.txt:
#   build      pip install -e . (SGATTN_BUILD_CUDA=1 SGATTN_BUILD_CPU=1)  -> build.log
#   tests      pytest GPU_TESTS in that order, -rfEs, with
#              SGATTN_REQUIRE_CUDA_BUILD=1 SGATTN_REQUIRE_NATIVE=1    -> tests.txt, tests.xml
#   bench      pytest bench, SGATTN_BENCH_SHAPES=headline, budgeted   -> bench.txt,
#              bench/records.jsonl, bench/<device>-<date>.md
#   sanitizer  compute-sanitizer --tool memcheck bench/sanitize_ops.py -> sanitizer.txt
# The device returns at most 8 files: the bench's .json and .png are dropped
# (python bench/report.py $OUT/bench/records.jsonl DIR rebuilds them).
# Left out, as CPU-only work that would spend GPU minutes: the bare-venv install
# test (needs a network), the offline Triton compile gate, the CPU
# torch.compile subprocesses, the DDP test.
# Knobs: SESSION_S (default 400 s: the device allows one command of about
# 7 minutes), OUT, PYTHON, TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (16).
set -uo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac
START=$(date +%s)
SESSION_S=${SESSION_S:-400}
OUT=${OUT:-bench/results/gpu-session}
PY=${PYTHON:-python3}
GPU_TESTS="tests/test_cuda_build.py tests/test_backend_agreement.py tests/test_fuzz.py tests/test_triton.py
  tests/test_triton_mass.py tests/test_triton_modules.py tests/test_autocast.py"
SAN_S=60  # kept for the sanitizer after the benchmarks
END_S=10  # kept for the summary
mkdir -p "$OUT/bench"
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1
left() { echo $(( SESSION_S - ($(date +%s) - START) )); }
cap() { local a=$1 b=$2; [ "$a" -lt "$b" ] && echo "$a" || echo "$b"; }
# pytest with SIGINT turned back into KeyboardInterrupt: a shell that runs
# this script in the background starts its children with SIGINT ignored.
PYTEST=("$PY" -c "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))")

GPU=0
if [ $DRY = 0 ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
fi

# stage NAME LIMIT_S LOG CMD...: runs CMD under the limit, output to LOG; sets RC and SECS.
stage() {
  local name=$1 limit=$2 log=$3 t0
  shift 3
  t0=$(date +%s)
  if [ "$limit" -lt 5 ]; then
    echo "no time left for $name (limit $limit s)" > "$log"; RC=124
  else
    timeout -s INT -k 30 "$limit" "$@" > "$log" 2>&1; RC=$?
  fi
  SECS=$(( $(date +%s) - t0 ))
}
# record NAME STATUS DETAIL: the stage's line, written as soon as it ends.
record() { printf '%-10s %-26s %4s s  %.110s\n' "$1" "$2" "$SECS" "$3" >> "$SUMMARY"; }
outcome() {  # status word for RC
  case $RC in 0) echo ok ;; 124|137) echo "timeout" ;; *) echo "FAIL (exit $RC)" ;; esac
}
pytest_line() {  # pytest's last count line ("3 failed, 40 passed in 9.1s", "382 tests collected in 0.6s")
  grep -E '^(=+ )?(no tests ran|[0-9]+(/[0-9]+)? (passed|failed|errors?|skipped|deselected|xfailed|xpassed|tests? collected))' \
    "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'
}

{
  echo "sgattn GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $DRY = 1 ] && echo '  (dry run)')"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)')"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2
  else
    echo "no nvidia-smi"
  fi
  "$PY" -c "import sys, torch; import triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1 | tail -n 1
  echo "session limit ${SESSION_S} s; GPU $([ $GPU = 1 ] && echo yes || echo no)"
  echo
  printf '%-10s %-26s %6s  %s\n' stage status time detail
} > "$SUMMARY"

# ---- build: strict, the log kept
if [ $GPU = 1 ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  stage build "$(cap 200 $(( $(left) / 2 )))" "$OUT/build.log" env SGATTN_BUILD_CUDA=1 SGATTN_BUILD_CPU=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  if [ $RC = 0 ]; then
    "$PY" -c "import sgattn._C_cuda, sgattn; print('backends:', sgattn.available_backends())" >> "$OUT/build.log" 2>&1 \
      || RC=1
    "$PY" -m sgattn info >> "$OUT/build.log" 2>&1
  fi
  record build "$(outcome)" "$(grep -m1 '^backends:' "$OUT/build.log" || tail -n 1 "$OUT/build.log")"
else
  SECS=0; echo "skipped: no GPU (the dry run uses the extension already built here)" > "$OUT/build.log"
  record build "skipped: no GPU" "build.log"
fi

# ---- tests: GPU kernels against the float64 reference, fixed order
export SGATTN_REQUIRE_CUDA_BUILD=$GPU SGATTN_REQUIRE_NATIVE=1
if [ $GPU = 1 ]; then
  # leaves the benchmarks at least 90 s; a failed CUDA build makes test_cuda_build fail to import,
  # the other files still run
  stage tests "$(cap 150 $(( $(left) - SAN_S - END_S - 90 )))" "$OUT/tests.txt" "${PYTEST[@]}" $GPU_TESTS \
    -q -rfEs -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/tests.xml"
  record tests "$(outcome)" "$(pytest_line "$OUT/tests.txt")"
else
  stage tests "$(cap 60 $(left))" "$OUT/tests.txt" "${PYTEST[@]}" $GPU_TESTS \
    -q --collect-only -p no:cacheprovider --junitxml="$OUT/tests.xml"
  [ $RC = 0 ] && record tests "skipped: no GPU" "$(pytest_line "$OUT/tests.txt")" \
    || record tests "$(outcome)" "collection failed: tests.txt"
fi

# ---- bench: the headline cases, budgeted so that one long case still ends in time
rm -f "$OUT"/bench/*
# 20 timed rounds a case (the peak-memory call warms up); no reference backend,
# timm or FlexAttention rows: the minutes go to sgattn vs naive, compile(naive), SDPA.
BENCH_ENV=(SGATTN_BENCH_SHAPES=headline SGATTN_BENCH_OUT="$OUT/bench" SGATTN_BENCH_ROUNDS=20)
BENCH_K="not reference and not timm and not flex"
if [ $GPU = 1 ]; then
  L=$(( $(left) - SAN_S - END_S ))
  stage bench "$L" "$OUT/bench.txt" env "${BENCH_ENV[@]}" SGATTN_BENCH_BUDGET_S=$(( L - 30 )) \
    "${PYTEST[@]}" bench -k "$BENCH_K" --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,rounds
  if ! ls "$OUT"/bench/*.md > /dev/null 2>&1 && [ -s "$OUT/bench/records.jsonl" ]; then
    "$PY" bench/report.py "$OUT/bench/records.jsonl" "$OUT/bench" >> "$OUT/bench.txt" 2>&1  # cut short
  fi
  rm -f "$OUT"/bench/*.json "$OUT"/bench/*.png
  TIMED=$(grep -c '"median_s": [0-9]' "$OUT/bench/records.jsonl" 2>/dev/null)
  record bench "$(outcome)" "${TIMED:-0} cases timed; $(pytest_line "$OUT/bench.txt")"
else
  stage bench "$(cap 60 $(left))" "$OUT/bench.txt" env "${BENCH_ENV[@]}" "${PYTEST[@]}" bench -k "$BENCH_K" \
    --collect-only -q -p no:cacheprovider
  [ $RC = 0 ] && record bench "skipped: no GPU" "$(pytest_line "$OUT/bench.txt")" \
    || record bench "$(outcome)" "collection failed: bench.txt"
fi

# ---- sanitizer: memcheck on a short op set (CUDA then Triton, bf16 then fp32)
SAN_ARGS=(bench/sanitize_ops.py --backends cuda,triton --dtypes bfloat16,float32)
if [ $GPU = 1 ] && command -v compute-sanitizer > /dev/null; then
  # without the caching allocator an out-of-bounds access lands outside any allocation
  stage sanitizer "$(cap 90 $(( $(left) - END_S )))" "$OUT/sanitizer.txt" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" "${SAN_ARGS[@]}"
  record sanitizer "$(outcome)" "$(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer.txt"); $(grep -c '^ok' "$OUT/sanitizer.txt") calls ok"
elif [ $GPU = 1 ]; then
  SECS=0; echo "compute-sanitizer not on PATH" > "$OUT/sanitizer.txt"
  record sanitizer "skipped" "compute-sanitizer not on PATH"
else
  stage sanitizer "$(cap 60 $(left))" "$OUT/sanitizer.txt" "$PY" "${SAN_ARGS[@]}"
  record sanitizer "$([ $RC = 0 ] && echo 'skipped: no GPU' || outcome)" "$(tail -n 1 "$OUT/sanitizer.txt")"
fi

# ---- summary: one screen
{
  echo
  FAILS=$(grep -E "^(FAILED|ERROR) " "$OUT/tests.txt" 2>/dev/null)
  if [ -n "$FAILS" ]; then
    echo "failed tests ($(echo "$FAILS" | wc -l), first 12; all in tests.txt / tests.xml):"
    echo "$FAILS" | cut -c1-150 | head -n 12
  fi
  MD=$(ls "$OUT"/bench/*.md 2>/dev/null | head -n 1)
  if [ -n "$MD" ]; then
    echo "headline, sgattn rows (all rows in $(basename "$MD")):"
    grep -E '^\| (model|hybrid|self_guided|stage4) \| [^|]*(224|1024)[^|]* \| [^|]* \| sgattn:' "$MD" \
      | awk -F'|' '$6 ~ /^ *[0-9.]+ *$/ {printf "  %s %s %s %s: %s ms; x naive %s; x best baseline %s; peak %s MiB\n", $2, $3, $4, $5, $6, $8, $9, $12}' \
      | tr -s ' ' | head -n 16
  fi
  echo "total $(( $(date +%s) - START )) s of ${SESSION_S} s; files in $OUT"
} >> "$SUMMARY"
cat "$SUMMARY"
grep -qE '^(build|tests|bench|sanitizer) +(FAIL|timeout)' "$SUMMARY" && exit 1
exit 0
