#!/usr/bin/env python3
"""PMA at our scale (docs/pma-experiment.md): train configs/train/pma-experiment.json (a tiny MoE
on the fortunes corpus, WSD schedule: stable until step 3200, then 800 decay steps), then at given
points of the stable phase merge the last N checkpoints spaced V apart with SMA / EMA / WMA and
compare the validation loss of every merge with the latest checkpoint and the annealed model.

Usage: python3 scripts/pma_experiment.py [--moeforge build/moeforge] [--skip-train]
Prints a markdown table (and writes runs/pma-experiment/results.json)."""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "runs", "pma-experiment")
DATA = os.path.join(ROOT, "data", "fortunes-byte")
TOKENS_PER_STEP = 16 * 128
POINTS = [1600, 3200]           # steps in the stable phase where we merge
COUNTS = [3, 5, 10]             # N
INTERVALS = [100, 200]          # V, in steps (x TOKENS_PER_STEP tokens)
METHODS = [("sma", None), ("ema", 0.1), ("ema", 0.2), ("wma", None)]


def run(args):
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def evaluate(moeforge, model):
    out = json.loads(run([moeforge, "eval", "--model", model, "--data", DATA]))
    return out["loss"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moeforge", default=os.path.join(ROOT, "build", "moeforge"))
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    if not args.skip_train:
        run([args.moeforge, "train", "--config", os.path.join(ROOT, "configs/train/pma-experiment.json"),
             "--set", f"checkpoint.dir={RUN}", "--no-progress"])
    ckpt = lambda step: os.path.join(RUN, "checkpoints", f"step-{step:08d}")
    results = {"annealed_4000": evaluate(args.moeforge, ckpt(4000))}
    rows = []
    for point in POINTS:
        latest = evaluate(args.moeforge, ckpt(point))
        results[f"latest_{point}"] = latest
        for n in COUNTS:
            for v in INTERVALS:
                if (n - 1) * v >= point:
                    continue
                for method, alpha in METHODS:
                    out = os.path.join(RUN, "merges", f"{point}-{method}{alpha or ''}-n{n}-v{v}")
                    if not os.path.exists(out):
                        cmd = [args.moeforge, "merge", "--run", RUN, "--count", str(n),
                               "--interval", str(v * TOKENS_PER_STEP),
                               "--until", str(point * TOKENS_PER_STEP), "--method", method, "--out", out]
                        if alpha:
                            cmd += ["--alpha", str(alpha)]
                        run(cmd)
                    loss = evaluate(args.moeforge, out)
                    name = f"{method.upper()}" + (f" {alpha}" if alpha else "")
                    rows.append((point, n, v, name, loss, loss - latest))
    with open(os.path.join(RUN, "results.json"), "w") as f:
        json.dump({"reference": results, "merges": rows}, f, indent=1)
    print(f"annealed model (step 4000): val loss {results['annealed_4000']:.4f}")
    for point in POINTS:
        print(f"latest checkpoint at step {point}: val loss {results[f'latest_{point}']:.4f}")
    print("\n| merge point (step) | N | V (steps) | method | val loss | vs latest |")
    print("|---|---|---|---|---|---|")
    for point, n, v, name, loss, delta in rows:
        print(f"| {point} | {n} | {v} | {name} | {loss:.4f} | {delta:+.4f} |")


if __name__ == "__main__":
    main()
