#!/usr/bin/env python3
"""scripts/timeline_summary.py: spans, per-stream busy time, overlap, idle time and launch lags of
a synthetic timeline, and clear errors for bad input."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "timeline_summary.py")


def event(part, kind, stream, start, end, name="k", correlation=0, seq=32768):
    return json.dumps({"seq": seq, "part": part, "kind": kind, "name": name, "device": 0,
                       "stream": stream, "start_us": start, "end_us": end, "bytes": 0,
                       "correlation": correlation})


class TimelineSummaryTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="timeline-")

    def write(self, *lines):
        path = os.path.join(self.dir, "timeline.jsonl")
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        return path

    def run_script(self, *args):
        return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)

    def summaries(self, out):
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def test_spans_busy_overlap_and_idle(self):
        # Stream 7: [0, 10] and [12, 20] (busy 18); stream 9: [5, 15] and [30, 40] (busy 20).
        # Both run in [5, 10] and [12, 15]: overlap 8. Nothing runs in [20, 30]: idle 10.
        path = self.write(
            event("a", "kernel", 7, 0, 10),
            event("a", "memset", 7, 12, 20),
            event("a", "kernel", 9, 5, 15),
            event("a", "kernel", 9, 30, 40),
            event("a", "runtime", 1, -3, 1),
            event("a", "runtime", 1, 2, 4),
        )
        result = self.run_script(path)
        self.assertEqual(result.returncode, 0, result.stderr)
        [summary] = self.summaries(result.stdout)
        self.assertEqual(summary["part"], "a")
        self.assertEqual(summary["gpu_events"], 4)
        self.assertEqual(summary["runtime_calls"], 2)
        self.assertAlmostEqual(summary["span_us"], 40)
        self.assertAlmostEqual(summary["streams"]["7"]["busy_us"], 18)
        self.assertAlmostEqual(summary["streams"]["9"]["busy_us"], 20)
        self.assertAlmostEqual(summary["overlap_us"], 8)
        self.assertAlmostEqual(summary["idle_us"], 10)
        self.assertAlmostEqual(summary["host_span_us"], 7)

    def test_touching_intervals_do_not_overlap(self):
        path = self.write(event("a", "kernel", 1, 0, 10), event("a", "kernel", 2, 10, 20))
        [summary] = self.summaries(self.run_script(path).stdout)
        self.assertEqual(summary["overlap_us"], 0)
        self.assertEqual(summary["idle_us"], 0)

    def test_parts_and_filters(self):
        path = self.write(event("a", "kernel", 1, 0, 10), event("b", "kernel", 1, 0, 4),
                          event("b", "kernel", 1, 0, 6, seq=8192))
        self.assertEqual(len(self.summaries(self.run_script(path).stdout)), 3)
        picked = self.summaries(self.run_script(path, "--part", "b", "--seq", "32768").stdout)
        self.assertEqual([(s["seq"], s["part"], s["span_us"]) for s in picked], [(32768, "b", 4)])
        missing = self.run_script(path, "--part", "c")
        self.assertNotEqual(missing.returncode, 0)
        self.assertIn("no events", missing.stderr)

    def test_kernel_list_with_launch_lag_and_short_names(self):
        path = self.write(
            event("a", "runtime", 1, 0, 2, name="cudaLaunchKernel_v7000", correlation=5),
            event("a", "kernel", 3, 7.5, 9, correlation=5,
                  name="void moeforge::cuda::(anonymous namespace)::select_pass_kernel<double>("
                       "moeforge::cuda::Cut*, int)"),
            event("a", "memset", 3, 1, 2, name="memset"),
        )
        result = self.run_script(path, "--kernels")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = [line.split() for line in result.stdout.splitlines()[2:]]
        self.assertEqual(rows[0], ["1.0", "2.0", "1.0", "3", "-", "memset"])
        self.assertEqual(rows[1], ["7.5", "9.0", "1.5", "3", "5.5", "select_pass_kernel"])

    def test_top_kernels_by_total_time(self):
        path = self.write(event("a", "kernel", 1, 0, 4, name="void ns::small<int>(int)"),
                          event("a", "kernel", 1, 4, 8, name="void ns::small<int>(int)"),
                          event("a", "kernel", 2, 0, 6, name="big(float*)"),
                          event("a", "memset", 2, 6, 20, name="memset"))
        result = self.run_script(path, "--top", "1")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = [line.split() for line in result.stdout.splitlines()[2:]]
        self.assertEqual(rows, [["2", "8.0", "4.0", "small"]])

    def test_bad_lines_are_reported_with_their_number(self):
        path = self.write(event("a", "kernel", 1, 0, 1), "{not json")
        result = self.run_script(path)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(":2: not JSON", result.stderr)
        path = self.write(json.dumps({"seq": 1, "part": "a"}))
        result = self.run_script(path)
        self.assertIn(":1: not a timeline line (no kind, name, stream, start_us, end_us)",
                      result.stderr)


if __name__ == "__main__":
    unittest.main()
