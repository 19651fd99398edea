#!/usr/bin/env bash
# Whether the long-context model (configs/models/longctx-llama.json) can learn a task at short
# lengths, before a long recipe is spent on it: the recipe's warm phase (scripts/longctx_phases.sh),
# or the checkpoint PROBE_FROM (or a new model, PROBE_FROM=scratch), then one phase on 2K windows
# (PROBE_MICRO_BATCH of them a step, default 8) of PROBE_TASKS examples
# (PROBE_LENGTHS bytes) with a checkpoint every PROBE_EVERY steps, each checkpoint evaluated on
# held-out examples of PROBE_TASKS at EVAL_LENGTHS (greedy, dense): a learning curve
# of accuracy, with what the last checkpoint's wrong answers copied (scripts/needle_outcomes.py).
# Session 30 ran it with niah_multikey at lr 5e-4, 1e-3 (the retrieval was lost) and 1e-4 (10/20
# at 512 bytes after 8000 steps): docs/verification.md.
# Usage: scripts/longctx_probe.sh MOEFORGE OUT_DIR (environment: PROBE_TASKS, default
# niah_multikey; PROBE_LENGTHS, default 420,520,640; PROBE_LR, default 1e-4; PROBE_STEPS, default
# 8000; PROBE_EVERY, default 2000; PROBE_FROM, a checkpoint or scratch; PROBE_MICRO_BATCH,
# default 8; PROBE_QUESTIONS, one (default) or all: the training documents ask every question of
# their context (`data synth --questions all`); PROBE_VT_VARIABLES, vt's variables per chain in the
# training and the held-out examples (`data synth --vt-variables`, default 4); EVAL_LENGTHS,
# default 512,1024,4096; EVAL_NUM, default 20; DEVICE, default cuda; LONGCTX_CONFIG, the training
# config and through it the model; WINDOWS, the phases' data.windows (default stream);
# LONGCTX_WORK, where data/ and runs/ go (default the repository root); and the warm phase's
# WARM_STEPS, WARM_MAX_VAL_LOSS, WARM_ATTEMPTS).
set -euo pipefail
moeforge=$(realpath "$1")
out=$(realpath -m "$2")
cd "$(dirname "$0")/.."
mkdir -p "$out"
probe_tasks=${PROBE_TASKS:-niah_multikey}
steps=${PROBE_STEPS:-8000}
every=${PROBE_EVERY:-2000}

source scripts/longctx_phases.sh

"$moeforge" data synth --task "$probe_tasks" --lengths "${PROBE_LENGTHS:-420,520,640}" \
  --num 12000 --seed 7 --format train --loss answer --questions "${PROBE_QUESTIONS:-one}" \
  --vt-variables "${PROBE_VT_VARIABLES:-4}" --out "$work/data/longctx-probe" --overwrite
"$moeforge" data synth --task "$probe_tasks" --lengths "${EVAL_LENGTHS:-512,1024,4096}" \
  --num "${EVAL_NUM:-20}" --seed 2 --vt-variables "${PROBE_VT_VARIABLES:-4}" \
  --out "$out/probe_tasks.jsonl" --overwrite

from=${PROBE_FROM:-}
if [ -z "$from" ]; then
  warm_phase
  from=$(last_checkpoint warm)
fi
init=(--init-from "$from")
[ "$from" = scratch ] && init=()
train_phase probe longctx-probe 2048 "${PROBE_MICRO_BATCH:-8}" 1 "$steps" "${PROBE_LR:-0.0001}" \
  "${init[@]}" \
  --set eval.every_steps="$every" --set checkpoint.every_steps="$every" \
  --set checkpoint.keep_last=0

for checkpoint in "$work"/runs/longctx-probe/checkpoints/step-*; do
  step=${checkpoint##*/step-}
  "$moeforge" eval --model "$checkpoint" --task "$out/probe_tasks.jsonl" --device "$device" \
    --predictions "$out/probe_predictions.jsonl" > "$out/probe_eval.json"
  python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("step", int(sys.argv[2]), json.dumps({t: {n: g["correct"] for n, g in v["lengths"].items()}
                                           for t, v in r["tasks"].items()}))' \
    "$out/probe_eval.json" "$step" | tee -a "$out/probe_curve.txt"
done
echo "last checkpoint's outcomes: $(scripts/needle_outcomes.py "$out/probe_tasks.jsonl" \
  "$out/probe_predictions.jsonl")" | tee -a "$out/probe_curve.txt"
