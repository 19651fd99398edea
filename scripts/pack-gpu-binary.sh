#!/usr/bin/env bash
# Packs a CUDA build's moeforge for the GPU machine, so that a device call can skip its two-minute
# build: stripped and gzipped (about 10 MB, where the 35 MB binary and .deps together pass the
# device tool's 64 MiB carry limit) into DEST_DIR/moeforge.gz, with the commit it was built from in
# DEST_DIR/moeforge.commit. `scripts/gpu-check.sh prebuilt` unpacks it there as build-gpu/moeforge.
# Only moeforge travels: the stages that run the test binaries (test, cuda-test, multi, sanitize,
# mutate) still need `build`. The binary must be current: a source file newer than it is an error.
# Usage: scripts/pack-gpu-binary.sh [BUILD_DIR (default build)] [DEST_DIR (default .gpu-carry/bin)]
set -euo pipefail
build=$(realpath -m "${1:-build}")
dest=$(realpath -m "${2:-.gpu-carry/bin}")
cd "$(dirname "$0")/.."

fail() {
  echo "pack-gpu-binary: $*" >&2
  exit 1
}

binary=$build/moeforge
[ -x "$binary" ] || fail "no $binary: build moeforge first"
[ -f "$build/CMakeCache.txt" ] || fail "no $build/CMakeCache.txt: not a CMake build directory"
grep -q '^MOEFORGE_CUDA:BOOL=ON$' "$build/CMakeCache.txt" ||
  fail "$build is not a CUDA build (configure it with -DMOEFORGE_CUDA=ON)"
# CMakeLists.txt builds sm_90a and sm_80 unless CMAKE_CUDA_ARCHITECTURES is given; the Hopper
# kernels need sm_90a.
architectures=$(sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$build/CMakeCache.txt")
[ -z "$architectures" ] || [[ ";$architectures;" == *";90a;"* ]] ||
  fail "$build builds CUDA architectures '$architectures', without 90a"
stale=$(find src CMakeLists.txt -type f -newer "$binary" -print -quit)
[ -z "$stale" ] || fail "$binary is older than $stale (at least): rebuild it"

mkdir -p "$dest"
stripped=$(mktemp)
trap 'rm -f "$stripped" "$dest/moeforge.gz.tmp"' EXIT
strip -o "$stripped" "$binary"
gzip -9 -c "$stripped" > "$dest/moeforge.gz.tmp"
mv "$dest/moeforge.gz.tmp" "$dest/moeforge.gz"
commit=$(git describe --always --dirty 2>/dev/null || echo unknown)
echo "$commit, built $(date -u -r "$binary" +%FT%TZ)" > "$dest/moeforge.commit"
echo "packed $binary ($(cat "$dest/moeforge.commit")) into $dest/moeforge.gz" \
  "($(($(stat -c %s "$dest/moeforge.gz") / 1048576)) MiB)"
