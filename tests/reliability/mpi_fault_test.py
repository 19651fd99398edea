#!/usr/bin/env python3
"""Distributed faults (run by ctest with the moeforge binary's path; needs MOEFORGE_MPIEXEC): under
`mpirun -np 2 moeforge train`, a rank killed with SIGKILL (rank 0 or 1, while training or while
rank 0 writes a checkpoint) or a rank that fails with an error (rank 0 cannot read the checkpoint index)
must end the whole job within JOB_DEADLINE_S with a non-zero exit code and a message naming the
cause, leaving no rank process behind; never a hang."""
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
MPIEXEC = os.environ.get("MOEFORGE_MPIEXEC")
JOB_DEADLINE_S = 30
START_DEADLINE_S = 60


def rank_processes(launcher_pid):
    """{rank: pid} of the launcher's child processes that carry OMPI_COMM_WORLD_RANK."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent_pid = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent_pid != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if b"OMPI_COMM_WORLD_RANK" in env:
            ranks[int(env[b"OMPI_COMM_WORLD_RANK"])] = int(entry)
    return ranks


def is_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@unittest.skipUnless(MPIEXEC, "built without MPI (MOEFORGE_MPIEXEC is not set)")
class MpiFaultTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="moeforge-mpifault-")
        cls.data = util.make_dataset(MOEFORGE, cls.tmp)
        cls.rng = random.Random(11)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def launch(self, name):
        """Starts a 2-rank training run that would take minutes; returns (proc, run_dir)."""
        run_dir = os.path.join(self.tmp, name)
        config = util.write_train_config(self.tmp, name, self.data, run_dir, max_steps=100000, keep_last=1)
        proc = subprocess.Popen([MPIEXEC, "-np", "2", "--oversubscribe", "--allow-run-as-root",
                                 MOEFORGE, "train", "--config", config, "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=util.env_one_thread())
        return proc, run_dir

    def wait_for_ranks(self, proc):
        """Waits until both ranks run; returns {rank: pid}."""
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            ranks = rank_processes(proc.pid)
            if len(ranks) == 2:
                return ranks
            time.sleep(0.01)
        proc.kill()
        self.fail(f"the ranks did not start:\n{proc.communicate()[0]}")

    def wait_for_training(self, proc, run_dir):
        """Waits until step 1 is logged."""
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                return
            time.sleep(0.01)
        proc.kill()
        self.fail(f"training did not start:\n{proc.communicate()[0]}")

    def wait_for_checkpoint_write(self, run_dir):
        checkpoints = os.path.join(run_dir, "checkpoints")
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if os.path.isdir(checkpoints) and any(".tmp-" in n for n in os.listdir(checkpoints)):
                return
            time.sleep(0.0005)
        self.fail("no checkpoint write seen")

    def assert_job_ends(self, proc, ranks, expected_pattern):
        """The job ends within JOB_DEADLINE_S, non-zero, with the message; no rank survives it."""
        start = time.monotonic()
        try:
            output, _ = proc.communicate(timeout=JOB_DEADLINE_S)
        except subprocess.TimeoutExpired:
            for pid in ranks.values():
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            output, _ = proc.communicate()
            self.fail(f"the job hung: still running {JOB_DEADLINE_S} s after the fault:\n{output}")
        elapsed = time.monotonic() - start
        self.assertNotEqual(proc.returncode, 0, output)
        self.assertRegex(output, expected_pattern)
        self.assertFalse([pid for pid in ranks.values() if is_alive(pid)], "a rank outlived the job")
        print(f"job ended {elapsed:.1f} s after the fault, exit code {proc.returncode}", file=sys.stderr)

    def test_killed_rank_ends_the_job(self):
        for case_idx, (victim, at_checkpoint_write) in enumerate([(1, False), (0, False), (1, True), (0, True)]):
            with self.subTest(victim=victim, at_checkpoint_write=at_checkpoint_write):
                proc, run_dir = self.launch(f"kill-{case_idx}")
                ranks = self.wait_for_ranks(proc)
                self.wait_for_training(proc, run_dir)
                if at_checkpoint_write:
                    self.wait_for_checkpoint_write(run_dir)
                else:
                    time.sleep(self.rng.uniform(0, 0.5))
                os.kill(ranks[victim], signal.SIGKILL)
                self.assert_job_ends(proc, ranks, rf"rank {victim}\b.*exited on signal 9")

    def test_rank_failing_with_an_error_ends_the_job(self):
        # A corrupt checkpoint index: rank 0 fails with moeforge::Error when it starts (it reads the
        # index to remove the leftovers of interrupted saves) while rank 1 goes on to the first
        # step's collectives.
        run_dir = os.path.join(self.tmp, "error")
        os.makedirs(os.path.join(run_dir, "checkpoints"))
        with open(os.path.join(run_dir, "checkpoints", "index.json"), "w") as f:
            f.write("not json")
        proc, _ = self.launch("error")
        ranks = self.wait_for_ranks(proc)
        self.assert_job_ends(proc, ranks, r"moeforge: error: .*index\.json")

if __name__ == "__main__":
    MOEFORGE = os.path.abspath(sys.argv.pop(1))
    unittest.main()
