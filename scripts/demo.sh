#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, build, tokenize real text (the `fortunes`
# Debian package), train a tiny MoE on the CPU, evaluate it and generate text from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)" --target moeforge
build/moeforge data prepare /usr/share/games/fortunes --exclude '*.dat' --exclude '*.u8' \
  --out data/fortunes-byte --overwrite
build/moeforge train --config configs/train/demo.json --set checkpoint.dir=runs/demo "$@"
build/moeforge eval --model runs/demo --data data/fortunes-byte
build/moeforge generate --model runs/demo --prompt "The meaning of life is" --max-new-tokens 200 \
  --temperature 0.8 --top-p 0.95
