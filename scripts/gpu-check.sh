#!/usr/bin/env bash
# The GPU machine's check, in stages that fit the device tool's 10-minute calls:
#   build     configure and build with CUDA (sm_90a) into build-gpu
#   prebuilt  instead of build, for the stages that run only moeforge (not test, cuda-test, multi,
#             sanitize, mutate): the binary that scripts/pack-gpu-binary.sh packed on another
#             machine (PREBUILT, default .gpu-carry/bin/moeforge.gz) as build-gpu/moeforge, after
#             a check that this machine has every library it links (session 33: a Debian 12 build
#             ran on the Ubuntu 24.04 GPU machine, and saved the two-minute build)
#   test      the whole test suite there (the CUDA tests must find a GPU), one OpenMP thread each
#   cuda-test only the GPU tests: the CUDA test binary (a test that crashes it is reported and left
#             out, and the rest runs again) and the CPU-vs-GPU loss-curve test (faster)
#   multi     the tests that need several GPUs (a machine of 2 or 4): the NCCL communicator's, the
#             device gradient sums', the sequence/expert- and tensor-parallel GpuTransformer's and
#             ZeRO-1's (GpuZeroAdamW) at 1, 2 and 4 ranks (4 skips on 2 GPUs), and two GPUs under
#             mpirun against one, data-, expert- and tensor-parallel and ZeRO-1
#             (tests/cuda/data_parallel_test.py;
#             its loss and grad-norm curves in $OUT/data_parallel_curves.json; DATA_PARALLEL_RUNS
#             picks some of its runs, e.g. dp-zero1,dp-zero1-resumed)
#   scaling   data-parallel weak scaling of `bench train` on configs/bench/moe-1.8b-a0.4b.json:
#             mpirun with 1, 2 and 4 ranks (as many as there are GPUs), one GPU each, the
#             gradients summed through NCCL (SCALING_ARGS adds options, e.g. --grad-reduce bf16,
#             or --grad-bucket-mb 0 to sum after the backward instead of overlapped with it;
#             SCALING_MULTI_ARGS adds options to the multi-GPU runs only, e.g. --zero-stage 1;
#             SCALING_EP=E runs the multi-GPU ones as groups of E GPUs sharing each sequence,
#             --expert-parallel E with E times the micro-batch; with SCALING_MULTI_ARGS="--layout
#             tp" those groups are tensor-parallel, the ablation's baseline);
#             prints tokens/s per GPU, the efficiency against one GPU and every phase's GPU ms
#             (the one-GPU run's beside the others')
#   ablation  the time half of MegaScale-MoE's ablation on all the machine's GPUs as one group:
#             `bench train` on configs/bench/mixtral-ablation.json with --layout tp against sp_ep
#             and sp_ep with --grad-reduce bf16, alternating (ABLATION_REPEATS rounds, default 2),
#             as a table (scripts/ablation_table.py; $OUT/ablation.md): whole step and "layers
#             only" (without grad_reduce and optimizer) relative to tp
#   sanitize  compute-sanitizer memcheck over the CUDA test binary, racecheck (and on request
#             synccheck) over our own kernels (SANITIZE_TOOLS picks from "memcheck racecheck
#             synccheck", default "memcheck racecheck"; SANITIZE_FILTER, a gtest filter,
#             narrows them: the whole stage takes over 10 minutes, e.g. memcheck covered 102 of
#             the 165 tests in 150 s in session 7, and racecheck spends minutes on single
#             FlexPrefill and fallback-attention tests)
#   mutate    scripts/mutation_check.py over build-gpu's CUDA tests: each mutation of MUTATIONS
#             (default tests/cuda/flex_prefill_mutations.tsv) must make its tests fail; build-gpu
#             is rebuilt unmutated at the end ($OUT/mutations.txt)
#   lab       `moeforge bench gemm`: the expert GEMM candidates against a dense GEMM
#   prefill   `moeforge bench prefill`: dense (cuDNN, ours) against FlexPrefill prefill attention at
#             8K-128K on random inputs (PREFILL_ARGS adds options, e.g. --qkv FILE --seq ...)
#   select    the fast search's coverage select paths side by side: `bench prefill --select-path`
#             over SELECT_PATHS (default "auto many-blocks clusters") in turn, SELECT_ROUNDS rounds
#             (default 3) at SELECT_SEQ (default 32768; a comma-separated list runs each length);
#             each run's fast-search time and its ratio to cuDNN's dense time
#             ($OUT/select_paths.jsonl, $OUT/select_paths.txt)
#   timeline  a CUPTI kernel timeline of `moeforge bench prefill` at TIMELINE_SEQ (default 32768;
#             TIMELINE_ARGS adds options): every part's span, busy time per stream, overlap and idle
#             time (scripts/timeline_summary.py; $OUT/timeline_summary.txt), and the fast search's
#             kernels one by one ($OUT/timeline_flex_select_fast.txt)
#   reference our block-sparse kernel against the public FlexPrefill repository's Triton kernel on
#             the same random block sets (scripts/reference_prefill_bench.py; a checkout of
#             ByteDance-Seed/FlexPrefill in FLEXPREFILL_DIR, default .gpu-carry/FlexPrefill)
#   profile   GPU time per kernel under ncu (clocks left alone): one bench-train step (the last of
#             two), and the FlexPrefill search + kernels at PROFILE_SEQ (default 32768); summed by
#             scripts/ncu_kernel_times.py. PROFILE_PARTS picks them (default "train prefill")
#   oracle    the Hugging Face oracle (scripts/hf_oracle.py) against the installed transformers
#   longctx   the long-context recipe (scripts/long_context_recipe.sh): trains the small model of
#             configs/models/longctx-llama.json on the synthetic tasks (three phases, about 3 min;
#             XLONG_STEPS adds a fourth toward 128K), evaluates it dense against FlexPrefill (fast
#             and exact pattern search) at 1K, 4K, 16K, 32K and 128K, and benchmarks
#             prefill on its Q/K/V (the models stay in runs/longctx-*: too large for $OUT); the
#             recipe's environment (TASKS, WARM2_STEPS, ...) passes through
#   probe     scripts/longctx_probe.sh: whether the long-context model learns a task at short
#             lengths (PROBE_TASKS, PROBE_LR, PROBE_STEPS, ... pass through): accuracy and val
#             loss at every checkpoint and what the wrong answers copied ($OUT/probe-0);
#             PROBE_SETS runs several probes in turn, e.g. "WINDOWS=stream;WINDOWS=packed" ($OUT/probe-N; a value with
#             spaces in quotes, 'PROBE_STAGES="vt@1 vt@2";PROBE_TASKS=vt'), the later ones
#             from the first one's warm model, or with PROBE_PARALLEL=1 all at once from a warm
#             model trained first; every curve in $OUT/probe_summary.txt
#   bench     `moeforge bench train` on configs/bench/moe-1.8b-a0.4b.json (recompute modes from
#             BENCH_RECOMPUTE, default "none selective"; BENCH_OVERLAP=1 adds each with
#             --overlap-optimizer, BENCH_GRAPHS=1 each with --cuda-graphs), then the PyTorch
#             baseline of
#             ../shared/anchors (torch.compile + grouped_mm) in the same run, each with its
#             median SM clock and power (nvidia-smi samples)
#   all       build, test, sanitize, oracle, lab, prefill, bench
# Usage: scripts/gpu-check.sh [stage...] (default: all). Outputs land in $OUT
# (default /tmp/moeforge-gpu-check). The cuDNN frontend headers come from scripts/setup.sh
# (.deps/cudnn-frontend); the machine has no registry access, so carry .deps there.
# TORCH_BASELINE: path of torch_moe_baseline.py (default: ../shared/anchors or .gpu-carry).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moeforge-gpu-check}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
[ "${stages[0]}" = all ] && stages=(build test sanitize oracle lab prefill bench)

