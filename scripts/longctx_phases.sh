# The training phases of the long-context model (configs/models/longctx-llama.json), sourced by
# scripts/long_context_recipe.sh and scripts/longctx_probe.sh. The caller sets `moeforge` (the
# binary), `out` (where each phase's log and metrics go) and works in the repository root.
# DEVICE (default cuda) is where they train and evaluate; LONGCTX_CONFIG (default
# configs/train/longctx.json) is the training config, and through it the model; WINDOWS (default
# stream, what every run up to session 31 used) is data.windows: packed keeps each example whole in
# its window, where stream cuts some between their needles and their answers. LONGCTX_WORK (default
# the repository root) is where the data/ and runs/ of the phases go, so that runs in different
# work directories can train side by side.
longctx_config=$(realpath "${LONGCTX_CONFIG:-configs/train/longctx.json}")
for attempts_var in WARM_ATTEMPTS STAGE_ATTEMPTS; do
  if ! [[ ${!attempts_var:-3} =~ ^[1-9][0-9]*$ ]]; then
    echo "$attempts_var must be a whole number of runs, 1 or more; got '${!attempts_var}'" >&2
    exit 1
  fi
done
# is_loss TEXT: whether TEXT is a val loss to compare with (a non-negative decimal number).
is_loss() { [[ $1 =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]]; }
if ! is_loss "${WARM_MAX_VAL_LOSS:-0.1}"; then
  echo "WARM_MAX_VAL_LOSS must be a number; got '$WARM_MAX_VAL_LOSS'" >&2
  exit 1
fi
device=${DEVICE:-cuda}
work=$(realpath -m "${LONGCTX_WORK:-$PWD}")
mkdir -p "$work/data" "$work/runs"

# train_phase NAME DATA SEQ_LEN MICRO_BATCH ACCUM STEPS LR [ARGS...]: one phase on $device into
# $work/runs/longctx-NAME (only the last checkpoint), its metrics (val loss on the answers every
# quarter) copied to $out. ARGS go last, so their --set overrides the phase's own. Returns 1 when
# the training fails (callers in an `||` list, where `set -e` does not reach, see it too).
train_phase() {
  local name=$1 data=$2 seq_len=$3 batch=$4 accum=$5 steps=$6 lr=$7
  shift 7
  rm -rf "$work/runs/longctx-$name"
  "$moeforge" train --config "$longctx_config" --device "$device" --no-progress \
    --set data.dataset="$work/data/$data" --set data.seq_len="$seq_len" \
    --set data.micro_batch_size="$batch" --set data.grad_accum_steps="$accum" \
    --set data.windows="${WINDOWS:-stream}" \
    --set optimizer.lr="$lr" --set schedule.max_steps="$steps" \
    --set eval.every_steps=$((steps / 4)) --set checkpoint.dir="$work/runs/longctx-$name" \
    --set checkpoint.every_steps=0 "$@" > "$out/train_$name.txt" || {
    echo "phase $name: moeforge train failed ($out/train_$name.txt and the error above)" >&2
    return 1
  }
  cp "$work/runs/longctx-$name/metrics.jsonl" "$out/metrics_$name.jsonl"
  echo "phase $name: $(tail -n 1 "$out/train_$name.txt")"
}

