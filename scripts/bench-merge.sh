#!/usr/bin/env bash
# Benchmark of `moeforge merge` (docs/benchmarks.md, "PMA merge (CPU)"): merges N synthetic bf16
# checkpoints of a 1.1B-parameter model and compares its wall time with the time to read all inputs
# once, then runs the naive load-everything numpy baseline (scripts/bench_merge_naive.py).
#
# Usage: scripts/bench-merge.sh [options]
#   --dir DIR            work directory, must not exist (default /tmp/moeforge-bench-merge); holds
#                        N x 2.2 GB of inputs plus one output at a time; removed at the end
#   --moeforge PATH      the executable (default build/moeforge)
#   --num-checkpoints N  checkpoints merged (default 10)
#   --threads LIST       --threads values of the merge runs, 0 = all cores (default "0 1")
#   --repeats R          rounds, i.e. runs of every timed measurement (default 2)
#   --naive-count K      checkpoints of the side-by-side run where the naive script fits (default 4)
#   --naive-limit-gb G   address-space limit of the naive script, prlimit --as (default 14)
#   --keep               keep DIR
#   --reuse              use the inputs DIR/inputs of an earlier run with --keep (DIR may exist)
#   -- ARGS              passed to scripts/make_bench_checkpoints.py (e.g. -- --layers 4)
#
# Each round reads the inputs once, then merges them (cold page cache every time: before every
# timed run the benchmark's own files are dropped from the page cache with dd iflag=nocache
# count=0, i.e. posix_fadvise DONTNEED per file; other users' cache is left alone). Read once: dd
# bs=8M of every input file into /dev/null, one stream (file after file) and nproc parallel
# streams; merge: moeforge merge --method sma, whose time includes the fsync of its output. Then
# the naive script runs on all N inputs under prlimit --as (running out of memory there is a
# result), and, with K = --naive-count < N, read once / merge / naive run side by side on the first
# K inputs, and the naive output is compared bit for bit with the merge's. Wall time, CPU (user +
# sys) and peak RSS come from /usr/bin/time; the load average is printed next to every run (the
# machine may be shared). Prints every run and a summary (mean wall time per run, GB/s of input,
# ratio to the faster read-once mode) as markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=/tmp/moeforge-bench-merge
moeforge=build/moeforge
num_checkpoints=10
threads_list="0 1"
repeats=2
naive_count=4
naive_limit_gb=14
keep=0
reuse=0
gen_args=()
while (($#)); do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --moeforge) moeforge=$2; shift 2 ;;
    --num-checkpoints) num_checkpoints=$2; shift 2 ;;
    --threads) threads_list=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --naive-count) naive_count=$2; shift 2 ;;
    --naive-limit-gb) naive_limit_gb=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --reuse) reuse=1; shift ;;
    --) shift; gen_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-merge: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

python=.venv/bin/python
[ -x "$python" ] || { echo "bench-merge: $python missing: run scripts/setup.sh" >&2; exit 1; }
[ -x "$moeforge" ] || { echo "bench-merge: $moeforge missing: build it first" >&2; exit 1; }
if ((reuse)); then
  [ -d "$dir/inputs" ] || { echo "bench-merge: --reuse: no $dir/inputs" >&2; exit 1; }
  rm -rf "$dir/out-merge" "$dir/out-naive"
elif [ -e "$dir" ]; then
  echo "bench-merge: $dir exists; give a new --dir, remove it, or --reuse its inputs" >&2
  exit 1
fi
((naive_count <= num_checkpoints)) || { echo "bench-merge: --naive-count > --num-checkpoints" >&2; exit 2; }
mkdir -p "$dir"
((keep)) || trap 'rm -rf "$dir"' EXIT

load() { cut -d' ' -f1 /proc/loadavg; }
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }  # calc EXPR [DECIMALS]
gb() { calc "$1 / 1e9"; }
# Drops the page cache of every file under the given paths (writing back dirty pages first).
evict() {
  sync
  find "$@" -type f -exec dd if={} iflag=nocache count=0 status=none \;
}
resident_mb() { fincore -b -n -o RES $(find "$@" -type f) | awk '{s += $1} END {printf "%.0f", s / 1e6}'; }
files_of() { find "$@" -name '*.safetensors' | sort; }  # the weight files of model directories
bytes_of() { du -cb "$@" | tail -1 | cut -f1; }
rows="$dir/rows.tsv"  # set, run, bytes, wall s, cpu s, peak RSS MB, load, note
: > "$rows"

