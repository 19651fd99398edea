#!/usr/bin/env python3
"""Crash safety of training (run by ctest with the moeforge binary's path): `moeforge train` with a
checkpoint every step is killed with SIGKILL at least 20 times, half of the kills at random moments
and half inside a checkpoint write (when the process's staging folder appears). After every kill
the index lists only complete checkpoints and `--resume RUN` continues from its newest one; when
the run finally completes, every loss it ever logged and its final weights and optimizer state
equal those of an uninterrupted run bit for bit. What the kills leave behind (staging folders,
checkpoints renamed into place but not yet indexed) is removed when training starts again, so the
finished run's checkpoints/ holds exactly the index and the checkpoints it lists."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import reliability_util as util

MOEFORGE = None
MAX_STEPS = 400  # long enough that 20 kills land before the run ends on an idle machine
MIN_KILLS = 20
KEEP_LAST = 3  # retention deletes old checkpoints after each save: kills land there too
MAX_CYCLES = 60  # a bound on the kill loop (each cycle is one process)


class CrashResumeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="moeforge-crash-")
        cls.data = util.make_dataset(MOEFORGE, cls.tmp)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def start(self, config, run_dir, log_path):
        args = [MOEFORGE, "train", "--config", config, "--no-progress"]
        if util.checkpoint_index(run_dir):
            args += ["--resume", run_dir]
        log = open(log_path, "w")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=util.env_one_thread())
        log.close()
        return proc

    @staticmethod
    def own_staging_steps(run_dir, pid):
        """Steps whose checkpoint the process `pid` is writing or has written under a staging name."""
        try:
            names = os.listdir(os.path.join(run_dir, "checkpoints"))
        except FileNotFoundError:
            return set()
        return {m.group(1) for m in (re.match(rf"step-(\d+)\.tmp-{pid}-", n) for n in names) if m}

    @staticmethod
    def staging_pids(run_dir):
        """The process ids in the staging names in checkpoints/ (io::is_staging_name)."""
        names = os.listdir(os.path.join(run_dir, "checkpoints"))
        return {int(m.group(1)) for m in (re.match(r".+\.tmp[-.](\d+)", n) for n in names) if m}

    def kill_at_checkpoint_write(self, proc, run_dir, rng):
        """Kills proc while it writes its k-th checkpoint (k in 1..3, then up to 20 ms into it)."""
        target = rng.randint(1, 3)
        deadline = time.monotonic() + 30
        seen = set()
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= self.own_staging_steps(run_dir, proc.pid)
            if len(seen) >= target:
                time.sleep(rng.uniform(0, 0.02))
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)

    def assert_resumable(self, run_dir):
        """The index lists only complete checkpoints, in step order."""
        entries = util.checkpoint_index(run_dir)
        steps = [e["step"] for e in entries]
        self.assertEqual(steps, sorted(steps))
        for entry in entries:
            path = os.path.join(run_dir, "checkpoints", entry["path"])
            self.assertTrue(util.is_complete_checkpoint(path), f"index lists incomplete {path}")
        return entries

    def test_kill_9_and_resume_reproduces_the_uninterrupted_run(self):
        reference_dir = os.path.join(self.tmp, "reference")
        reference_config = util.write_train_config(self.tmp, "reference", self.data, reference_dir, MAX_STEPS,
                                                      keep_last=KEEP_LAST)
        util.run([MOEFORGE, "train", "--config", reference_config, "--no-progress"])
        reference = util.losses_by_step(util.read_metrics(os.path.join(reference_dir, "metrics.jsonl")))
        self.assertEqual(sorted(reference), list(range(1, MAX_STEPS + 1)))

        run_dir = os.path.join(self.tmp, "crashed")
        config = util.write_train_config(self.tmp, "crashed", self.data, run_dir, MAX_STEPS, keep_last=KEEP_LAST)
        rng = random.Random(int(os.environ.get("MOEFORGE_CRASH_SEED", "20240607")))
        num_kills = num_kills_in_write = num_resumes = num_removed = 0
        last_step = 0
        for cycle_idx in range(MAX_CYCLES):
            entries = self.assert_resumable(run_dir)
            newest_step = entries[-1]["step"] if entries else 0
            self.assertGreaterEqual(newest_step, last_step, "the newest checkpoint went backwards")
            last_step = newest_step
            if num_kills >= MIN_KILLS and num_kills_in_write >= MIN_KILLS // 2:
                break
            log_path = os.path.join(self.tmp, f"cycle-{cycle_idx}.log")
            proc = self.start(config, run_dir, log_path)
            if cycle_idx % 2 == 0:
                self.kill_at_checkpoint_write(proc, run_dir, rng)
            else:
                time.sleep(rng.uniform(0.02, 0.4))
                proc.send_signal(signal.SIGKILL)
            returncode = proc.wait()
            with open(log_path) as f:
                log = f.read()
            resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
            if resumed:  # (a kill may come before the message)
                newest = os.path.join(run_dir, "checkpoints", entries[-1]["path"])
                self.assertEqual(resumed.groups(), (newest, str(newest_step)))
                num_resumes += 1
                # The leftovers of earlier kills were removed before the resume.
                self.assertLessEqual(self.staging_pids(run_dir), {proc.pid}, log)
            num_removed += len(re.findall(r"^removed .*, left by an interrupted checkpoint save$", log, re.M))
            if returncode == 0:
                break  # finished before the kill
            self.assertEqual(returncode, -signal.SIGKILL, f"train failed by itself:\n{log}")
            num_kills += 1
            if self.own_staging_steps(run_dir, proc.pid):
                num_kills_in_write += 1
        self.assertGreaterEqual(num_kills, MIN_KILLS)
        self.assertGreaterEqual(num_kills_in_write, MIN_KILLS // 2)
        self.assertGreaterEqual(num_resumes, MIN_KILLS // 2)

        self.assert_resumable(run_dir)
        proc = util.run([MOEFORGE, "train", "--config", config, "--no-progress", "--resume", run_dir])
        self.assertIn(f"trained {MAX_STEPS} steps", proc.stdout)
        num_removed += len(re.findall(r"^removed .*, left by an interrupted checkpoint save$", proc.stderr, re.M))
        self.assertGreaterEqual(num_removed, 1, "no kill left anything behind to remove")
        listed = {e["path"] for e in self.assert_resumable(run_dir)}
        self.assertEqual(set(os.listdir(os.path.join(run_dir, "checkpoints"))), listed | {"index.json"})
        crashed = util.losses_by_step(util.read_metrics(os.path.join(run_dir, "metrics.jsonl")))
        self.assertEqual(sorted(crashed), sorted(reference))
        for step, losses in crashed.items():
            self.assertEqual(losses, [reference[step][0]] * len(losses), f"step {step}")
        final = f"step-{MAX_STEPS:08d}"
        for name in ("model.safetensors", "optimizer.safetensors"):
            self.assertEqual(util.read_bytes(os.path.join(run_dir, "checkpoints", final, name)),
                             util.read_bytes(os.path.join(reference_dir, "checkpoints", final, name)), name)
        print(f"{num_kills} kills, {num_kills_in_write} inside a checkpoint write, {num_resumes} resumes, "
              f"{sum(map(len, crashed.values())) - MAX_STEPS} steps redone, {num_removed} leftovers removed",
              file=sys.stderr)


if __name__ == "__main__":
    MOEFORGE = os.path.abspath(sys.argv.pop(1))
    unittest.main()
