#!/usr/bin/env python3
"""Saving a checkpoint where it cannot be written (run by ctest with the moeforge binary's path):
a full disk (a small tmpfs, when this machine lets us mount one), a file-size limit (RLIMIT_FSIZE,
which makes writes fail with EFBIG; works everywhere), a read-only file system and an output
folder below a regular file. Each case first trains 2 steps, then resumes under the fault: train
must exit with code 1 and a message naming the problem, leave no half-written checkpoint behind,
and the previous checkpoint must be byte-for-byte intact and still load (`moeforge eval`)."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

import reliability_util as util

MOEFORGE = None


def try_mount_tmpfs(path, size):
    """Mounts a tmpfs of `size` at path; False where this machine does not allow it."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    return proc.returncode == 0


def limit_file_size(num_bytes):
    """preexec_fn: writes past num_bytes fail with EFBIG instead of raising SIGXFSZ."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, num_bytes))
    return apply


class DiskFullTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="moeforge-diskfull-")
        cls.data = util.make_dataset(MOEFORGE, cls.tmp)
        cls.mounts = []

    @classmethod
    def tearDownClass(cls):
        for mount in cls.mounts:
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def train_two_steps(self, name, run_dir):
        """Trains 2 steps into run_dir (metrics outside it); returns the config and step 2's files."""
        config = util.write_train_config(self.tmp, name, self.data, run_dir, max_steps=2,
                                         metrics_file=os.path.join(self.tmp, name + "-metrics.jsonl"))
        util.run([MOEFORGE, "train", "--config", config, "--no-progress"])
        checkpoint = os.path.join(run_dir, "checkpoints", "step-00000002")
        self.assertEqual([e["step"] for e in util.checkpoint_index(run_dir)], [1, 2])
        return config, {n: util.read_bytes(os.path.join(checkpoint, n)) for n in os.listdir(checkpoint)}

    def resume_under_fault(self, config, run_dir, extra_args=(), **popen_args):
        return util.run([MOEFORGE, "train", "--config", config, "--no-progress", "--resume", run_dir,
                         "--set", "schedule.max_steps=6", *extra_args], check=False, **popen_args)

    def assert_failed_cleanly(self, proc, expected_message, run_dir, files_before):
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("moeforge: error: ", proc.stderr)
        self.assertIn(expected_message, proc.stderr)
        self.assertEqual([e["step"] for e in util.checkpoint_index(run_dir)], [1, 2])
        checkpoints = os.path.join(run_dir, "checkpoints")
        self.assertEqual(sorted(os.listdir(checkpoints)), ["index.json", "step-00000001", "step-00000002"],
                         "a failed save must remove its staging folder")
        checkpoint = os.path.join(checkpoints, "step-00000002")
        self.assertEqual({n: util.read_bytes(os.path.join(checkpoint, n)) for n in os.listdir(checkpoint)},
                         files_before)
        evaluation = util.run([MOEFORGE, "eval", "--model", run_dir, "--data", self.data, "--seq-len", "32",
                               "--max-batches", "1"])
        self.assertIn("loss", evaluation.stdout)

    def test_disk_full(self):
        mount = os.path.join(self.tmp, "small-disk")
        if not try_mount_tmpfs(mount, "16M"):
            self.skipTest("cannot mount a tmpfs here (needs root); test_file_size_limit covers write errors")
        self.mounts.append(mount)
        run_dir = os.path.join(mount, "run")
        config, files_before = self.train_two_steps("disk-full", run_dir)
        stat = os.statvfs(mount)
        with open(os.path.join(mount, "filler"), "wb") as f:  # leave 1 MB: less than one checkpoint
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize - (1 << 20)))
        proc = self.resume_under_fault(config, run_dir)
        self.assert_failed_cleanly(proc, "No space left on device", run_dir, files_before)

    def test_file_size_limit(self):
        run_dir = os.path.join(self.tmp, "fsize")
        config, files_before = self.train_two_steps("fsize", run_dir)
        proc = self.resume_under_fault(config, run_dir, preexec_fn=limit_file_size(1 << 20))
        self.assert_failed_cleanly(proc, "File too large", run_dir, files_before)

    def test_read_only_file_system(self):
        mount = os.path.join(self.tmp, "read-only")
        if not try_mount_tmpfs(mount, "64M"):
            self.skipTest("cannot mount a tmpfs here (needs root)")
        self.mounts.append(mount)
        run_dir = os.path.join(mount, "run")
        config, files_before = self.train_two_steps("read-only", run_dir)
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        proc = self.resume_under_fault(config, run_dir)
        self.assert_failed_cleanly(proc, "Read-only file system", run_dir, files_before)

    def test_output_folder_below_a_regular_file(self):
        run_dir = os.path.join(self.tmp, "below-file")
        config, files_before = self.train_two_steps("below-file", run_dir)
        regular_file = os.path.join(self.tmp, "regular-file")
        with open(regular_file, "w") as f:
            f.write("not a folder")
        proc = self.resume_under_fault(config, run_dir, ["--set", f"checkpoint.dir={regular_file}/run"])
        self.assert_failed_cleanly(proc, f"{regular_file}/run", run_dir, files_before)
        self.assertIn("Not a directory", proc.stderr)


if __name__ == "__main__":
    MOEFORGE = os.path.abspath(sys.argv.pop(1))
    unittest.main()
