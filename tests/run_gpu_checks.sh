#!/usr/bin/env bash
# On a GPU machine, from the repository root: build the CUDA variant of the extension, run the
# CUDA tests, time the kernels, run compute-sanitizer memcheck + racecheck on the small drivers,
# build and run the torch-free stream/wide, split and read-floor harnesses, and compare the experts paths
# past 16 tokens in the layer bench. Logs go to $OUT (or ./gpu_logs).
# Usage: bash tests/run_gpu_checks.sh [build|test|time|sanitize|harness|paths|all]...
# ("all" is build, test, time, sanitize; harness and paths are asked for by name.)
set -uo pipefail
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" PYTHONUNBUFFERED=1
steps=("${@:-all}")
want() { [[ " ${steps[*]} " == *" $1 "* || ( " ${steps[*]} " == *" all "* && " build test time sanitize " == *" $1 "* ) ]]; }
rc=0
if want build; then
  # ALLOCMOE_CUDA_ARCHS=90a-real builds for Hopper only (~3.5 minutes instead of more with the PTX).
  arch_flag=()
  [[ -n "${ALLOCMOE_CUDA_ARCHS:-}" ]] && arch_flag=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$ALLOCMOE_CUDA_ARCHS")
  ALLOCMOE_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -q ${arch_flag[@]+"${arch_flag[@]}"} . >"$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build ok"
fi
cd /tmp  # import the installed package, not the source tree
if want test; then
  python3 -m pytest -q --maxfail=15 -p no:cacheprovider "$OLDPWD/tests/test_cuda_route.py" "$OLDPWD/tests/test_cuda_moe.py" \
    "$OLDPWD/tests/test_cuda_experts.py" >"$OUT/tests.log" 2>&1 || rc=1
  tail -5 "$OUT/tests.log"
fi
if want time; then
  python3 "$OLDPWD/tests/gpu_kernel_timing.py" "$OUT" 2>&1 | tee "$OUT/timing.log" || rc=1
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    for driver in cuda_sanitizer_driver cuda_experts_sanitize; do
      compute-sanitizer --tool "$tool" --error-exitcode 9 python3 "$OLDPWD/tests/$driver.py" \
        >"$OUT/sanitizer_${tool}_$driver.log" 2>&1 || rc=1
      echo "$tool $driver: $(tail -2 "$OUT/sanitizer_${tool}_$driver.log" | tr '\n' ' ')"
    done
  done
fi
if want harness; then  # the build line of the harness's header; "wide": copy probe, wide vs skinny and stream
  nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I "$OLDPWD/csrc/cuda" \
    -o /tmp/stream_kernel_harness "$OLDPWD/bench/stream_kernel_harness.cu" >"$OUT/harness_build.log" 2>&1 || rc=1
  /tmp/stream_kernel_harness wide 2>&1 | tee "$OUT/harness_wide.txt" || rc=1
  nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I "$OLDPWD/csrc/cuda" \
    -o /tmp/split_kernel_harness "$OLDPWD/bench/split_kernel_harness.cu" >"$OUT/split_harness_build.log" 2>&1 || rc=1
  /tmp/split_kernel_harness 2>&1 | tee "$OUT/split_harness.txt" || rc=1
  nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I "$OLDPWD/csrc/cuda" \
    -o /tmp/read_floor_harness "$OLDPWD/bench/read_floor_harness.cu" >"$OUT/read_floor_build.log" 2>&1 || rc=1
  /tmp/read_floor_harness 2>&1 | tee "$OUT/read_floor.txt" || rc=1
fi
if want paths; then  # the layer bench, ours only, with each experts path forced past 16 tokens
  for path in wide skinny stream; do
    ALLOCMOE_EXPERTS_PATH=$path python3 "$OLDPWD/bench/bench_layer.py" --shapes dsv2,qwen,olmoe --shared no \
      --tokens 32,64,256 --budgets full --only ours --out "$OUT/paths_$path" 2>&1 | tail -12 | tee "$OUT/paths_$path.txt" || rc=1
  done
fi
exit $rc
