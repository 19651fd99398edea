#!/usr/bin/env python3
"""The time half of MegaScale-MoE's ablation as a table, from `moeforge bench train` runs.

Usage: ablation_table.py RUN.json... (each file's last non-empty line is one run's JSON, as
`gpu-check.sh ablation` writes them; repeats of a variant are summarised by their median).

A variant is the run's layout and gradient-sum dtype. Per variant: the median step, the
grad_reduce and optimizer phases, the step without them ("layers only": our tp holds the whole
model on every GPU, so its gradient sum and AdamW cover every weight where Megatron-LM's would
cover 1/n of the split ones), the exposed exchanges (the *_exchange phases), and both steps
relative to tp's (TP+TP = 1.00), as docs/benchmarks.md reports them. Exits 1 on a file without a
run, or without a tp run to compare against."""
import json
import statistics
import sys


def last_run(path):
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        sys.exit(f"{path}: no bench train output")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as e:
        sys.exit(f"{path}: the last line is not a bench train JSON line ({e})")


def summary(runs):
    """Medians over the repeats of one variant."""
    median = statistics.median
    step = median([r["median_step_ms"] for r in runs])
    grad = median([r["phase_ms"].get("grad_reduce", 0.0) for r in runs])
    opt = median([r["phase_ms"].get("optimizer", 0.0) for r in runs])
    layers = median([r["median_step_ms"] - r["phase_ms"].get("grad_reduce", 0.0) -
                     r["phase_ms"].get("optimizer", 0.0) for r in runs])
    exchanges = median([sum(ms for name, ms in r["phase_ms"].items() if name.endswith("_exchange"))
                        for r in runs])
    return {"step": step, "grad_reduce": grad, "optimizer": opt, "layers": layers,
            "exchanges": exchanges, "repeats": len(runs)}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    variants = {}
    for path in sys.argv[1:]:
        run = last_run(path)
        key = (run.get("layout", "sp_ep"), run["grad_reduce"])
        variants.setdefault(key, []).append(run)
    rows = {key: summary(runs) for key, runs in variants.items()}
    base = rows.get(("tp", "fp32"))
    if base is None:
        sys.exit("no tp run with --grad-reduce fp32 to compare against (TP+TP = 1.00)")
    some = next(iter(variants.values()))[0]
    print(f"{some['config']}: {some['ranks']} GPU(s), groups of {some['expert_parallel']}, "
          f"{some['tokens_per_step']} tokens per step")
    print("| layout | gradient sums | median step (ms) | grad_reduce | optimizer | layers only "
          "| exchanges | relative, whole step | relative, layers only | repeats |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(rows, key=lambda k: (k[0] != "tp", k[0], k[1] != "fp32", k[1]))
    for layout, dtype in order:
        r = rows[(layout, dtype)]
        print(f"| {layout} | {dtype} | {r['step']:.2f} | {r['grad_reduce']:.2f} | "
              f"{r['optimizer']:.2f} | {r['layers']:.2f} | {r['exchanges']:.2f} | "
              f"{base['step'] / r['step']:.2f}x | {base['layers'] / r['layers']:.2f}x | "
              f"{r['repeats']} |")


if __name__ == "__main__":
    main()
