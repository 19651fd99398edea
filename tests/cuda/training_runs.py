"""Helpers of the GPU training scripts (train_curve_test.py, data_parallel_test.py): running
moeforge commands, and the text datasets they train on (the repository's docs and sources, or a
corpus that does not change between sessions)."""
import os
import subprocess
import sys


def run(args, env=None):
    """Runs args; exits with its output when it fails. Returns the completed process."""
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace",
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# The license texts of Debian and Ubuntu (package base-files): about 250 KB of English that, unlike
# the repository's own files, is the same in every session on a machine.
FIXED_CORPUS = "/usr/share/common-licenses"


def prepare_text_data(moeforge, source_dir, out):
    """`moeforge data prepare` of the repository's docs/ and src/ into out (10% validation)."""
    run([moeforge, "data", "prepare", os.path.join(source_dir, "docs"),
         os.path.join(source_dir, "src"), "--out", out, "--val-fraction", "0.1"])
    return out


def prepare_fixed_text_data(moeforge, out):
    """`moeforge data prepare` of FIXED_CORPUS into out (10% validation); exits when it is missing."""
    if not os.path.isdir(FIXED_CORPUS):
        sys.exit(f"{FIXED_CORPUS} is missing (Debian/Ubuntu package base-files): the run trains on it")
    run([moeforge, "data", "prepare", FIXED_CORPUS, "--out", out, "--val-fraction", "0.1"])
    return out
