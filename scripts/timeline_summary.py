#!/usr/bin/env python3
"""Sums up a kernel timeline (`moeforge bench prefill --kernel-timeline FILE`): per (seq, part),
the GPU span (first start to last end of its kernels, memsets and memcpys), the busy time of each
stream (the union of its intervals), the time two or more streams ran at once, the time no GPU
work ran (idle), and the host's span of CUDA runtime calls. With --top N, also the N kernel names
with the most GPU time; with --kernels, every GPU event in start order: start, end and duration
(us), stream, the time from the end of the runtime call that launched it to its start (lag), and
its short name. --seq and --part pick entries."""
import argparse
import collections
import json
import re
import sys

GPU_KINDS = ("kernel", "memset", "memcpy")
FIELDS = ("seq", "part", "kind", "name", "stream", "start_us", "end_us")


def union_length(intervals):
    """Total length covered by the intervals [(start, end), ...]."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def overlap_length(per_stream):
    """Time covered by the intervals of at least two of the streams ({stream: [(s, e), ...]})."""
    edges = []
    for intervals in per_stream.values():
        for start, end in intervals:
            edges.append((start, 1))
            edges.append((end, -1))
    # Edges at equal times add zero length between them, so their order does not matter.
    edges.sort()
    total, depth, last = 0.0, 0, None
    for time, step in edges:
        if depth >= 2 and last is not None:
            total += time - last
        depth += step
        last = time
    return total


def short_name(name):
    """A kernel's name without arguments, template arguments and namespaces."""
    depth, plain = 0, []
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            plain.append(ch)
    words = "".join(plain).split()
    return re.split("::", words[-1])[-1] if words else name


def summarize(events):
    """The summary of one part's events (dicts of the timeline's lines)."""
    gpu = [e for e in events if e["kind"] in GPU_KINDS]
    host = [e for e in events if e["kind"] == "runtime"]
    per_stream = collections.defaultdict(list)
    for e in gpu:
        per_stream[e["stream"]].append((e["start_us"], e["end_us"]))
    summary = {"gpu_events": len(gpu), "runtime_calls": len(host)}
    if gpu:
        begin = min(e["start_us"] for e in gpu)
        end = max(e["end_us"] for e in gpu)
        busy = union_length([interval for v in per_stream.values() for interval in v])
        summary.update({
            "span_us": end - begin,
            "idle_us": end - begin - busy,
            "overlap_us": overlap_length(per_stream),
            "streams": {str(s): {"events": len(v), "busy_us": union_length(v)}
                        for s, v in sorted(per_stream.items())},
        })
    if host:
        summary["host_span_us"] = (max(e["end_us"] for e in host) -
                                   min(e["start_us"] for e in host))
    return summary


def kernel_rows(events):
    """Every GPU event in start order, with its launch lag where its runtime call is recorded."""
    launches = {e["correlation"]: e for e in events
                if e["kind"] == "runtime" and e["correlation"]}
    rows = []
    for e in sorted((e for e in events if e["kind"] in GPU_KINDS), key=lambda e: e["start_us"]):
        call = launches.get(e["correlation"]) if e["correlation"] else None
        lag = f"{e['start_us'] - call['end_us']:8.1f}" if call else "       -"
        rows.append(f"{e['start_us']:9.1f} {e['end_us']:9.1f} {e['end_us'] - e['start_us']:8.1f} "
                    f"{e['stream']:>6} {lag}  {short_name(e['name'])}")
    return rows


def top_rows(events, count):
    """The count short kernel names with the most GPU time: calls, total and mean (us)."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e["kind"] == "kernel":
            entry = totals[short_name(e["name"])]
            entry[0] += 1
            entry[1] += e["end_us"] - e["start_us"]
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:count]
    return [f"{calls:6d} {total:10.1f} {total / calls:8.1f}  {name}"
            for name, (calls, total) in ranked]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("timeline", help="the JSONL file of --kernel-timeline")
    parser.add_argument("--seq", type=int, help="only this length")
    parser.add_argument("--part", help="only this part (e.g. flex_select_fast)")
    parser.add_argument("--kernels", action="store_true", help="list every GPU event")
    parser.add_argument("--top", type=int, default=0,
                        help="list the N kernel names with the most GPU time (calls, total, mean)")
    args = parser.parse_args()
    parts = collections.defaultdict(list)
    with open(args.timeline) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as error:
                sys.exit(f"{args.timeline}:{number}: not JSON ({error})")
            missing = [k for k in FIELDS if not isinstance(event, dict) or k not in event]
            if missing:
                sys.exit(f"{args.timeline}:{number}: not a timeline line (no {', '.join(missing)})")
            key = (event["seq"], event["part"])
            if args.seq is not None and key[0] != args.seq:
                continue
            if args.part is not None and key[1] != args.part:
                continue
            event.setdefault("correlation", 0)
            parts[key].append(event)
    if not parts:
        sys.exit(f"{args.timeline}: no events" +
                 (" for the given --seq / --part" if args.seq or args.part else ""))
    for (seq, part), events in parts.items():
        print(json.dumps({"seq": seq, "part": part, **summarize(events)}))
        if args.top > 0:
            print("   calls   total_us  mean_us  name")
            for row in top_rows(events, args.top):
                print("  " + row)
        if args.kernels:
            print("  start_us    end_us   dur_us stream   lag_us  name")
            for row in kernel_rows(events):
                print("  " + row)


if __name__ == "__main__":
    main()
