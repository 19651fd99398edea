#!/usr/bin/env bash
# Whether the long-context model (configs/models/longctx-llama.json) can learn a task at short
# lengths, before a long recipe is spent on it: the recipe's warm phase (scripts/longctx_phases.sh),
# or the checkpoint PROBE_FROM (or a new model, PROBE_FROM=scratch), then one phase on 2K windows
# (PROBE_MICRO_BATCH of them a step, default 8) of PROBE_TASKS examples
# (PROBE_LENGTHS bytes) with a checkpoint every PROBE_EVERY steps, each checkpoint evaluated on
# held-out examples of PROBE_TASKS at EVAL_LENGTHS (greedy, dense): a learning curve
# of accuracy and of the val loss on the answers (a plateau shows there before any answer is
# right), with what the last checkpoint's wrong answers copied (scripts/needle_outcomes.py).
# PROBE_STAGES makes it several such phases in turn, each from the last one's final checkpoint:
# space-separated stages TASKS[@VT_VARIABLES][:STEPS][/MAX_VAL_LOSS] (runs/longctx-probe-N,
# $OUT_DIR/probe-N_*), each evaluated on the tasks of every stage so far (vt with the stage's chain
# length); a stage with MAX_VAL_LOSS is run again (from the same start, another data order) while
# its last val loss is above it, STAGE_ATTEMPTS (3) runs in all, and the last run goes on. A vt
# curriculum: PROBE_STAGES="vt@1/1.5 vt@2 vt@4"; one task, then all: "niah_multikey:12000
# niah_single,niah_multikey,niah_multivalue,vt". Session 30 ran it with niah_multikey
# at lr 5e-4, 1e-3 (the retrieval was lost) and 1e-4 (10/20 at 512 bytes after 8000 steps), session
# 32 with vt chains of one variable (12/20 at 512 bytes after 8000 steps): docs/verification.md.
# Usage: scripts/longctx_probe.sh MOEFORGE OUT_DIR (environment: PROBE_TASKS, default
# niah_multikey; PROBE_LENGTHS, default 420,520,640; PROBE_LR, default 1e-4; PROBE_STEPS, default
# 8000; PROBE_EVERY, default 2000; PROBE_FROM, a checkpoint or scratch; PROBE_MICRO_BATCH,
# default 8; PROBE_QUESTIONS, one (default) or all: the training documents ask every question of
# their context (`data synth --questions all`); PROBE_VT_VARIABLES, vt's variables per chain in the
# training and the held-out examples (`data synth --vt-variables`, default 4) of a stage that does
# not give its own; PROBE_STAGES; STAGE_ATTEMPTS; EVAL_LENGTHS,
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
read -r -a stages <<< "${PROBE_STAGES:-$probe_tasks}"
for stage in "${stages[@]}"; do parse_stage "$stage" "$steps" 4; done

from=${PROBE_FROM:-}
if [ -z "$from" ]; then
  warm_phase
  from=$(last_checkpoint warm)
fi
init=(--init-from "$from")
[ "$from" = scratch ] && init=()

# The stages of PROBE_STAGES in turn, each from the last one's final checkpoint, each evaluated on
# the tasks of every stage so far (so that forgetting shows).
eval_tasks=""
for stage_idx in "${!stages[@]}"; do
  parse_stage "${stages[$stage_idx]}" "$steps" "${PROBE_VT_VARIABLES:-4}"
  for task in ${stage_tasks//,/ }; do
    [[ ",$eval_tasks," == *",$task,"* ]] || eval_tasks=${eval_tasks:+$eval_tasks,}$task
  done
  name=probe label=""
  if [ ${#stages[@]} -gt 1 ]; then
    name=probe-$((stage_idx + 1)) label="stage $((stage_idx + 1)) (${stages[$stage_idx]}) "
  fi
  "$moeforge" data synth --task "$stage_tasks" --lengths "${PROBE_LENGTHS:-420,520,640}" \
    --num 12000 --seed 7 --format train --loss answer --questions "${PROBE_QUESTIONS:-one}" \
    --vt-variables "$stage_vt" --out "$work/data/longctx-$name" --overwrite
  "$moeforge" data synth --task "$eval_tasks" --lengths "${EVAL_LENGTHS:-512,1024,4096}" \
    --num "${EVAL_NUM:-20}" --seed 2 --vt-variables "$stage_vt" \
    --out "$out/${name}_tasks.jsonl" --overwrite
  phase_until "$stage_max_loss" "${STAGE_ATTEMPTS:-3}" "$name" "longctx-$name" 2048 \
    "${PROBE_MICRO_BATCH:-8}" 1 "$stage_steps" "${PROBE_LR:-0.0001}" "${init[@]}" \
    --set eval.every_steps="$every" --set checkpoint.every_steps="$every" \
    --set checkpoint.keep_last=0 ||
    echo "${label}val loss above $stage_max_loss after ${STAGE_ATTEMPTS:-3} attempts" |
    tee -a "$out/probe_curve.txt"
  for checkpoint in "$work/runs/longctx-$name"/checkpoints/step-*; do
    step=${checkpoint##*/step-}
    "$moeforge" eval --model "$checkpoint" --task "$out/${name}_tasks.jsonl" --device "$device" \
      --predictions "$out/${name}_predictions.jsonl" > "$out/${name}_eval.json"
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
step = int(sys.argv[2])
val = [m["val_loss"] for m in map(json.loads, open(sys.argv[4]))
       if m.get("step") == step and "val_loss" in m]
print(sys.argv[3] + "step", step, "(val loss %s)" % ("%.3f" % val[-1] if val else "not measured"),
      json.dumps({t: {n: g["correct"] for n, g in v["lengths"].items()}
                  for t, v in r["tasks"].items()}))' \
      "$out/${name}_eval.json" "$step" "$label" "$out/metrics_$name.jsonl" |
      tee -a "$out/probe_curve.txt"
  done
  echo "${label}last checkpoint's outcomes: $(scripts/needle_outcomes.py \
    "$out/${name}_tasks.jsonl" "$out/${name}_predictions.jsonl")" | tee -a "$out/probe_curve.txt"
  init=(--init-from "$(last_checkpoint "$name")")
done
