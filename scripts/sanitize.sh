#!/usr/bin/env bash
# Builds everything with AddressSanitizer + UndefinedBehaviorSanitizer (build-asan: Debug, so
# asserts are on, at -O1 so the tests stay fast, -g1: line tables for the reports) and runs the CPU test suite under them, all but
# the long `demo` and the timing-heavy reliability tests (crash_resume, mpi_fault). Any sanitizer
# report fails the run.
# See docs/reliability.md. Extra arguments go to ctest (e.g. -R safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DMOEFORGE_SANITIZE=ON -DMOEFORGE_CUDA=OFF -DMOEFORGE_BUILD_TESTS=ON >/dev/null
cmake --build build-asan -j"$(nproc)"
build_s=$((SECONDS - start))

# UBSan stops at the first report (the build also sets -fno-sanitize-recover=undefined).
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
asan_options=abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
# Everything but the demo, the timing-heavy reliability tests and what runs under mpirun, with
# LeakSanitizer on.
ASAN_OPTIONS=$asan_options:detect_leaks=1 ctest --test-dir build-asan --output-on-failure \
  -j"$(nproc)" -LE '^(demo|mpi|cli)$' -E '^reliability_(crash_resume|mpi_fault)$' "$@"
# Tests that start MPI ranks (cli runs one job under mpirun): Open MPI's runtime leaks by design
# from plugins it has unloaded by exit (no symbols to suppress them by), so no leak check there.
ASAN_OPTIONS=$asan_options:detect_leaks=0 ctest --test-dir build-asan --output-on-failure \
  -j"$(nproc)" -L '^(mpi|cli)$' -E '^reliability_mpi_fault$' "$@"
echo "sanitize: build ${build_s}s, tests $((SECONDS - start - build_s))s"
