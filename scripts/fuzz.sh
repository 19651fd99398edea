#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan) in build-fuzz and runs each from
# its committed seed corpus for a bounded time, up to nproc targets at a time. A crash, a sanitizer
# report, a timeout, an out-of-memory or an exception other than moeforge::Error fails the run and
# leaves the input in build-fuzz/artifacts/. See docs/reliability.md.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET (default 25)] [TARGET...]   (targets: fuzz/*_fuzz.cpp)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
seconds=${1:-25}
shift || true

# clang, its sanitizer/libFuzzer runtimes and its OpenMP runtime (the gcc build needs none of them).
scripts/setup.sh clang libclang-rt-dev libomp-dev

# Debug (asserts on) at -O1 with line tables, as libFuzzer recommends.
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Debug \
  -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DMOEFORGE_FUZZ=ON -DMOEFORGE_SANITIZE=ON \
  -DMOEFORGE_CUDA=OFF -DMOEFORGE_MPI=OFF -DMOEFORGE_BUILD_TESTS=OFF >/dev/null
cmake --build build-fuzz --target fuzzers -j"$(nproc)"
build_s=$((SECONDS - start))

if (($# == 0)); then
  set -- $(ls fuzz/*_fuzz.cpp | sed 's|fuzz/\(.*\)_fuzz.cpp|\1|')
fi
mkdir -p build-fuzz/artifacts build-fuzz/logs
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# run_target NAME: libFuzzer writes new inputs to build-fuzz/corpus/NAME (kept between local runs),
# never to the committed seeds in fuzz/corpus/NAME.
run_target() {
  local name=$1
  mkdir -p "build-fuzz/corpus/$name"
  "build-fuzz/fuzz/fuzz_$name" -max_total_time="$seconds" -max_len=65536 -timeout=10 \
    -rss_limit_mb=2048 -dict=fuzz/moeforge.dict -print_final_stats=1 \
    -artifact_prefix="build-fuzz/artifacts/$name-" "build-fuzz/corpus/$name" "fuzz/corpus/$name" \
    >"build-fuzz/logs/$name.log" 2>&1
}

failed=()
pids=()
names=()
for name in "$@"; do
  run_target "$name" &
  pids+=($!)
  names+=("$name")
  if ((${#pids[@]} >= $(nproc))) || [ "$name" = "${!#}" ]; then
    for i in "${!pids[@]}"; do
      log="build-fuzz/logs/${names[$i]}.log"
      if wait "${pids[$i]}"; then
        stats=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
        cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
        echo "fuzz: ${names[$i]}: ${stats:-?} executions, ${cov:-no coverage line}, no findings"
      else
        echo "fuzz: ${names[$i]}: FINDING (log: $log)"
        grep -E 'ERROR|SUMMARY|runtime error|what\(\)|Test unit written' "$log" | head -20 || true
        failed+=("${names[$i]}")
      fi
    done
    pids=()
    names=()
  fi
done

echo "fuzz: build ${build_s}s, fuzzing $((SECONDS - start - build_s))s (${seconds}s per target)"
if ((${#failed[@]})); then
  echo "fuzz: findings in ${failed[*]}; reproduce with build-fuzz/fuzz/fuzz_NAME build-fuzz/artifacts/NAME-*"
  exit 1
fi
