#!/usr/bin/env bash
# Trains the small long-context model of configs/models/longctx-llama.json on one GPU to solve the
# synthetic RULER-style tasks of `moeforge data synth`, then measures dense against FlexPrefill
# prefill on it:
#   1. data, with the loss on the answers only (`data synth --loss answer`; two attempts with the
#      loss on every token plateaued at the filler text's loss and never learned to retrieve):
#      240- and 300-byte niah_single examples (warm), 1K-4K examples of TASKS (mid), 1K-16K of
#      them (long);
#   2. three phases (scripts/longctx_phases.sh), each from the previous one's weights with a fresh
#      optimizer and its own WSD schedule: WARM_STEPS (4000) on 2K windows of the warm examples at
#      lr 5e-4, where the retrieval mechanism forms (run again with the next model seed when it ends
#      above val loss WARM_MAX_VAL_LOSS, 0.1: it failed in 1 of 2 identical runs in session 30, and
#      a warm model at 0.189 lost the retrieval in session 32); MID_STEPS (1000) on 8K windows of
#      the mid examples at lr 3e-4; LONG_STEPS (700) steps of 2 x 2 windows of 32K (micro-batch 2,
#      accumulation 2) of the long examples at lr 2e-4. About 3 minutes of training on an H200. What
#      failed (sessions 8, 9 and 30, docs/verification.md): lr 1e-3 or 2e-3 from the start, or on
#      the 420-600-byte mixture from scratch, left the answer loss at guessing; lr 1e-3 in the mid
#      phase undid what the warm phase had learned; the long phase at lr 3e-4 with one micro-batch
#      of 2 windows a step (2 to 20 answers) worked once by hand and, in the whole script's first
#      run, swung its val loss 0.66 -> 1.19 -> 0.83 and lost the retrieval; niah_multikey alone
#      after the warm phase at lr 5e-4 or 1e-3 lost the retrieval too (val loss 1.5-2.0, digits
#      guessed); all four tasks with QUESTIONS=all WARM2_STEPS=12000 WARM2_LR=3e-4 (session 31,
#      WINDOWS stream) solved niah_single only (niah_multikey 0-5 of 20, the other two 0);
#      WINDOWS=packed TASKS=niah_single,niah_multikey with the same warm2 (session 32) from a warm
#      model at val loss 0.189 (then accepted) lost the retrieval in warm2 (val loss 1.84 -> 1.57; 2
#      of 160 right at the end); as probes at 512-1024 bytes (session 33), vt with one variable
#      left its plateau in 2 of 6 runs of 8000-16000 steps (hence a stage's /MAX_VAL_LOSS), and
#      the four tasks together answered niah_multikey with lists (0/20) or, after niah_multikey
#      alone, niah_multivalue with one value;
#   3. eval --task on held-out tasks (another seed) at 1K, 4K, 16K, 32K and 128K on the GPU, dense,
#      flex (the fast pattern search, the default) and flex_exact (--flex-search exact), with every
#      answer in predictions_*.jsonl and what the wrong ones copied in outcomes_*.json
#      (scripts/needle_outcomes.py);
#   4. layer DUMP_LAYER's q, k, v of a 128K prompt (generate --dump-qkv on the GPU) from the last
#      model, and `bench prefill --qkv` on it: cuDNN dense against the pattern search + sparse
#      kernel.
# TASKS (default niah_single,niah_multikey; any of the four of `data synth`) are the tasks of the
# mid, long and warm2 phases and of the evaluation (the warm phase is niah_single only).
# QUESTIONS=all makes those phases' documents ask every question of their context (`data synth
# --questions all`: each other key of niah_multikey, the other chain of vt); default one.
# WARM2_STEPS > 0 adds a phase between warm and mid: that many steps on 2K windows of 420-640-byte
# examples of TASKS at lr WARM2_LR (3e-4), from the warm model. WARM2_STAGES makes it several such
# phases in turn (warm2-1, warm2-2, ...), each from the last: space-separated stages
# TASKS[@VT_VARIABLES][:STEPS][/MAX_VAL_LOSS] as longctx_probe.sh's PROBE_STAGES (STEPS default
# WARM2_STEPS or 12000; a stage above MAX_VAL_LOSS at its end runs again, STAGE_ATTEMPTS (3) runs
# in all, and the last goes on), e.g. "niah_multikey vt@1/1.5 vt@2
# niah_single,niah_multikey,niah_multivalue,vt". VT_VARIABLES (default 4) is vt's chain length in
# the mid and long phases, the stages that name none and the evaluation.
# MID_LENGTHS and LONG_LENGTHS (defaults 1024,2048,4096 and 1024,...,16384) are the example lengths
# of the mid and long phases. With WINDOWS=packed the defaults fill only 62-63% of the window
# tokens (an example of half a window plus its answers no longer fits twice); 768,1792,3840 and
# 1000,2000,4000,8000,16000 fill 94-95% (session 32, four tasks with QUESTIONS=all).
# XLONG_STEPS > 0 adds a fourth phase toward 128K: that many steps of 2 x 1 windows of 128K of
# 16K-64K niah_single examples at lr 1e-4; then both the long and the xlong model are evaluated.
# The models stay in runs/ (their paths are printed), or in LONGCTX_WORK's runs/. Usage:
# scripts/long_context_recipe.sh MOEFORGE OUT_DIR (environment: TASKS; MID_LENGTHS, LONG_LENGTHS;
# WARM_STEPS, MID_STEPS, LONG_STEPS, WARM2_STEPS and XLONG_STEPS (default 0), WARM2_LR,
# WARM2_STAGES, STAGE_ATTEMPTS; QUESTIONS; VT_VARIABLES; WARM_MAX_VAL_LOSS and WARM_ATTEMPTS (3);
# EVAL_NUM examples per task and length, default 20; EVAL_ATTENTION, default "dense flex
# flex_exact"; DUMP_LAYER, default 2; DEVICE, default cuda: where the phases train and the
# evaluation runs, while bench prefill needs the GPU; WINDOWS, the phases' data.windows, default
# stream, and LONGCTX_WORK, where data/ and runs/ go: scripts/longctx_phases.sh).
set -euo pipefail
moeforge=$(realpath "$1")
out=$(realpath -m "$2")
cd "$(dirname "$0")/.."
mkdir -p "$out"
eval_num=${EVAL_NUM:-20}
dump_layer=${DUMP_LAYER:-2}
tasks=${TASKS:-niah_single,niah_multikey}
questions=${QUESTIONS:-one}
vt_variables=${VT_VARIABLES:-4}