# parse_stage SPEC STEPS VT_VARIABLES: a stage "TASKS[@VT_VARIABLES][:STEPS][/MAX_VAL_LOSS]" of a
# curriculum (longctx_probe.sh's PROBE_STAGES, the recipe's WARM2_STAGES) into stage_tasks,
# stage_steps, stage_vt and stage_max_loss (empty: no bar), with the given defaults where SPEC
# names none.
parse_stage() {
  stage_tasks=$1 stage_steps=$2 stage_vt=$3 stage_max_loss=""
  if [[ $stage_tasks == */* ]]; then
    stage_max_loss=${stage_tasks##*/} stage_tasks=${stage_tasks%/*}
  fi
  if [[ $stage_tasks == *:* ]]; then
    stage_steps=${stage_tasks##*:} stage_tasks=${stage_tasks%:*}
  fi
  if [[ $stage_tasks == *@* ]]; then
    stage_vt=${stage_tasks##*@} stage_tasks=${stage_tasks%@*}
  fi
  if ! [[ $stage_steps =~ ^[1-9][0-9]*$ && $stage_vt =~ ^[1-9][0-9]*$ &&
    -n $stage_tasks ]] || { [ -n "$stage_max_loss" ] && ! is_loss "$stage_max_loss"; }; then
    echo "stage '$1': expected TASKS[@VT_VARIABLES][:STEPS][/MAX_VAL_LOSS], with whole numbers" \
      "of steps and variables and a number for the loss" >&2
    return 1
  fi
}

# phase_until MAX_VAL_LOSS ATTEMPTS NAME DATA SEQ_LEN MICRO_BATCH ACCUM STEPS LR [ARGS...]:
# train_phase, run again while its last val loss is above MAX_VAL_LOSS, ATTEMPTS runs in all, each
# again with the next model seed and data order (attempt k > 1: model.seed k, data.seed 1000 + k;
# GPU training is not bit-reproducible either). Returns 1 when no run got there. An empty
# MAX_VAL_LOSS: one run. A phase can sit on a plateau for a long time and leave it at a random
# step: vt with chains of one variable left its answer loss of 2.9 within 10000 steps in 2 of 6
# runs (sessions 32 and 33).
phase_until() {
  local max_loss=$1 attempts=$2 name=$3 attempt loss seeds=()
  shift 2
  for ((attempt = 1; attempt <= attempts; ++attempt)); do
    [ "$attempt" -eq 1 ] || seeds=(--set model.seed="$attempt" --set data.seed=$((1000 + attempt)))
    # A failed run ends the script, even where phase_until is called in an `||` list.
    train_phase "$@" "${seeds[@]}" || exit 1
    [ -n "$max_loss" ] || return 0
    loss=$(final_val_loss "$name") || exit 1
    python3 -c 'import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]))' "$loss" \
      "$max_loss" && return 0
    echo "phase $name: val loss $loss is above $max_loss (attempt $attempt of $attempts)"
  done
  return 1
}

last_checkpoint() { ls -d "$work/runs/longctx-$1"/checkpoints/step-* | tail -n 1; }

# The last val loss of phase NAME (from its metrics).
final_val_loss() {
  python3 -c 'import json, sys
print([r for r in map(json.loads, open(sys.argv[1])) if "val_loss" in r][-1]["val_loss"])' \
    "$work/runs/longctx-$1/metrics.jsonl"
}

# The warm phase: WARM_STEPS (4000) steps on 2K windows of 240- and 300-byte niah_single examples at
# lr 5e-4, where retrieval forms. It does not always form: in session 30 two runs of the same
# phase (same data, same seed) ended at val loss 0.076 and 1.19, as GPU training is not
# bit-reproducible. A run that ends above WARM_MAX_VAL_LOSS (0.1) is run again with the next model
# seed, up to WARM_ATTEMPTS (3) runs in all; then it fails. The bar was 0.3 until session 32, when
# a warm model at 0.189 passed it and then lost the retrieval in the next phase (runs that went on
# to retrieve ended at 0.02-0.08).
warm_phase() {
  local attempts=${WARM_ATTEMPTS:-3}
  "$moeforge" data synth --task niah_single --lengths 240,300 --num 20000 --seed 1 \
    --format train --loss answer --out "$work/data/longctx-warm" --overwrite
  phase_until "${WARM_MAX_VAL_LOSS:-0.1}" "$attempts" warm longctx-warm 2048 8 1 \
    "${WARM_STEPS:-4000}" 0.0005 && return 0
  echo "phase warm: the retrieval did not form in $attempts attempts" >&2
  return 1
}
