#!/usr/bin/env bash
# Sets up the machine, builds everything and runs the whole test suite (this is what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-format.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_BUILD_TESTS=ON
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
# Reliability stages (docs/reliability.md), skipped when ctest arguments select tests: the suite
# under ASan + UBSan, then every fuzz target for a bounded time. Each prints its time.
if (($# == 0)); then
  scripts/sanitize.sh
  scripts/fuzz.sh
fi
