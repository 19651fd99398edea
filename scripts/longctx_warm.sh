#!/usr/bin/env bash
# Trains only the warm phase of the long-context model (scripts/longctx_phases.sh: niah_single at
# 240-300 bytes, where retrieval forms) and prints its checkpoint, for probes that start from one
# shared warm model (scripts/gpu-check.sh probe with PROBE_PARALLEL=1).
# Usage: scripts/longctx_warm.sh MOEFORGE OUT_DIR (environment as scripts/longctx_phases.sh:
# DEVICE, LONGCTX_CONFIG, LONGCTX_WORK, WINDOWS, WARM_STEPS, WARM_MAX_VAL_LOSS, WARM_ATTEMPTS).
set -euo pipefail
moeforge=$(realpath "$1")
out=$(realpath -m "$2")
cd "$(dirname "$0")/.."
mkdir -p "$out"

source scripts/longctx_phases.sh

warm_phase >&2
last_checkpoint warm
