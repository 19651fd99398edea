#!/usr/bin/env python3
"""scripts/needle_outcomes.py: outcome counts per task and length (correct, another needle by its
place, no needle, each also as the first item of a list; items found for niah_multivalue and vt)
and clear errors for files that do not match."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "needle_outcomes.py")

MULTIKEY_PROMPT = ("Some special magic numbers are hidden in the following text.\n"
                   "The special magic number for kind-wagon is 2530041. The candle is fast. "
                   "The special magic number for old-pillow is 6764992. The stone is gentle. "
                   "The special magic number for tall-road is 9705815.\n"
                   "What is the special magic number for old-pillow? Answer: ")
MULTIVALUE_PROMPT = ("The special magic number for old-pillow is 1111111. "
                     "The special magic number for old-pillow is 2222222.\n"
                     "What are all the special magic numbers for old-pillow? Answer: ")
VT_PROMPT = ("VAR ABCDE = 12345. VAR FGHIJ = ABCDE. VAR KLMNO = 54321.\n"
             "Which variables are assigned the value 12345? Answer: ")


def example(task, length, prompt, answer):
    return {"task": task, "length": length, "depth": 0.5, "prompt": prompt, "answer": answer}


def prediction(task, length, answer, output):
    return {"task": task, "length": length, "depth": 0.5, "answer": answer, "output": output,
            "correct": False}


class NeedleOutcomesTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="needle-outcomes-")

    def write(self, name, rows):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        return path

    def run_script(self, tasks, predictions):
        return subprocess.run([sys.executable, SCRIPT, tasks, predictions], capture_output=True,
                              text=True)

    def test_counts_each_outcome_per_task_and_length(self):
        cases = [
            ("niah_multikey", 1024, MULTIKEY_PROMPT, "6764992", "6764992\nmore text"),
            ("niah_multikey", 1024, MULTIKEY_PROMPT, "6764992", " 9705815 "),
            ("niah_multikey", 1024, MULTIKEY_PROMPT, "6764992", "9705815"),
            ("niah_multikey", 4096, MULTIKEY_PROMPT, "6764992", "2530041"),
            ("niah_multikey", 4096, MULTIKEY_PROMPT, "6764992", "1234567"),
            ("niah_multikey", 512, MULTIKEY_PROMPT, "6764992", "6764992, 97"),
            ("niah_multikey", 512, MULTIKEY_PROMPT, "6764992", "2530041, 6764992"),
            ("niah_multikey", 512, MULTIKEY_PROMPT, "6764992", "12, 6764992"),
            ("niah_multikey", 512, MULTIKEY_PROMPT, "6764992", ""),
            ("niah_multivalue", 1024, MULTIVALUE_PROMPT, "1111111, 2222222", "2222222, 1111111"),
            ("niah_multivalue", 1024, MULTIVALUE_PROMPT, "1111111, 2222222", "2222222 9"),
            ("vt", 1024, VT_PROMPT, "ABCDE, FGHIJ", "KLMNO\nABCDE, FGHIJ"),
        ]
        tasks = self.write("tasks.jsonl", [example(t, n, p, a) for t, n, p, a, _ in cases])
        preds = self.write("preds.jsonl", [prediction(t, n, a, o) for t, n, _, a, o in cases])
        result = self.run_script(tasks, preds)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {
            "niah_multikey": {"1024": {"correct": 1, "needle 2 of 3": 2},
                              "4096": {"needle 0 of 3": 1, "no needle": 1},
                              "512": {"right value, then a list": 1,
                                      "needle 0 of 3, then a list": 1,
                                      "no needle, then a list": 1, "no needle": 1}},
            "niah_multivalue": {"1024": {"2 of 2 items": 1, "1 of 2 items": 1}},
            "vt": {"1024": {"0 of 2 items": 1}},
        })

    def test_files_of_different_examples_are_refused(self):
        tasks = self.write("tasks.jsonl", [example("niah_single", 1024, MULTIKEY_PROMPT, "1")])
        other = self.write("other.jsonl", [prediction("niah_single", 4096, "1", "1")])
        result = self.run_script(tasks, other)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("line 1: the length differs", result.stderr)

        longer = self.write("longer.jsonl", [prediction("niah_single", 1024, "1", "1")] * 2)
        result = self.run_script(tasks, longer)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("holds 1 examples but", result.stderr)


if __name__ == "__main__":
    unittest.main()
