#!/usr/bin/env bash
# Trains the small long-context model of configs/models/longctx-llama.json on one GPU to solve the
# synthetic RULER-style tasks of `moeforge data synth`, then measures dense against FlexPrefill
# prefill on it:
#   1. data, with the loss on the answers only (`data synth --loss answer`; two attempts with the
#      loss on every token plateaued at the filler text's loss and never learned to retrieve):
#      240- and 300-byte niah_single examples (warm), 1K-4K niah_single and niah_multikey (mid),
#      1K-16K of both (long);
#   2. three phases, each from the previous one's weights with a fresh optimizer and its own WSD
#      schedule: WARM_STEPS (4000) on 2K windows of the warm examples at lr 5e-4, where the
#      retrieval mechanism forms; MID_STEPS (1000) on 8K windows of the mid examples at lr 3e-4;
#      LONG_STEPS (700) steps of 2 x 2 windows of 32K (micro-batch 2, accumulation 2) of the long
#      examples at lr 2e-4. About 3 minutes of training on an H200. What failed (session 8 and 9,
#      docs/verification.md): lr 1e-3 or 2e-3 from the start, or on the 420-600-byte mixture from
#      scratch, left the answer loss at guessing; lr 1e-3 in the mid phase undid what the warm
#      phase had learned; the long phase at lr 3e-4 with one micro-batch of 2 windows a step (2 to
#      20 answers) worked once by hand and, in the whole script's first run, swung its val loss
#      0.66 -> 1.19 -> 0.83 and lost the retrieval;
#   3. eval --task on held-out tasks (another seed) at 1K, 4K, 16K, 32K and 128K on the GPU, dense,
#      flex (the fast pattern search, the default) and flex_exact (--flex-search exact), with every
#      answer in predictions_*.jsonl;
#   4. layer DUMP_LAYER's q, k, v of a 128K prompt (generate --dump-qkv on the GPU) from the last
#      model, and `bench prefill --qkv` on it: cuDNN dense against the pattern search + sparse
#      kernel.
# WARM2_STEPS > 0 adds a phase between warm and mid: that many steps on 2K windows of 420-640-byte
# niah_single and niah_multikey examples at lr 3e-4, from the warm model.
# XLONG_STEPS > 0 adds a fourth phase toward 128K: that many steps of 2 x 1 windows of 128K of
# 16K-64K niah_single examples at lr 1e-4; then both the long and the xlong model are evaluated.
# The models stay in runs/ (their paths are printed). Usage:
# scripts/long_context_recipe.sh MOEFORGE OUT_DIR (environment: WARM_STEPS, MID_STEPS, LONG_STEPS,
# WARM2_STEPS and XLONG_STEPS (default 0); EVAL_NUM examples per task and length, default 20;
# EVAL_ATTENTION, default "dense flex flex_exact"; DUMP_LAYER, default 2).
set -euo pipefail
moeforge=$(realpath "$1")
out=$(realpath -m "$2")
cd "$(dirname "$0")/.."
mkdir -p "$out" data runs
eval_num=${EVAL_NUM:-20}
dump_layer=${DUMP_LAYER:-2}
config=configs/train/longctx.json
tasks=niah_single,niah_multikey

"$moeforge" data synth --task niah_single --lengths 240,300 --num 20000 --seed 1 \
  --format train --loss answer --out data/longctx-warm --overwrite
"$moeforge" data synth --task "$tasks" --lengths 1024,2048,4096 --num 4000 --seed 5 \
  --format train --loss answer --out data/longctx-mid --overwrite
"$moeforge" data synth --task "$tasks" --lengths 1024,2048,4096,8192,16384 --num 1500 --seed 11 \
  --format train --loss answer --out data/longctx-long --overwrite

# train_phase NAME DATA SEQ_LEN MICRO_BATCH ACCUM STEPS LR [ARGS...]: one phase into
# runs/longctx-NAME, its metrics (val loss on the answers every quarter) copied to OUT_DIR.
train_phase() {
  local name=$1 data=$2 seq_len=$3 batch=$4 accum=$5 steps=$6 lr=$7
  shift 7
  rm -rf "runs/longctx-$name"
  "$moeforge" train --config "$config" --device cuda --no-progress "$@" \
    --set data.dataset="$PWD/data/$data" --set data.seq_len="$seq_len" \
    --set data.micro_batch_size="$batch" --set data.grad_accum_steps="$accum" \
    --set optimizer.lr="$lr" --set schedule.max_steps="$steps" \
    --set eval.every_steps=$((steps / 4)) --set checkpoint.dir="runs/longctx-$name" \
    --set checkpoint.every_steps=0 > "$out/train_$name.txt"
  cp "runs/longctx-$name/metrics.jsonl" "$out/metrics_$name.jsonl"
  echo "phase $name: $(tail -n 1 "$out/train_$name.txt")"
}
last_checkpoint() { ls -d "runs/longctx-$1"/checkpoints/step-* | tail -n 1; }

train_phase warm longctx-warm 2048 8 1 "${WARM_STEPS:-4000}" 0.0005
mid_from=warm
if [ "${WARM2_STEPS:-0}" -gt 0 ]; then
  "$moeforge" data synth --task "$tasks" --lengths 420,520,640 --num 8000 --seed 7 \
    --format train --loss answer --out data/longctx-warm2 --overwrite
  train_phase warm2 longctx-warm2 2048 8 1 "$WARM2_STEPS" 0.0003 \
    --init-from "$(last_checkpoint warm)"
  mid_from=warm2
fi
train_phase mid longctx-mid 8192 8 1 "${MID_STEPS:-1000}" 0.0003 \
  --init-from "$(last_checkpoint "$mid_from")"
train_phase long longctx-long 32768 2 2 "${LONG_STEPS:-700}" 0.0002 \
  --init-from "$(last_checkpoint mid)"
models=(long)
if [ "${XLONG_STEPS:-0}" -gt 0 ]; then
  "$moeforge" data synth --task niah_single --lengths 16384,32768,65536 --num 300 --seed 13 \
    --format train --loss answer --out data/longctx-xlong --overwrite
  train_phase xlong longctx-xlong 131072 1 2 "$XLONG_STEPS" 0.0001 \
    --init-from "$(last_checkpoint long)"
  models+=(xlong)
fi

# Held-out tasks (seed 2), dense, flex and flex_exact, at 1K, 4K, 16K, 32K and 128K (trained on examples up to
# 16K in 32K windows, or 64K in 128K windows in the xlong phase), for each model.
"$moeforge" data synth --task "$tasks" --lengths 1024,4096,16384,32768 --num "$eval_num" --seed 2 \
  --out "$out/tasks.jsonl" --overwrite
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
      "$moeforge" eval --model "$model" --task "$out/$file.jsonl" --device cuda "${args[@]}" \
        --predictions "$out/predictions_$result.jsonl" > "$out/eval_$result.json"
      echo "eval $name $file $attention: $(cat "$out/eval_$result.json")"
    done
  done
done

# Q/K/V of a real 128K prefill, and the prefill benchmark on it.
prompt=$(python3 -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["prompt"], end="")' \
  "$out/tasks_128k.jsonl")
"$moeforge" generate --model "$model" --prompt "$prompt" --max-new-tokens 1 --temperature 0 \
  --device cuda --dump-qkv "$dump_layer" data/longctx-qkv.safetensors > /dev/null
"$moeforge" bench prefill --qkv data/longctx-qkv.safetensors --seq 8192,32768,65536,130000 \
  > "$out/bench_prefill_qkv.jsonl"
cat "$out/bench_prefill_qkv.jsonl"
