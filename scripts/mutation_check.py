#!/usr/bin/env python3
"""Mutation check of a test binary: does some test catch each deliberate bug?

Each line of MUTATIONS (tab-separated; blank lines and lines starting with # are skipped) is
    name <TAB> file <TAB> old text <TAB> new text <TAB> gtest filter
For each, the one occurrence of the old text in the file is replaced by the new text (a mutation
whose old text occurs zero or several times is reported as not applied), the target is rebuilt in
BUILD, the binary runs the filter, and the file is restored. The mutation is caught when the run
fails; the failed tests are listed. At the end the target is rebuilt from the restored files, so
that BUILD holds the unmutated code: the device tool's copy of the tree keeps this machine's file
times, so a later call would see restored files older than the mutants' objects and not rebuild
them (session 24, docs/verification.md).

Usage: scripts/mutation_check.py MUTATIONS [--build build-gpu] [--target cuda_tests]
           [--binary tests/cuda_tests] [--timeout 120]
Prints one line per mutation; exits 1 if a mutation was not applied or not caught, or a build
failed.
"""
import argparse
import os
import re
import subprocess
import sys


def parse(path):
    mutations = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) != 5:
                sys.exit(f"{path}:{number}: expected 5 tab-separated fields, got {len(fields)}")
            mutations.append(fields)
    return mutations


def build(args):
    result = subprocess.run(["cmake", "--build", args.build, "--target", args.target,
                             f"-j{os.cpu_count()}"], capture_output=True, text=True)
    return result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def check(args, name, path, old, new, test_filter):
    with open(path) as f:
        original = f.read()
    count = original.count(old)
    if count != 1:
        return f"mutation {name}: not applied ({path} holds the old text {count} times)", False
    try:
        with open(path, "w") as f:
            f.write(original.replace(old, new))
        built, log = build(args)
        if not built:
            return f"mutation {name}: build failed\n{log}", False
        env = dict(os.environ, MOEFORGE_EXPECT_GPU=os.environ.get("MOEFORGE_EXPECT_GPU", "1"))
        try:
            run = subprocess.run([os.path.join(args.build, args.binary),
                                  f"--gtest_filter={test_filter}"], capture_output=True,
                                 text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"mutation {name}: caught (the run passed its {args.timeout} s limit)", True
        failed = sorted(set(re.findall(r"^\[  FAILED  \] (\w[\w/]*\.[\w/]+)", run.stdout, re.M)))
        if run.returncode == 0:
            return f"mutation {name}: NOT CAUGHT by {test_filter}", False
        what = " ".join(failed) if failed else f"exit status {run.returncode}"
        return f"mutation {name}: caught by {what}", True
    finally:
        with open(path, "w") as f:
            f.write(original)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mutations")
    parser.add_argument("--build", default="build-gpu")
    parser.add_argument("--target", default="cuda_tests")
    parser.add_argument("--binary", default="tests/cuda_tests")
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args()
    all_caught = True
    for name, path, old, new, test_filter in parse(args.mutations):
        line, caught = check(args, name, path, old, new, test_filter)
        print(line, flush=True)
        all_caught = all_caught and caught
    built, log = build(args)
    if not built:
        print(f"rebuild of the restored files failed\n{log}")
        return 1
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
