#!/usr/bin/env python3
"""scripts/ablation_table.py: medians per variant, ratios against tp, and clear errors."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "ablation_table.py")


def bench_line(layout, grad_reduce, step, grad, opt, exchanges):
    """One bench train JSON line with the fields the table reads."""
    phases = {"grad_reduce": grad, "optimizer": opt, "attention": 1.0,
              "attention_exchange": exchanges / 2, "moe_backward_exchange": exchanges / 2}
    return json.dumps({"config": "configs/bench/mixtral-ablation.json", "ranks": 2,
                       "expert_parallel": 2, "tokens_per_step": 8192, "layout": layout,
                       "grad_reduce": grad_reduce, "median_step_ms": step, "phase_ms": phases})


class AblationTableTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="ablation-")

    def write(self, name, *lines):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        return path

    def table(self, *paths):
        return subprocess.run([sys.executable, SCRIPT, *paths], capture_output=True, text=True)

    def row(self, out, layout, dtype):
        rows = [line for line in out.splitlines() if line.startswith(f"| {layout} | {dtype} |")]
        self.assertEqual(len(rows), 1, out)
        return [cell.strip() for cell in rows[0].strip("|").split("|")]

    def test_medians_and_ratios_against_tp(self):
        paths = [
            # Progress text before the JSON line, as bench train prints it with 2>&1.
            self.write("a.json", "step 1/9: loss 10.6",
                       bench_line("tp", "fp32", 24.0, 5.0, 3.0, 2.0)),
            self.write("b.json", bench_line("tp", "fp32", 26.0, 5.0, 3.0, 2.0)),
            self.write("c.json", bench_line("tp", "fp32", 100.0, 5.0, 3.0, 2.0)),
            self.write("d.json", bench_line("sp_ep", "fp32", 16.0, 1.0, 2.0, 1.0)),
            self.write("e.json", bench_line("sp_ep", "bf16", 17.0, 1.5, 2.0, 1.0)),
        ]
        result = self.table(*paths)
        self.assertEqual(result.returncode, 0, result.stderr)
        tp = self.row(result.stdout, "tp", "fp32")
        # The median of 24, 26 and 100 is 26; layers only 26 - 5 - 3 = 18.
        self.assertEqual(tp[2:], ["26.00", "5.00", "3.00", "18.00", "2.00", "1.00x", "1.00x", "3"])
        sp_ep = self.row(result.stdout, "sp_ep", "fp32")
        # Layers only 16 - 1 - 2 = 13; relative 26 / 16 and 18 / 13.
        self.assertEqual(sp_ep[5:8], ["13.00", "1.00", f"{26 / 16:.2f}x"])
        self.assertEqual(sp_ep[8], f"{18 / 13:.2f}x")
        bf16 = self.row(result.stdout, "sp_ep", "bf16")
        self.assertEqual(bf16[5], "13.50")
        self.assertEqual(bf16[8], f"{18 / 13.5:.2f}x")
        self.assertIn("2 GPU(s), groups of 2", result.stdout)

    def test_without_a_tp_run_it_says_so(self):
        result = self.table(self.write("d.json", bench_line("sp_ep", "fp32", 16.0, 1.0, 2.0, 1.0)))
        self.assertEqual(result.returncode, 1)
        self.assertIn("no tp run", result.stderr)

    def test_a_file_without_a_run_names_the_file(self):
        empty = self.write("empty.json")
        result = self.table(empty)
        self.assertEqual(result.returncode, 1)
        self.assertIn("empty.json: no bench train output", result.stderr)
        broken = self.write("broken.json", "step 3/9: loss 10.5")
        result = self.table(broken)
        self.assertEqual(result.returncode, 1)
        self.assertIn("broken.json: the last line is not a bench train JSON line", result.stderr)


if __name__ == "__main__":
    unittest.main()