if ! ((reuse)); then
  echo "== generating $num_checkpoints checkpoints in $dir/inputs (load $(load))"
  gen_start=$(now)
  "$python" scripts/make_bench_checkpoints.py "$dir/inputs" --num-checkpoints "$num_checkpoints" \
    "${gen_args[@]}"
  echo "generated in $(calc "$(now) - $gen_start" 0) s"
fi
inputs=("$dir"/inputs/ckpt-*)
inputs=("${inputs[@]:0:num_checkpoints}")
total_bytes=$(bytes_of $(files_of "${inputs[@]}"))
echo "inputs: ${#inputs[@]} checkpoints, $(files_of "${inputs[@]}" | wc -l) safetensors files," \
  "$(gb "$total_bytes") GB"

# read_once SET STREAMS MODEL_DIR...: reads every weight file once into /dev/null (dd bs=8M), the
# files split over STREAMS parallel dd processes.
read_once() {
  local set=$1 streams=$2 files start seconds load_before
  shift 2
  files=($(files_of "$@"))
  evict "${files[@]}"
  load_before=$(load)
  echo "   resident before: $(resident_mb "${files[@]}") MB; load $load_before"
  start=$(now)
  printf '%s\n' "${files[@]}" | xargs -P "$streams" -I{} dd if={} of=/dev/null bs=8M status=none
  seconds=$(calc "$(now) - $start")
  echo "   read once, $streams stream(s): $seconds s, $(calc "$(bytes_of "${files[@]}") / $seconds / 1e9") GB/s"
  printf '%s\tread once, %s stream(s)\t%s\t%s\t-\t-\t%s\t\n' "$set" "$streams" \
    "$(bytes_of "${files[@]}")" "$seconds" "$load_before" >> "$rows"
}

# timed SET LABEL BYTES LOG CMD...: runs CMD under /usr/bin/time (stdout and stderr into LOG) and
# records its wall time, CPU time and peak RSS against BYTES of input; returns CMD's exit status.
timed() {
  local set=$1 label=$2 bytes=$3 log=$4 load_before wall rss_kb status user sys note=""
  shift 4
  load_before=$(load)
  set +e
  /usr/bin/time -o "$dir/time.txt" -f '%e %M %x %U %S' "$@" > "$log" 2>&1
  set -e
  read -r wall rss_kb status user sys < <(tail -1 "$dir/time.txt")
  if [ "$status" != 0 ]; then
    note="exit $status after $wall s: $(grep -o 'MemoryError' "$log" | head -1)"
    [[ $note == *: ]] && note="$note $(tail -1 "$log" | cut -c1-60)"
  fi
  echo "   $label: $wall s, CPU $(calc "$user + $sys" 1) s, peak RSS $((rss_kb / 1024)) MB, load" \
    "$load_before ${note:+($note)}"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$set" "$label" "$bytes" "$wall" "$(calc "$user + $sys" 1)" "$((rss_kb / 1024))" "$load_before" "$note" >> "$rows"
  return "$status"
}

# merge_run SET COUNT THREADS: moeforge merge of the first COUNT inputs, cold cache.
merge_run() {
  local set=$1 count=$2 threads=$3
  rm -rf "$dir/out-merge"
  evict "$dir/inputs"
  timed "$set" "moeforge merge --threads $threads" "$(bytes_of $(files_of "${inputs[@]:0:count}"))" \
    "$dir/merge.log" \
    "$moeforge" merge --method sma --threads "$threads" --out "$dir/out-merge" \
    "${inputs[@]:0:count}" || { cat "$dir/merge.log" >&2; exit 1; }
}