rc=0
for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      { nvidia-smi; git log -1 --format='commit %H %cd' 2>/dev/null || true; } > "$OUT/machine.txt" 2>&1
      generator=()
      command -v ninja > /dev/null && generator=(-G Ninja)
      cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMOEFORGE_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/configure.txt" 2>&1
      cmake --build build-gpu -j"$(nproc)" > "$OUT/build.txt" 2>&1 || { tail -n 40 "$OUT/build.txt"; exit 1; }
      build-gpu/moeforge devices | tee "$OUT/devices.txt"
      ;;
    prebuilt)
      packed=${PREBUILT:-.gpu-carry/bin/moeforge.gz}
      [ -f "$packed" ] || { echo "prebuilt: no $packed (scripts/pack-gpu-binary.sh makes it)"; exit 1; }
      mkdir -p build-gpu
      gunzip -c "$packed" > build-gpu/moeforge.tmp
      chmod +x build-gpu/moeforge.tmp
      mv build-gpu/moeforge.tmp build-gpu/moeforge
      missing=$(ldd build-gpu/moeforge | grep 'not found' || true)
      if [ -n "$missing" ]; then
        echo "prebuilt: $packed needs libraries this machine lacks (use the build stage):"
        echo "$missing"
        exit 1
      fi
      { nvidia-smi || true; echo "prebuilt moeforge: $(cat "${packed%.gz}.commit" 2>/dev/null ||
        echo "no ${packed%.gz}.commit")"; } > "$OUT/machine.txt" 2>&1
      build-gpu/moeforge devices | tee "$OUT/devices.txt"
      ;;
    test)
      # The merge reference test runs numpy + safetensors from .venv/bin/python; with no registry
      # there, that is the machine's own python3 (which has both).
      if [ ! -x .venv/bin/python ]; then
        mkdir -p .venv/bin
        ln -sf "$(command -v python3)" .venv/bin/python
      fi
      # The demo test needs the `fortunes` corpus, which the GPU machine cannot install.
      set +e
      MOEFORGE_EXPECT_GPU=1 ctest --test-dir build-gpu -E '^demo$' --output-on-failure \
        -j"$(nproc)" > "$OUT/ctest.txt" 2>&1
      test_rc=$?
      set -e
      grep -E "Failed|tests passed|\*\*\*" "$OUT/ctest.txt" | tail -n 40
      build-gpu/tests/cuda_tests > "$OUT/cuda_tests.txt" 2>&1 || true
      # The loss-curve comparison again, for its printed numbers (ctest hides a passing test's output).
      python3 tests/cuda/train_curve_test.py build-gpu/moeforge . > "$OUT/train_curve.txt" 2>&1 || rc=1
      [ "$test_rc" -eq 0 ] || rc=1
      ;;
    cuda-test)
      # A test that crashes the binary (a signal) would hide every test after it: the crashed test
      # is reported and left out, and the rest runs again (up to three crashes).
      crashed=()
      : > "$OUT/cuda_tests.txt"
      for _ in 1 2 3 4; do
        filter=()
        [ ${#crashed[@]} -gt 0 ] && filter=("--gtest_filter=-$(IFS=:; echo "${crashed[*]}")")
        set +e
        MOEFORGE_EXPECT_GPU=1 build-gpu/tests/cuda_tests "${filter[@]}" \
          > "$OUT/cuda_tests_run.txt" 2>&1
        cuda_rc=$?
        set -e
        cat "$OUT/cuda_tests_run.txt" >> "$OUT/cuda_tests.txt"
        [ "$cuda_rc" -gt 128 ] || break
        last=$(grep -E '^\[ RUN      \]' "$OUT/cuda_tests_run.txt" | tail -n 1 | awk '{print $4}')
        [ -n "$last" ] || break
        echo "CRASHED (signal $((cuda_rc - 128))): $last"
        crashed+=("$last")
      done
      rm -f "$OUT/cuda_tests_run.txt"
      grep -E "PASSED|FAILED|Failure" "$OUT/cuda_tests.txt" | tail -n 20
      [ "$cuda_rc" -eq 0 ] && [ ${#crashed[@]} -eq 0 ] || rc=1
      MOEFORGE_EXPECT_GPU=1 python3 tests/cuda/train_curve_test.py build-gpu/moeforge . \
        > "$OUT/train_curve.txt" 2>&1 || rc=1
      tail -n 4 "$OUT/train_curve.txt"
      ;;
    multi)
      MOEFORGE_EXPECT_GPU=1 ctest --test-dir build-gpu -L nccl --output-on-failure \
        > "$OUT/nccl_tests.txt" 2>&1 || rc=1
      grep -E "Passed|Failed|Skipped|tests passed" "$OUT/nccl_tests.txt" | tail -n 12
      MOEFORGE_MPIEXEC=$(command -v mpirun) python3 tests/cuda/data_parallel_test.py \
        build-gpu/moeforge . "$OUT/data_parallel_curves.json" > "$OUT/data_parallel.txt" 2>&1 || rc=1
      tail -n 6 "$OUT/data_parallel.txt"
      ;;
    scaling)
      gpus=$(nvidia-smi -L | wc -l)
      ep=${SCALING_EP:-1}
      for ranks in 1 2 4; do
        [ "$ranks" -le "$gpus" ] || continue
        # With SCALING_EP=E the multi-GPU runs are groups of E sharing each sequence, with E times
        # the micro-batch (the same tokens per GPU as the one-GPU run).
        group=()
        # shellcheck disable=SC2206
        [ "$ranks" -gt 1 ] && group=(${SCALING_MULTI_ARGS:-})
        if [ "$ep" -gt 1 ] && [ "$ranks" -gt 1 ]; then
          [ $((ranks % ep)) -eq 0 ] || continue
          group+=(--expert-parallel "$ep" --micro-batch $((4 * ep)))
        fi
        # shellcheck disable=SC2086
        mpirun -np "$ranks" --allow-run-as-root --oversubscribe build-gpu/moeforge bench train \
          --config configs/bench/moe-1.8b-a0.4b.json --steps 10 --warmup 3 "${group[@]}" \
          ${SCALING_ARGS:-} > "$OUT/scaling_$ranks.json" 2> "$OUT/scaling_$ranks.log" \
          || { tail -n 20 "$OUT/scaling_$ranks.log"; rc=1; }
      done
      python3 - "$OUT" <<'PY' || rc=1
import glob, json, os, sys
runs = {}
for path in glob.glob(os.path.join(sys.argv[1], "scaling_*.json")):
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines:
        row = json.loads(lines[-1])
        runs[row["ranks"]] = row
base = runs.get(1)
for ranks in sorted(runs):
    row = runs[ranks]
    efficiency = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else float("nan")
    print(f"{ranks} GPU(s): {row['tokens_per_s']:.0f} tokens/s, {row['tokens_per_s_per_gpu']:.0f} "
          f"per GPU, median step {row['median_step_ms']:.1f} ms, expert_parallel "
          f"{row.get('expert_parallel', 1)} (layout {row.get('layout', 'sp_ep')}), grad_reduce "
          f"{row['grad_reduce']} "
          f"(buckets of {row['grad_bucket_mb']} MiB), grad_reduce phase "
          f"{row['phase_ms'].get('grad_reduce', 0.0):.1f} ms, zero_stage {row.get('zero_stage', 0)}, "
          f"peak {row['peak_memory_gib']:.1f} GiB, weak-scaling efficiency {efficiency:.3f}")
    # Where the multi-GPU step grows: every phase (GPU ms) beside the one-GPU run's.
    print("    phases (ms): " + ", ".join(
        f"{name} {ms:.1f}" + (f" ({base['phase_ms'][name]:.1f})" if base and ranks > 1 and
                              name in base["phase_ms"] else "")
        for name, ms in sorted(row["phase_ms"].items())))
PY
      ;;
    ablation)
      # MegaScale-MoE's ablation, time half: one group of all the GPUs on the Mixtral-shaped
      # config, tp (TP+TP = 1.00) against sp_ep and sp_ep with bf16 gradient sums, alternating,
      # ABLATION_REPEATS rounds (default 2); summed by scripts/ablation_table.py.
      gpus=$(nvidia-smi -L | wc -l)
      rm -f "$OUT"/ablation_*.json
      for round in $(seq "${ABLATION_REPEATS:-2}"); do
        for variant in "tp fp32" "sp_ep fp32" "sp_ep bf16"; do
          read -r layout dtype <<< "$variant"
          mpirun -np "$gpus" --allow-run-as-root --oversubscribe build-gpu/moeforge bench train \
            --config configs/bench/mixtral-ablation.json --seq 4096 --micro-batch 2 \
            --expert-parallel "$gpus" --layout "$layout" --grad-reduce "$dtype" --steps 6 \
            > "$OUT/ablation_${round}_${layout}_$dtype.json" \
            2> "$OUT/ablation_${round}_${layout}_$dtype.log" \
            || { tail -n 20 "$OUT/ablation_${round}_${layout}_$dtype.log"; rc=1; }
        done
      done
      python3 scripts/ablation_table.py "$OUT"/ablation_*.json | tee "$OUT/ablation.md" || rc=1
      ;;
    sanitize)
      sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1 || true)
      if [ -z "$sanitizer" ]; then
        echo "compute-sanitizer not found"
        rc=1
        continue
      fi
      # memcheck: every GPU test but the allocator's out-of-memory test, whose failing cudaMalloc
      # is on purpose (memcheck reports it as an API error). racecheck (shared-memory hazards) is
      # slow on the library kernels (cuBLAS, cuDNN, CUTLASS), so it covers our own kernels' tests.
      only=${SANITIZE_FILTER:-*}
      tools=" ${SANITIZE_TOOLS:-memcheck racecheck} "
      if [[ "$tools" == *" memcheck "* ]]; then
        MOEFORGE_EXPECT_GPU=1 "$sanitizer" --tool memcheck --error-exitcode 1 build-gpu/tests/cuda_tests \
          --gtest_filter="$only-DeviceAllocator.ThrowsAnErrorWhenTheDeviceIsOutOfMemory" \
          > "$OUT/memcheck.txt" 2>&1 || rc=1
        tail -n 3 "$OUT/memcheck.txt"
      fi
      if [[ "$tools" == *" racecheck "* ]]; then
        MOEFORGE_EXPECT_GPU=1 "$sanitizer" --tool racecheck --error-exitcode 1 build-gpu/tests/cuda_tests \
          --gtest_filter="$only-*GpuTransformer*:AttentionCuda.*:BlasCuda.*:*GroupedGemm*" \
          > "$OUT/racecheck.txt" 2>&1 || rc=1
        tail -n 3 "$OUT/racecheck.txt"
      fi
      # synccheck: barriers and warp-synchronous intrinsics that not every thread they name reaches
      # (a hang or an illegal instruction otherwise), over our own kernels' tests as racecheck.
      if [[ "$tools" == *" synccheck "* ]]; then
        MOEFORGE_EXPECT_GPU=1 "$sanitizer" --tool synccheck --error-exitcode 1 build-gpu/tests/cuda_tests \
          --gtest_filter="$only-*GpuTransformer*:AttentionCuda.*:BlasCuda.*:*GroupedGemm*" \
          > "$OUT/synccheck.txt" 2>&1 || rc=1
        tail -n 3 "$OUT/synccheck.txt"
      fi
      ;;
    lab)
      build-gpu/moeforge bench gemm > "$OUT/bench_gemm.json" 2>&1 || rc=1
      cat "$OUT/bench_gemm.json"
      ;;
    mutate)
      python3 scripts/mutation_check.py "${MUTATIONS:-tests/cuda/flex_prefill_mutations.tsv}" \
        | tee "$OUT/mutations.txt" || rc=1
      ;;
    prefill)
      # shellcheck disable=SC2086 # PREFILL_ARGS is a list of options
      build-gpu/moeforge bench prefill ${PREFILL_ARGS:-} > "$OUT/bench_prefill.jsonl" \
        2> "$OUT/bench_prefill.log" || { tail -n 20 "$OUT/bench_prefill.log"; rc=1; }
      cat "$OUT/bench_prefill.jsonl"
      ;;
    select)
      : > "$OUT/select_paths.jsonl"
      for _ in $(seq "${SELECT_ROUNDS:-3}"); do
        for path in ${SELECT_PATHS:-auto many-blocks clusters}; do
          build-gpu/moeforge bench prefill --seq "${SELECT_SEQ:-32768}" --repeats 7 \
            --select-path "$path" >> "$OUT/select_paths.jsonl" 2> "$OUT/select_paths.log" \
            || { tail -n 20 "$OUT/select_paths.log"; rc=1; }
        done
      done
      python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.strip():
        j = json.loads(line)
        print(j["seq"], j["select_path"], "fast search", round(j["flex_select_fast_ms"], 4), "ms,",
              round(100 * j["select_fast_over_dense_cudnn"], 2), "% of cuDNN dense", round(j["dense_cudnn_ms"], 3), "ms")
