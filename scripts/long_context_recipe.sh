#!/usr/bin/env bash
# Trains the small long-context model of configs/models/longctx-llama.json on one GPU, within a
# time budget, to solve the synthetic RULER-style tasks of `moeforge data synth`, then measures
# dense against FlexPrefill prefill on it:
#   1. data: short examples (420 and 600 bytes) of niah_single, niah_multikey and niah_multivalue,
#      long ones (1K ... 16K) of niah_single and niah_multikey, with the loss on the answers only
#      (`data synth --loss answer`: two earlier attempts with the loss on every token plateaued at
#      the filler text's loss and never learned to retrieve: 0 of 210 tasks answered);
#   2. phase 1 (SHORT_SECONDS): 2K windows of the short examples (where the retrieval mechanism
#      forms); phase 2 (LONG_SECONDS): 32K windows of the long mixture,
#      starting from phase 1's weights. Each phase first times 10 steps and then trains as many
#      steps as fit its budget, with the whole WSD schedule (warmup, constant, decay);
#   3. eval --task on held-out tasks (another seed) at 1K, 4K, 16K, 32K and 128K, dense and flex,
#      on the GPU, with every answer in predictions_*.jsonl;
#   4. layer DUMP_LAYER's q, k, v of a 128K prompt (generate --dump-qkv on the GPU), and
#      `bench prefill --qkv` on it: cuDNN dense against the pattern search + sparse kernel.
# Usage: scripts/long_context_recipe.sh MOEFORGE OUT_DIR (environment: SHORT_SECONDS, default
# 120; LONG_SECONDS, default 130; EVAL_NUM examples per task and length, default 20).
set -euo pipefail
moeforge=$(realpath "$1")
out=$(realpath -m "$2")
cd "$(dirname "$0")/.."
mkdir -p "$out" data runs
short_seconds=${SHORT_SECONDS:-120}
long_seconds=${LONG_SECONDS:-130}
eval_num=${EVAL_NUM:-20}
dump_layer=${DUMP_LAYER:-2}
config=configs/train/longctx.json
tasks=niah_single,niah_multikey

"$moeforge" data synth --task "$tasks,niah_multivalue" --lengths 420,600 --num 30000 --seed 1 \
  --format train --loss answer --out data/longctx-short --overwrite
"$moeforge" data synth --task "$tasks" --lengths 1024,2048,4096,8192,16384 --num 1500 --seed 11 \
  --format train --loss answer --out data/longctx-long --overwrite

# train_phase NAME SECONDS ARGS...: a 10-step probe for the step rate, then the real run.
train_phase() {
  local name=$1 seconds=$2
  shift 2
  rm -rf "runs/longctx-probe" "runs/longctx-$name"
  "$moeforge" train --config "$config" --device cuda --no-progress "$@" \
    --set checkpoint.dir=runs/longctx-probe --set schedule.max_steps=10 \
    --set schedule.warmup_steps=5 --set log.every_steps=5 --set eval.every_steps=0 > /dev/null
  local rate
  rate=$(python3 -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l]
print(rows[-1]["tokens_per_s"])' runs/longctx-probe/metrics.jsonl)
  local steps
  steps=$(python3 -c 'import sys; print(max(50, int(float(sys.argv[1]) * float(sys.argv[2]) / float(sys.argv[3]))))' \
    "$rate" "$seconds" "$((SEQ * BATCH))")
  echo "phase $name: $rate tokens/s in the probe -> $steps steps of $SEQ x $BATCH tokens"
  "$moeforge" train --config "$config" --device cuda --no-progress "$@" \
    --set checkpoint.dir="runs/longctx-$name" --set schedule.max_steps="$steps" \
    --set checkpoint.every_steps=0 --set eval.every_steps=0 > "$out/train_$name.txt"
  cp "runs/longctx-$name/metrics.jsonl" "$out/metrics_$name.jsonl"
  rm -rf runs/longctx-probe
}

SEQ=2048 BATCH=32 train_phase short "$short_seconds" \
  --set data.dataset="$PWD/data/longctx-short" --set data.seq_len=2048 \
  --set data.micro_batch_size=32
short_ckpt=$(ls -d runs/longctx-short/checkpoints/step-* | tail -n 1)
SEQ=32768 BATCH=2 train_phase long "$long_seconds" --init-from "$short_ckpt"
model=$(ls -d runs/longctx-long/checkpoints/step-* | tail -n 1)
mkdir -p "$out/model"
cp "$model"/config.json "$model"/model.safetensors "$model"/moeforge_tokenizer.json "$out/model/"

# Held-out tasks (seed 2), dense and flex, at 1K, 4K, 16K, 32K and 128K (trained on examples up to
# 16K in 32K windows).
"$moeforge" data synth --task "$tasks" --lengths 1024,4096,16384,32768 --num "$eval_num" --seed 2 \
  --out "$out/tasks.jsonl" --overwrite
"$moeforge" data synth --task niah_single --lengths 130000 --num 5 --seed 3 \
  --out "$out/tasks_128k.jsonl" --overwrite
for attention in dense flex; do
  for file in tasks tasks_128k; do
    "$moeforge" eval --model "$model" --task "$out/$file.jsonl" --device cuda \
      --attention "$attention" --predictions "$out/predictions_${file}_$attention.jsonl" \
      > "$out/eval_${file}_$attention.json"
    echo "eval $file $attention: $(cat "$out/eval_${file}_$attention.json")"
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
