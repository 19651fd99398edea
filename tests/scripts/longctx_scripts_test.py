#!/usr/bin/env python3
"""scripts/longctx_probe.sh and scripts/longctx_phases.sh on the CPU with a one-layer model and a
few steps a phase: the stages of PROBE_STAGES run in turn and each is evaluated on the tasks of
every stage so far (vt with the stage's chain length), a stage above its MAX_VAL_LOSS runs again
STAGE_ATTEMPTS times and the probe goes on, a warm phase above its bar fails the probe, and
malformed stages and settings are refused before anything trains.
Usage: longctx_scripts_test.py MOEFORGE"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
PROBE = os.path.join(ROOT, "scripts", "longctx_probe.sh")
MOEFORGE = None


class LongctxScriptsTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="longctx-scripts-")
        self.addCleanup(shutil.rmtree, self.dir)
        with open(os.path.join(ROOT, "configs", "models", "longctx-llama.json")) as f:
            model = json.load(f)
        model.update(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=64, intermediate_size=128)
        with open(os.path.join(self.dir, "model.json"), "w") as f:
            json.dump(model, f)
        with open(os.path.join(ROOT, "configs", "train", "longctx.json")) as f:
            train = json.load(f)
        train["model"]["model_config"] = os.path.join(self.dir, "model.json")
        train["schedule"]["warmup_steps"] = 0
        self.config = os.path.join(self.dir, "train.json")
        with open(self.config, "w") as f:
            json.dump(train, f)

    def probe(self, **env):
        environment = dict(os.environ, DEVICE="cpu", LONGCTX_CONFIG=self.config,
                           LONGCTX_WORK=os.path.join(self.dir, "work"), WARM_STEPS="4",
                           PROBE_MICRO_BATCH="2", PROBE_EVERY="2", EVAL_LENGTHS="512",
                           EVAL_NUM="2", OMP_NUM_THREADS="1")
        environment.update(env)
        return subprocess.run(["bash", PROBE, MOEFORGE, os.path.join(self.dir, "out")],
                              capture_output=True, text=True, env=environment, timeout=600)

    def read_out(self, name):
        with open(os.path.join(self.dir, "out", name)) as f:
            return f.read()

    def test_stages_in_turn_with_a_retried_stage(self):
        result = self.probe(PROBE_FROM="scratch", STAGE_ATTEMPTS="2",
                            PROBE_STAGES="niah_single:4 vt@1:4/0.001")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        curve = self.read_out("probe_curve.txt").splitlines()
        points = [re.fullmatch(r"(.*) step (\d+) \(val loss (\d+\.\d{3})\) (\{.*\})", line)
                  for line in curve if " step " in line]
        self.assertTrue(all(points), curve)
        self.assertEqual([(p[1], p[2]) for p in points],
                         [("stage 1 (niah_single:4)", "2"), ("stage 1 (niah_single:4)", "4"),
                          ("stage 2 (vt@1:4/0.001)", "2"), ("stage 2 (vt@1:4/0.001)", "4")])
        for point, metrics in zip(points, ["probe-1", "probe-1", "probe-2", "probe-2"]):
            with open(os.path.join(self.dir, "out", "metrics_%s.jsonl" % metrics)) as f:
                val = [m["val_loss"] for m in map(json.loads, f)
                       if m.get("step") == int(point[2]) and "val_loss" in m]
            self.assertEqual(point[3], "%.3f" % val[-1], point[0])
        self.assertEqual(sorted(json.loads(points[-1][4])), ["niah_single", "vt"])
        self.assertIn("stage 2 (vt@1:4/0.001) val loss above 0.001 after 2 attempts", curve)
        self.assertIn("is above 0.001 (attempt 1 of 2)", result.stdout)
        self.assertIn("is above 0.001 (attempt 2 of 2)", result.stdout)
        self.assertNotIn("phase probe-1: val loss", result.stdout)
        with open(os.path.join(self.dir, "out", "probe-2_tasks.jsonl")) as f:
            answers = [json.loads(line)["answer"] for line in f if '"task":"vt"' in line]
        self.assertTrue(answers)
        self.assertTrue(all("," not in answer for answer in answers), answers)

    def test_warm_phase_fails_above_its_bar(self):
        # One attempt (each trains 8 windows a step on the CPU); the stage test runs two.
        result = self.probe(WARM_MAX_VAL_LOSS="0.0001", WARM_ATTEMPTS="1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("phase warm: val loss", result.stdout)
        self.assertIn("is above 0.0001 (attempt 1 of 1)", result.stdout)
        self.assertIn("the retrieval did not form in 1 attempts", result.stderr)
        self.assertNotIn("phase probe", result.stdout)

    def test_malformed_settings_are_refused_before_training(self):
        cases = [({"PROBE_STAGES": "niah_single:4 " + spec},
                  "expected TASKS[@VT_VARIABLES][:STEPS][/MAX_VAL_LOSS]")
                 for spec in ["vt@1:many", "vt/abc", "vt@x", ":100"]]
        cases += [({"STAGE_ATTEMPTS": "abc"}, "STAGE_ATTEMPTS must be a whole number"),
                  ({"WARM_ATTEMPTS": "0"}, "WARM_ATTEMPTS must be a whole number"),
                  ({"WARM_MAX_VAL_LOSS": "low"}, "WARM_MAX_VAL_LOSS must be a number")]
        for env, message in cases:
            result = self.probe(**env)
            self.assertNotEqual(result.returncode, 0, env)
            self.assertIn(message, result.stderr)
            self.assertFalse(os.path.exists(os.path.join(self.dir, "work", "runs", "longctx-warm")),
                             env)

    def test_a_failed_training_ends_the_probe(self):
        # Every stage trains in an `||` list, where `set -e` does not stop a failed command; with
        # a bar or without, nothing may run after the failure (no evaluation, no retry).
        for stages in ["niah_single:4", "niah_single:4/1"]:
            result = self.probe(PROBE_FROM="scratch", PROBE_LR="-1", PROBE_STAGES=stages)
            self.assertNotEqual(result.returncode, 0, stages)
            self.assertIn("phase probe: moeforge train failed", result.stderr)
            self.assertNotIn("(attempt", result.stdout)
            for name in ["probe_eval.json", "probe_curve.txt"]:
                self.assertFalse(os.path.exists(os.path.join(self.dir, "out", name)), name)


if __name__ == "__main__":
    MOEFORGE = os.path.abspath(sys.argv.pop(1))
    unittest.main()
