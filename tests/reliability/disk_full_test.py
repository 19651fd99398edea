#!/usr/bin/env python3
"""Saving a checkpoint or a merge where it cannot be written (run by ctest with the moeforge
binary's path): a full disk (a small tmpfs, when this machine lets us mount one), a file-size limit
(RLIMIT_FSIZE, which makes writes fail with EFBIG; works everywhere), a read-only file system and an
output folder below a regular file. Training cases first train 2 steps, then resume under the
fault: train must exit with code 1 and a message naming the problem, leave no half-written
checkpoint behind, and the previous checkpoint must be byte-for-byte intact and still load
(`moeforge eval`). Merge cases merge two checkpoints under the fault: exit code 1, the message, no
output or staging folder left, the inputs unchanged."""
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
        cls.merge_inputs = os.path.join(cls.tmp, "merge-inputs")
        config = util.write_train_config(cls.tmp, "merge-inputs", cls.data, cls.merge_inputs, max_steps=2)
        util.run([MOEFORGE, "train", "--config", config, "--no-progress"])

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

    def mount_or_skip(self, name, size):
        mount = os.path.join(self.tmp, name)
        if not try_mount_tmpfs(mount, size):
            self.skipTest("cannot mount a tmpfs here (needs root); the file-size-limit tests cover write errors")
        self.mounts.append(mount)
        return mount

    @staticmethod
    def fill(mount, num_bytes_left):
        stat = os.statvfs(mount)
        with open(os.path.join(mount, "filler"), "wb") as f:
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize - num_bytes_left))

    def merge_under_fault(self, out, expected_message, **popen_args):
        inputs = [os.path.join(self.merge_inputs, "checkpoints", f"step-0000000{step}") for step in (1, 2)]
        files_before = [util.read_bytes(os.path.join(path, "model.safetensors")) for path in inputs]
        proc = util.run([MOEFORGE, "merge", *inputs, "--out", out], check=False, **popen_args)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("moeforge: error: ", proc.stderr)
        self.assertIn(expected_message, proc.stderr)
        parent = os.path.dirname(out)
        if os.path.isdir(parent):
            self.assertEqual([n for n in os.listdir(parent) if n.startswith(os.path.basename(out))], [],
                             "a failed merge must leave neither its output nor its staging folder")
        self.assertEqual([util.read_bytes(os.path.join(path, "model.safetensors")) for path in inputs],
                         files_before)

    def test_disk_full(self):
        mount = self.mount_or_skip("small-disk", "16M")
        run_dir = os.path.join(mount, "run")
        config, files_before = self.train_two_steps("disk-full", run_dir)
        self.fill(mount, 1 << 20)  # less than one checkpoint
        proc = self.resume_under_fault(config, run_dir)
        self.assert_failed_cleanly(proc, "No space left on device", run_dir, files_before)

    def test_file_size_limit(self):
        run_dir = os.path.join(self.tmp, "fsize")
        config, files_before = self.train_two_steps("fsize", run_dir)
        proc = self.resume_under_fault(config, run_dir, preexec_fn=limit_file_size(1 << 20))
        self.assert_failed_cleanly(proc, "File too large", run_dir, files_before)

    def test_read_only_file_system(self):
        mount = self.mount_or_skip("read-only", "64M")
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


    def test_merge_disk_full(self):
        mount = self.mount_or_skip("small-merge-disk", "4M")
        self.fill(mount, 1 << 20)  # less than the merged model
        self.merge_under_fault(os.path.join(mount, "merged"), "No space left on device")

    def test_merge_file_size_limit(self):
        self.merge_under_fault(os.path.join(self.tmp, "merged-fsize"), "File too large",
                               preexec_fn=limit_file_size(1 << 20))

    def test_merge_output_below_a_regular_file(self):
        regular_file = os.path.join(self.tmp, "regular-file-for-merge")
        with open(regular_file, "w") as f:
            f.write("not a folder")
        self.merge_under_fault(os.path.join(regular_file, "merged"), "Not a directory")


if __name__ == "__main__":
    MOEFORGE = os.path.abspath(sys.argv.pop(1))
    unittest.main()