' "$OUT/select_paths.jsonl" | tee "$OUT/select_paths.txt" || rc=1
      ;;
    timeline)
      # shellcheck disable=SC2086 # TIMELINE_ARGS is a list of options
      build-gpu/moeforge bench prefill --seq "${TIMELINE_SEQ:-32768}" --repeats 3 ${TIMELINE_ARGS:-} \
        --kernel-timeline "$OUT/timeline.jsonl" > "$OUT/timeline_bench.jsonl" \
        2> "$OUT/timeline_bench.log" || { tail -n 20 "$OUT/timeline_bench.log"; rc=1; }
      python3 scripts/timeline_summary.py "$OUT/timeline.jsonl" | tee "$OUT/timeline_summary.txt" || rc=1
      python3 scripts/timeline_summary.py "$OUT/timeline.jsonl" --part flex_select_fast --kernels \
        > "$OUT/timeline_flex_select_fast.txt" || rc=1
      ;;
    reference)
      python3 scripts/reference_prefill_bench.py --moeforge build-gpu/moeforge \
        --reference "${FLEXPREFILL_DIR:-.gpu-carry/FlexPrefill}" > "$OUT/reference_prefill.jsonl" \
        2> "$OUT/reference_prefill.log" || { tail -n 20 "$OUT/reference_prefill.log"; rc=1; }
      cat "$OUT/reference_prefill.jsonl"
      ;;
    profile)
      ncu_metric=(ncu --clock-control none --metrics gpu__time_duration.sum --csv)
      parts=" ${PROFILE_PARTS:-train prefill} "
      if [[ "$parts" == *" train "* ]]; then
        "${ncu_metric[@]}" build-gpu/moeforge bench train --config configs/bench/moe-1.8b-a0.4b.json \
          --steps 1 --warmup 1 --recompute none > "$OUT/ncu_train.csv" 2> "$OUT/ncu_train.log" || rc=1
        python3 scripts/ncu_kernel_times.py "$OUT/ncu_train.csv" --split-on embedding_forward_kernel \
          | tee "$OUT/ncu_train.txt" || rc=1
      fi
      if [[ "$parts" == *" prefill "* ]]; then
        "${ncu_metric[@]}" build-gpu/moeforge bench prefill --seq "${PROFILE_SEQ:-32768}" --repeats 1 \
          > "$OUT/ncu_prefill.csv" 2> "$OUT/ncu_prefill.log" || rc=1
        python3 scripts/ncu_kernel_times.py "$OUT/ncu_prefill.csv" | tee "$OUT/ncu_prefill.txt" || rc=1
      fi
      ;;
    oracle)
      # moeforge's fp32 CPU reference, then its bf16 CUDA backend, against transformers on the GPU.
      for moeforge_device in cpu cuda; do
        python3 scripts/hf_oracle.py --moeforge build-gpu/moeforge --device cuda \
          --moeforge-device "$moeforge_device" --out "$OUT/hf_oracle_$moeforge_device.json" \
          > "$OUT/hf_oracle_$moeforge_device.txt" 2>&1 || rc=1
        cat "$OUT/hf_oracle_$moeforge_device.txt"
      done
      ;;
    longctx)
      bash scripts/long_context_recipe.sh build-gpu/moeforge "$OUT/longctx" || rc=1
      ;;
    probe)
      # PROBE_SETS: several probes in one call, ';'-separated, each a list of VAR=value for
      # longctx_probe.sh (a value with spaces in quotes: PROBE_STAGES="vt@1 vt@2"); the later ones
      # start from the first one's warm model unless they set PROBE_FROM (PROBE_FROM= with no
      # value: a warm model of their own). Without it, one probe with the environment as it is. PROBE_PARALLEL=1 trains the shared warm model first
      # ($OUT/probe-warm) and then runs every set at once on the one GPU, each in its own work
      # directory (LONGCTX_WORK=runs/probe-work-N): the small model leaves most of an H200 idle.
      IFS=';' read -r -a probe_sets <<< "${PROBE_SETS:-}"
      [ ${#probe_sets[@]} -eq 0 ] && probe_sets=("")
      : > "$OUT/probe_summary.txt"
      # probe_summarize INDEX DIR STATUS: one set's phases and learning curve into the summary.
      probe_summarize() {
        if [ "$3" -eq 0 ]; then
          for log in "$2"/train_*.txt; do
            echo "$(basename "$log" .txt): $(tail -n 1 "$log")" >> "$OUT/probe_summary.txt"
          done
          cat "$2/probe_curve.txt" >> "$OUT/probe_summary.txt"
        else
          echo "probe $1 failed" | tee -a "$OUT/probe_summary.txt"
          rc=1
        fi
      }
      shared_warm=${PROBE_FROM:-}
      if [ "${PROBE_PARALLEL:-0}" = 1 ] && [ -z "$shared_warm" ]; then
        if ! shared_warm=$(bash scripts/longctx_warm.sh build-gpu/moeforge "$OUT/probe-warm"); then
          echo "probe: the warm phase failed" | tee -a "$OUT/probe_summary.txt"
          rc=1
          continue
        fi
        echo "warm: $(tail -n 1 "$OUT/probe-warm/train_warm.txt")" | tee -a "$OUT/probe_summary.txt"
      fi
      probe_pids=()
      for set_idx in "${!probe_sets[@]}"; do
        # Quotes group a value with spaces, as in the shell (xargs reads them).
        mapfile -t assignments < <(xargs -r printf '%s\n' <<< "${probe_sets[$set_idx]}")
        if [ "$set_idx" -gt 0 ] || [ -n "$shared_warm" ] &&
          [[ "${probe_sets[$set_idx]}" != *PROBE_FROM=* ]]; then
          [ -n "$shared_warm" ] ||
            shared_warm=$(ls -d "${LONGCTX_WORK:-.}"/runs/longctx-warm/checkpoints/step-* |
              tail -n 1)
          assignments=("PROBE_FROM=$shared_warm" "${assignments[@]}")
        fi
        probe_dir="$OUT/probe-$set_idx"
        echo "probe $set_idx: ${probe_sets[$set_idx]}"
        if [ "${PROBE_PARALLEL:-0}" = 1 ]; then
          mkdir -p "$probe_dir"
          env LONGCTX_WORK="$PWD/runs/probe-work-$set_idx" "${assignments[@]}" \
            bash scripts/longctx_probe.sh build-gpu/moeforge "$probe_dir" \
            > "$probe_dir/probe_log.txt" 2>&1 &
          probe_pids+=($!)
        else
          echo "probe $set_idx: ${probe_sets[$set_idx]}" >> "$OUT/probe_summary.txt"
          probe_status=0
          env "${assignments[@]}" bash scripts/longctx_probe.sh build-gpu/moeforge "$probe_dir" ||
            probe_status=$?
          probe_summarize "$set_idx" "$probe_dir" "$probe_status"
        fi
      done
      for set_idx in "${!probe_pids[@]}"; do
        probe_status=0
        wait "${probe_pids[$set_idx]}" || probe_status=$?
        echo "probe $set_idx: ${probe_sets[$set_idx]}" >> "$OUT/probe_summary.txt"
        probe_summarize "$set_idx" "$OUT/probe-$set_idx" "$probe_status"
        [ "$probe_status" -eq 0 ] || tail -n 5 "$OUT/probe-$set_idx/probe_log.txt"
      done
      ;;
    bench)
      # SM clock and power every 50 ms while each run goes (a sustained step may run below the
      # boost clock that isolated kernels see, e.g. under ncu); medians over the busy samples printed
      # after each run.
      start_clocks() {
        nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 50 \
          > "$OUT/clocks_$1.csv" 2> /dev/null &
        clock_pid=$!
      }
      stop_clocks() {
        kill "$clock_pid" 2> /dev/null || true
        wait "$clock_pid" 2> /dev/null || true
        python3 -c 'import sys, statistics as s; r = [(float(a), float(b)) for a, b in (l.split(",") for l in open(sys.argv[1]) if "," in l)]; busy = [x for x in r if x[1] > 300] or [(0.0, 0.0)]; print(sys.argv[2], "while busy (power > 300 W):", len(busy), "samples, median SM clock", s.median(a for a, _ in busy), "MHz, median power", s.median(b for _, b in busy), "W")' \
          "$OUT/clocks_$1.csv" "$1" 2> /dev/null || true
      }
      for recompute in ${BENCH_RECOMPUTE:-none selective}; do
        # BENCH_OVERLAP=1 adds a run with AdamW overlapped with the next forward, BENCH_GRAPHS=1
        # one with the step replayed as CUDA graphs (--cuda-graphs).
        for variant in plain ${BENCH_OVERLAP:+overlap} ${BENCH_GRAPHS:+graphs}; do
          name=$recompute
          extra=()
          [ "$variant" = overlap ] && { name=${recompute}_overlap; extra=(--overlap-optimizer); }
          [ "$variant" = graphs ] && { name=${recompute}_graphs; extra=(--cuda-graphs); }
          start_clocks "moeforge_$name"
          build-gpu/moeforge bench train --config configs/bench/moe-1.8b-a0.4b.json --steps 10 \
            --warmup 3 --recompute "$recompute" "${extra[@]}" > "$OUT/bench_train_$name.json" \
            2> "$OUT/bench_train_$name.log" || { tail -n 20 "$OUT/bench_train_$name.log"; rc=1; }
          stop_clocks "moeforge_$name"
          cat "$OUT/bench_train_$name.json"
        done
      done
      baseline=${TORCH_BASELINE:-}
      for candidate in ../shared/anchors/torch_moe_baseline.py .gpu-carry/torch_moe_baseline.py; do
        [ -z "$baseline" ] && [ -f "$candidate" ] && baseline=$candidate
      done
      if [ -n "$baseline" ]; then
        start_clocks torch
        python3 "$baseline" --grouped 1 --compile 1 --steps 10 > "$OUT/torch_baseline.json" \
          2> "$OUT/torch_baseline.log" || { tail -n 20 "$OUT/torch_baseline.log"; rc=1; }
        stop_clocks torch
        tail -n 1 "$OUT/torch_baseline.json"
      else
        echo "torch_moe_baseline.py not found (set TORCH_BASELINE)"
        rc=1
      fi
      ;;
    *)
      echo "unknown stage $stage (build, test, cuda-test, sanitize, lab, prefill, reference, profile, oracle, longctx, bench, all)" >&2
      exit 2
      ;;
  esac
done
exit "$rc"
