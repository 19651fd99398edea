#!/usr/bin/env python3
"""GPU time per kernel from an `ncu --metrics gpu__time_duration.sum --csv` log: one line per
kernel name (calls, total ms), largest first. With --split-on NAME the log is cut into segments
at each launch of a kernel whose name contains NAME (e.g. embedding_forward_kernel: one segment
per training step) and only the last segment is summed."""
import argparse
import collections
import csv
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("log", help="ncu --csv output (other lines are ignored)")
    parser.add_argument("--split-on", help="sum only the last segment starting at this kernel")
    parser.add_argument("--top", type=int, default=40, help="kernels to print")
    args = parser.parse_args()
    with open(args.log) as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if not rows:
        sys.exit(f"{args.log}: no ncu CSV rows")
    header, rows = rows[0], rows[1:]
    name_idx, value_idx = header.index("Kernel Name"), header.index("Metric Value")
    if args.split_on:
        starts = [i for i, row in enumerate(rows) if args.split_on in row[name_idx]]
        if not starts:
            sys.exit(f"{args.log}: no kernel named like {args.split_on}")
        rows = rows[starts[-1]:]
    totals = collections.defaultdict(lambda: [0, 0.0])
    for row in rows:
        entry = totals[row[name_idx][:100]]
        entry[0] += 1
        entry[1] += float(row[value_idx].replace(",", "")) / 1e6  # ns -> ms
    print(f"{sum(t for _, t in totals.values()):.2f} ms in {len(rows)} kernels")
    for name, (calls, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{calls:6d} {ms:9.3f} ms  {name}")


if __name__ == "__main__":
    main()
