#!/usr/bin/env bash
# The GPU machine's check, in one run: build with CUDA, run the whole test suite there (the CUDA
# tests must find a GPU), and the Hugging Face oracle (scripts/hf_oracle.py) against the
# transformers installed there. Outputs land in $OUT (default /tmp/moeforge-gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moeforge-gpu-check}
mkdir -p "$OUT"
{ nvidia-smi; git log -1 --format='commit %H %cd' 2>/dev/null || true; } > "$OUT/machine.txt" 2>&1

generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/configure.txt" 2>&1
cmake --build build-gpu -j"$(nproc)" > "$OUT/build.txt" 2>&1
# Tests run one OpenMP thread each (set by tests/CMakeLists.txt); the CPU is not what is tested here.
build-gpu/moeforge devices | tee "$OUT/devices.txt"

# The demo test needs the `fortunes` corpus, which the GPU machine cannot install.
set +e
MOEFORGE_EXPECT_GPU=1 ctest --test-dir build-gpu -E '^demo$' --output-on-failure -j"$(nproc)" \
  > "$OUT/ctest.txt" 2>&1
ctest_rc=$?
tail -n 15 "$OUT/ctest.txt"
python3 scripts/hf_oracle.py --moeforge build-gpu/moeforge --device cuda \
  --out "$OUT/hf_oracle.json" 2>&1 | tee "$OUT/hf_oracle.txt"
oracle_rc=${PIPESTATUS[0]}
set -e
echo "ctest rc=$ctest_rc, hf_oracle rc=$oracle_rc"
[ "$ctest_rc" -eq 0 ] && [ "$oracle_rc" -eq 0 ]