source scripts/longctx_phases.sh
read -r -a warm2_stages <<< "${WARM2_STAGES:-}"
if [ ${#warm2_stages[@]} -eq 0 ] && [ "${WARM2_STEPS:-0}" -gt 0 ]; then
  warm2_stages=("$tasks:$WARM2_STEPS")
fi
for stage in "${warm2_stages[@]}"; do parse_stage "$stage" 12000 4; done

"$moeforge" data synth --task "$tasks" --lengths "${MID_LENGTHS:-1024,2048,4096}" --num 4000 \
  --seed 5 --format train --loss answer --questions "$questions" --vt-variables "$vt_variables" \
  --out "$work/data/longctx-mid" --overwrite
"$moeforge" data synth --task "$tasks" --lengths "${LONG_LENGTHS:-1024,2048,4096,8192,16384}" \
  --num 1500 --seed 11 --format train --loss answer --questions "$questions" \
  --vt-variables "$vt_variables" --out "$work/data/longctx-long" --overwrite

warm_phase
mid_from=warm
for stage_idx in "${!warm2_stages[@]}"; do
  parse_stage "${warm2_stages[$stage_idx]}" "${WARM2_STEPS:-12000}" "$vt_variables"
  name=warm2
  [ ${#warm2_stages[@]} -eq 1 ] || name=warm2-$((stage_idx + 1))
  "$moeforge" data synth --task "$stage_tasks" --lengths 420,520,640 --num 8000 --seed 7 \
    --format train --loss answer --questions "$questions" --vt-variables "$stage_vt" \
    --out "$work/data/longctx-$name" --overwrite
  phase_until "$stage_max_loss" "${STAGE_ATTEMPTS:-3}" "$name" "longctx-$name" 2048 8 1 \
    "$stage_steps" "${WARM2_LR:-0.0003}" --init-from "$(last_checkpoint "$mid_from")" ||
    echo "phase $name: val loss above $stage_max_loss after ${STAGE_ATTEMPTS:-3} attempts; going on"
  mid_from=$name
done
train_phase mid longctx-mid 8192 8 1 "${MID_STEPS:-1000}" 0.0003 \
  --init-from "$(last_checkpoint "$mid_from")"
train_phase long longctx-long 32768 2 2 "${LONG_STEPS:-700}" 0.0002 \
  --init-from "$(last_checkpoint mid)"
models=(long)
if [ "${XLONG_STEPS:-0}" -gt 0 ]; then
  "$moeforge" data synth --task niah_single --lengths 16384,32768,65536 --num 300 --seed 13 \
    --format train --loss answer --out "$work/data/longctx-xlong" --overwrite
  train_phase xlong longctx-xlong 131072 1 2 "$XLONG_STEPS" 0.0001 \
    --init-from "$(last_checkpoint long)"
  models+=(xlong)
fi

# Held-out tasks (seed 2), dense, flex and flex_exact, at 1K, 4K, 16K, 32K and 128K (trained on examples up to
# 16K in 32K windows, or 64K in 128K windows in the xlong phase), for each model.
"$moeforge" data synth --task "$tasks" --lengths 1024,4096,16384,32768 --num "$eval_num" --seed 2 \
  --vt-variables "$vt_variables" --out "$out/tasks.jsonl" --overwrite
"$moeforge" data synth --task niah_single --lengths 130000 --num 5 --seed 3 \
  --out "$out/tasks_128k.jsonl" --overwrite
for name in "${models[@]}"; do
  model=$(last_checkpoint "$name")
  echo "model $name: $model"
  for attention in ${EVAL_ATTENTION:-dense flex flex_exact}; do
    args=(--attention "${attention%_exact}")
    [ "$attention" = flex_exact ] && args+=(--flex-search exact)
    for file in tasks tasks_128k; do
      result=$name-${file}_$attention
      "$moeforge" eval --model "$model" --task "$out/$file.jsonl" --device "$device" "${args[@]}" \
        --predictions "$out/predictions_$result.jsonl" > "$out/eval_$result.json"
      echo "eval $name $file $attention: $(cat "$out/eval_$result.json")"
      scripts/needle_outcomes.py "$out/$file.jsonl" "$out/predictions_$result.jsonl" \
        > "$out/outcomes_$result.json"
      echo "outcomes $name $file $attention: $(cat "$out/outcomes_$result.json")"
    done
  done
done

# Q/K/V of a real 128K prefill, and the prefill benchmark on it.
prompt=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["prompt"], end="")' \
  "$out/tasks_128k.jsonl")
"$moeforge" generate --model "$model" --prompt "$prompt" --max-new-tokens 1 --temperature 0 \
  --device "$device" --dump-qkv "$dump_layer" "$work/data/longctx-qkv.safetensors" > /dev/null
"$moeforge" bench prefill --qkv "$work/data/longctx-qkv.safetensors" --seq 8192,32768,65536,130000 \
  > "$out/bench_prefill_qkv.jsonl"
cat "$out/bench_prefill_qkv.jsonl"
