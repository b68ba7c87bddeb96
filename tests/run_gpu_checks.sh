#!/usr/bin/env bash
# On a GPU machine, from the repository root: build the CUDA variant of the extension, run the
# CUDA tests, time the kernels, and run compute-sanitizer memcheck + racecheck on a small driver.
# Logs go to $OUT (or ./gpu_logs). Usage: bash tests/run_gpu_checks.sh [build|test|time|sanitize|all]...
set -uo pipefail
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" PYTHONUNBUFFERED=1
steps=("${@:-all}")
want() { [[ " ${steps[*]} " == *" all "* || " ${steps[*]} " == *" $1 "* ]]; }
rc=0
if want build; then
  ALLOCMOE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build ok"
fi
cd /tmp  # import the installed package, not the source tree
if want test; then
  python3 -m pytest -q --maxfail=15 -p no:cacheprovider "$OLDPWD/tests/test_cuda_route.py" "$OLDPWD/tests/test_cuda_moe.py" \
    >"$OUT/tests.log" 2>&1 || rc=1
  tail -5 "$OUT/tests.log"
fi
if want time; then
  python3 "$OLDPWD/tests/gpu_kernel_timing.py" "$OUT" 2>&1 | tee "$OUT/timing.log" || rc=1
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 "$OLDPWD/tests/cuda_sanitizer_driver.py" \
      >"$OUT/sanitizer_$tool.log" 2>&1 || rc=1
    echo "$tool: $(tail -2 "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
  done
fi
exit $rc
