#!/usr/bin/env bash
# Sets up the machine, builds everything and runs the whole test suite (this is what CI runs), then
# the reliability stages of docs/reliability.md: the CPU suite under ASan + UBSan
# (scripts/sanitize.sh) and every fuzz target from its seeds (scripts/fuzz.sh). Arguments go to
# the main ctest (e.g. -R safetensors) and select a part of the suite: then the two reliability
# stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-format.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_BUILD_TESTS=ON
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
if (($# == 0)); then
  scripts/sanitize.sh
  scripts/fuzz.sh
fi
