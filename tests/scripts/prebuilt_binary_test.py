#!/usr/bin/env python3
"""scripts/pack-gpu-binary.sh and the `prebuilt` stage of scripts/gpu-check.sh, on a small C
program standing in for moeforge: what is packed runs after unpacking, a build that is not CUDA,
not sm_90a or older than the sources is refused and leaves an earlier pack as it was, and the stage
refuses a packed binary whose libraries the machine lacks."""
import gzip
import os
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PACK = os.path.join(ROOT, "scripts", "pack-gpu-binary.sh")
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu-check.sh")

FAKE_MOEFORGE = '#include <stdio.h>\nint main(void) { puts("fake device list"); return 0; }\n'
CUDA_CACHE = "MOEFORGE_CUDA:BOOL=ON\n"


class PrebuiltBinaryTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="prebuilt-binary-")
        self.addCleanup(shutil.rmtree, self.dir)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def compile(self, source, output, *flags):
        with open(output + ".c", "w") as f:
            f.write(source)
        subprocess.run(["cc", output + ".c", "-o", output, *flags], check=True)

    def build_dir(self, name="build", cache=CUDA_CACHE, source=FAKE_MOEFORGE, flags=()):
        build = self.path(name)
        os.makedirs(build)
        with open(os.path.join(build, "CMakeCache.txt"), "w") as f:
            f.write(cache)
        self.compile(source, os.path.join(build, "moeforge"), *flags)
        return build

    def pack(self, build, dest):
        return subprocess.run(["bash", PACK, build, dest], capture_output=True, text=True)

    def run_stage(self, packed):
        repo = self.path("repo")
        os.makedirs(os.path.join(repo, "scripts"), exist_ok=True)
        shutil.copy(GPU_CHECK, os.path.join(repo, "scripts", "gpu-check.sh"))
        env = dict(os.environ, PREBUILT=packed, OUT=self.path("out"))
        result = subprocess.run(["bash", os.path.join(repo, "scripts", "gpu-check.sh"), "prebuilt"],
                                capture_output=True, text=True, env=env)
        return result, repo

    def test_packed_binary_unpacks_and_runs(self):
        build = self.build_dir()
        dest = self.path("carry")
        result = self.pack(build, dest)
        self.assertEqual(result.returncode, 0, result.stderr)
        with gzip.open(os.path.join(dest, "moeforge.gz")) as f:
            self.assertEqual(f.read(4), b"\x7fELF")
        with open(os.path.join(dest, "moeforge.commit")) as f:
            self.assertIn("built", f.read())

        stage, repo = self.run_stage(os.path.join(dest, "moeforge.gz"))
        self.assertEqual(stage.returncode, 0, stage.stdout + stage.stderr)
        unpacked = os.path.join(repo, "build-gpu", "moeforge")
        self.assertEqual(subprocess.run([unpacked], capture_output=True, text=True).stdout,
                         "fake device list\n")
        with open(self.path("out", "devices.txt")) as f:
            self.assertEqual(f.read(), "fake device list\n")
        with open(self.path("out", "machine.txt")) as f:
            self.assertIn("prebuilt moeforge: ", f.read())

    def test_refused_builds_leave_an_earlier_pack(self):
        dest = self.path("carry")
        self.assertEqual(self.pack(self.build_dir(), dest).returncode, 0)
        with open(os.path.join(dest, "moeforge.gz"), "rb") as f:
            earlier = f.read()

        cpu = self.build_dir("cpu", cache="MOEFORGE_CUDA:BOOL=OFF\n")
        sm80 = self.build_dir("sm80", cache=CUDA_CACHE + "CMAKE_CUDA_ARCHITECTURES:STRING=80\n")
        stale = self.build_dir("stale")
        os.utime(os.path.join(stale, "moeforge"), (946684800, 946684800))
        missing = self.path("missing")
        os.makedirs(missing)
        for build, message in [(cpu, "not a CUDA build"), (sm80, "without 90a"),
                               (stale, "rebuild it"), (missing, "build moeforge first")]:
            result = self.pack(build, dest)
            self.assertNotEqual(result.returncode, 0, build)
            self.assertIn(message, result.stderr)
            with open(os.path.join(dest, "moeforge.gz"), "rb") as f:
                self.assertEqual(f.read(), earlier, build)

        hopper = self.build_dir("hopper",
                                cache=CUDA_CACHE + "CMAKE_CUDA_ARCHITECTURES:STRING=90a;80\n")
        self.assertEqual(self.pack(hopper, dest).returncode, 0)

    def test_stage_refuses_a_binary_whose_library_is_missing(self):
        lib_dir = self.path("lib")
        os.makedirs(lib_dir)
        self.compile("int fake_dep(void) { return 0; }\n", os.path.join(lib_dir, "libfakedep.so"),
                     "-shared", "-fPIC")
        build = self.build_dir(
            source="int fake_dep(void);\nint main(void) { return fake_dep(); }\n",
            flags=("-L" + lib_dir, "-lfakedep", "-Wl,-rpath," + lib_dir))
        dest = self.path("carry")
        self.assertEqual(self.pack(build, dest).returncode, 0)
        os.remove(os.path.join(lib_dir, "libfakedep.so"))

        stage, _ = self.run_stage(os.path.join(dest, "moeforge.gz"))
        self.assertNotEqual(stage.returncode, 0)
        self.assertIn("libfakedep.so", stage.stdout)
        self.assertIn("use the build stage", stage.stdout)

    def test_stage_without_a_packed_binary(self):
        stage, _ = self.run_stage(self.path("nothing", "moeforge.gz"))
        self.assertNotEqual(stage.returncode, 0)
        self.assertIn("scripts/pack-gpu-binary.sh makes it", stage.stdout)


if __name__ == "__main__":
    unittest.main()
