#!/usr/bin/env bash
# Side-by-side timing of moeforge builds on the GPU machine, so that a ratio comes from one run on
# one machine: builds the `moeforge` binary of each named source tree (CUDA, sm_90a, no tests) in
# DIR/build-sbs, then runs the same `moeforge bench` command with each binary in turn, SBS_ROUNDS
# rounds (default 3), alternating the binaries within a round.
# Usage: scripts/side_by_side.sh "BENCH ARGS" NAME=DIR [NAME=DIR ...]
#   e.g. here: mkdir -p .gpu-carry/old && git archive main | tar -x -C .gpu-carry/old
#   then on the GPU machine (carry .deps and .gpu-carry):
#        scripts/side_by_side.sh "prefill --seq 32768,65536 --repeats 5" old=.gpu-carry/old new=.
# A tree without .deps gets a link to this checkout's (the cuDNN frontend and CUTLASS headers).
# Output: $OUT/sbs_<round>_<name>.jsonl (the bench's JSON lines); with SBS_FIELDS (a comma list,
# e.g. seq,flex_select_fast_ms) also a line per JSON line on stdout: round, name and those fields.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moeforge-side-by-side}
if (($# < 2)); then
  sed -n '6,12p' "$0" >&2
  exit 2
fi
bench_args=$1
shift
mkdir -p "$OUT"
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
names=()
binaries=()
for spec in "$@"; do
  name=${spec%%=*}
  dir=${spec#*=}
  if [[ "$spec" != *=* || -z "$name" || ! -f "$dir/CMakeLists.txt" ]]; then
    echo "side_by_side: '$spec' is not NAME=DIR of a moeforge source tree" >&2
    exit 2
  fi
  [ -e "$dir/.deps" ] || ln -s "$PWD/.deps" "$dir/.deps"
  echo "side_by_side: building $name ($dir)"
  cmake -S "$dir" -B "$dir/build-sbs" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DMOEFORGE_BUILD_TESTS=OFF > "$OUT/sbs_configure_$name.txt" 2>&1 ||
    { tail -n 20 "$OUT/sbs_configure_$name.txt"; exit 1; }
  cmake --build "$dir/build-sbs" --target moeforge -j"$(nproc)" > "$OUT/sbs_build_$name.txt" 2>&1 ||
    { tail -n 40 "$OUT/sbs_build_$name.txt"; exit 1; }
  names+=("$name")
  binaries+=("$dir/build-sbs/moeforge")
done
for ((round = 1; round <= ${SBS_ROUNDS:-3}; ++round)); do
  for i in "${!names[@]}"; do
    out="$OUT/sbs_${round}_${names[i]}.jsonl"
    # shellcheck disable=SC2086 # bench_args is a list of arguments
    "${binaries[i]}" bench $bench_args > "$out" 2> "$OUT/sbs_${round}_${names[i]}.log" ||
      { tail -n 20 "$OUT/sbs_${round}_${names[i]}.log"; exit 1; }
    if [ -n "${SBS_FIELDS:-}" ]; then
      python3 - "$round" "${names[i]}" "$SBS_FIELDS" "$out" << 'PY'
import json, sys
round_, name, fields, path = sys.argv[1:5]
for line in open(path):
    entry = json.loads(line)
    print(f"round {round_} {name}", *(f"{f}={entry.get(f)}" for f in fields.split(",")))
PY
    fi
  done
done