# naive_run SET COUNT: the naive numpy script on the first COUNT inputs, cold cache, under the
# address-space limit (a MemoryError there is a result, not a failure of the benchmark).
naive_run() {
  local set=$1 count=$2
  rm -rf "$dir/out-naive"
  evict "$dir/inputs"
  timed "$set" "naive numpy (limit ${naive_limit_gb} GiB)" \
    "$(bytes_of $(files_of "${inputs[@]:0:count}"))" "$dir/naive.log" \
    prlimit --as=$((naive_limit_gb * 1024 * 1024 * 1024)) env OPENBLAS_NUM_THREADS=1 \
    "$python" scripts/bench_merge_naive.py --out "$dir/out-naive" "${inputs[@]:0:count}" || true
}

streams_list="1 $(nproc)"
full="N=$num_checkpoints"
for ((r = 1; r <= repeats; r++)); do
  echo "== round $r of $repeats, $num_checkpoints checkpoints"
  for streams in $streams_list; do read_once "$full" "$streams" "${inputs[@]}"; done
  for threads in $threads_list; do merge_run "$full" "$num_checkpoints" "$threads"; done
done
echo "== naive, $num_checkpoints checkpoints"
naive_run "$full" "$num_checkpoints"
rm -rf "$dir/out-naive"

if ((naive_count < num_checkpoints)); then
  small="N=$naive_count"
  for ((r = 1; r <= repeats; r++)); do
    echo "== round $r of $repeats, $naive_count checkpoints"
    for streams in $streams_list; do read_once "$small" "$streams" "${inputs[@]:0:naive_count}"; done
    merge_run "$small" "$naive_count" 0
    naive_run "$small" "$naive_count"
  done
fi
if [ -f "$dir/out-naive/model.safetensors" ]; then
  echo "== naive output against moeforge output (bit for bit)"
  "$python" scripts/bench_merge_naive.py --compare "$dir/out-merge" "$dir/out-naive"
fi

echo
echo "moeforge $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores," \
  "$(free -g | awk '/Mem:/ {print $2}') GB RAM, $(date +%F)"
echo
echo "Every run (cold page cache for the benchmark's files):"
echo "| inputs | run | GB | wall s | GB/s | CPU s | peak RSS MB | load before | note |"
echo "|---|---|---|---|---|---|---|---|---|"
awk -F'\t' '{ gbps = $8 == "" ? sprintf("%.2f", $3 / $4 / 1e9) : "-"
  printf "| %s | %s | %.2f | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3 / 1e9, $4, gbps, $5, $6, $7, $8 }' "$rows"
echo
echo "Summary: mean over runs; ratio = GB/s against the faster read-once mode (the goal is >= 70%):"
echo "| inputs | run | GB | mean wall s | GB/s | of read-once | max peak RSS MB |"
echo "|---|---|---|---|---|---|---|"
awk -F'\t' '
  { key = $1 SUBSEP $2
    if (!(key in n)) { order[++num_keys] = key; set_of[key] = $1; run_of[key] = $2 }
    n[key]++; bytes[key] = $3; rss[key] = ($6 > rss[key] || rss[key] == "") ? $6 : rss[key]
    if ($8 == "") { ok[key]++; wall[key] += $4 } else { failed[key] = $8 } }
  END {
    for (k = 1; k <= num_keys; k++) {
      key = order[k]
      if (run_of[key] ~ /^read once/ && ok[key]) {
        gbps = bytes[key] * ok[key] / wall[key] / 1e9
        if (gbps > best[set_of[key]]) best[set_of[key]] = gbps
      }
    }
    for (k = 1; k <= num_keys; k++) {
      key = order[k]
      if (!ok[key]) {
        printf "| %s | %s | %.2f | %s | - | - | %s |\n", set_of[key], run_of[key], bytes[key] / 1e9, failed[key], rss[key]
        continue
      }
      mean = wall[key] / ok[key]; gbps = bytes[key] / mean / 1e9
      printf "| %s | %s | %.2f | %.2f | %.2f | %.0f%% | %s |\n", set_of[key], run_of[key],
        bytes[key] / 1e9, mean, gbps, 100 * gbps / best[set_of[key]], rss[key]
    }
  }' "$rows"
