#!/usr/bin/env python3
"""End-to-end tests of `moeforge merge` against the independent reference (reference_merge.py).

Run by ctest as: merge_cli_test.py MOEFORGE VENV_PYTHON. Started by any python, it re-runs itself
under VENV_PYTHON (the .venv made by scripts/setup.sh, which has numpy and safetensors).
Covers: bit-exact agreement with the reference for SMA/EMA/WMA/custom weights, fp32/fp64
accumulation and dtype overrides, on checkpoints of `moeforge init` (BF16, F32) and on a sharded
model written by Python (F32 + F16, extra files); selection from a run; CLI errors with nothing
left behind; SIGKILL at random moments leaving either the complete output or only staging
directories.
"""
import json
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

if __name__ == "__main__" and len(sys.argv) >= 3:
    venv_python = os.path.abspath(sys.argv[2])
    venv_dir = os.path.dirname(os.path.dirname(venv_python))
    if os.path.realpath(sys.prefix) != os.path.realpath(venv_dir):
        if not os.path.exists(venv_python):
            sys.exit(f"merge_cli_test: {venv_python} is missing: run scripts/setup.sh to create the "
                     "Python environment (numpy, safetensors) of the merge reference test")
        os.execv(venv_python, [venv_python, os.path.abspath(__file__)] + sys.argv[1:])

import numpy as np  # noqa: E402  (after the re-exec into the venv)
from safetensors.numpy import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_merge  # noqa: E402

MOEFORGE = None
STAGING = re.compile(r".+\.tmp-\d+-\d+$")  # io::is_staging_name for directories

TINY_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 300,
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 48, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "num_local_experts": 4, "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
}


def run(args, check=True):
    proc = subprocess.run([MOEFORGE] + args, capture_output=True, text=True, errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"moeforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_python_model(model_dir, seed, num_shards=2):
    """A transformers-style directory written by the safetensors package: F32 and F16 tensors in
    shards with an index (plus an F64 tensor and an integer one), config.json, tokenizer and
    generation files, and files merge ignores."""
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((96, 40)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, 40)).astype(np.float16),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((40, 64)).astype(np.float16),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(40)).astype(np.float32),
        "model.norm.weight": np.ones(40, dtype=np.float32) * np.float32(seed),
        "lm_head.weight": (1e-3 * rng.standard_normal((96, 40))).astype(np.float32),
        "model.layers.0.self_attn.scale": rng.standard_normal(40).astype(np.float64),
        "model.position_ids": np.arange(128, dtype=np.int64),  # equal in every input: copied
    }
    os.makedirs(model_dir)
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::num_shards]}
        save_file(part, os.path.join(model_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 40,
              "torch_dtype": "float32", "transformers_version": f"4.4{seed}.0"}
    for name, content in [("config.json", json.dumps(config)),
                          ("tokenizer.json", '{"model": "bpe"}'),
                          ("generation_config.json", '{"do_sample": false}'),
                          ("README.md", "# a model\n")]:
        with open(os.path.join(model_dir, name), "w") as f:
            f.write(content)


class MergeCliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="moeforge-merge-")
        config = os.path.join(cls.tmp, "tiny-mixtral.json")
        with open(config, "w") as f:
            json.dump(TINY_MIXTRAL, f)
        cls.ckpts = {}
        for dtype in ("BF16", "F32"):
            cls.ckpts[dtype] = []
            for seed in (1, 2, 3, 4):
                out = os.path.join(cls.tmp, f"init-{dtype}-{seed}")
                run(["init", "--config", config, "--out", out, "--seed", str(seed), "--dtype", dtype])
                cls.ckpts[dtype].append(out)
        cls.python_models = []
        for seed in (1, 2, 3):
            model_dir = os.path.join(cls.tmp, f"python-{seed}")
            write_python_model(model_dir, seed)
            cls.python_models.append(model_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def out_dir(self, name):
        return os.path.join(self.tmp, "out", self.id().split(".")[-1] + "-" + name)

    def merge_and_compare(self, name, inputs, method="sma", alpha=None, weights=None,
                          accumulate="fp32", dtype=None, extra=()):
        out = self.out_dir(name)
        args = ["merge", "--out", out, "--accumulate", accumulate, "--threads", "2"] + list(extra)
        if weights:
            args += ["--weights", ",".join(str(w) for w in weights)]
        else:
            args += ["--method", method]
        if alpha is not None:
            args += ["--alpha", str(alpha)]
        if dtype:
            args += ["--dtype", dtype]
        proc = run(args + list(inputs))
        expected_weights = reference_merge.merge_weights("custom" if weights else method, len(inputs),
                                                         alpha, weights)
        expected = reference_merge.merge(inputs, expected_weights, accumulate, dtype)
        self.assertEqual(reference_merge.compare(out, expected), [], f"{name}: {args}")
        with open(os.path.join(out, "merge.json")) as f:
            info = json.load(f)
        self.assertEqual([i["weight_fp64"] for i in info["inputs"]], expected_weights)
        self.assertEqual(info["accumulate"], accumulate)
        return out, proc

    def test_moeforge_checkpoints_match_the_reference(self):
        bf16, f32 = self.ckpts["BF16"][:3], self.ckpts["F32"][:3]
        self.merge_and_compare("sma-bf16", bf16)
        self.merge_and_compare("ema-bf16", bf16, method="ema", alpha=0.2)
        self.merge_and_compare("wma-bf16", bf16, method="wma")
        self.merge_and_compare("custom-bf16", bf16, weights=[0.7, -0.2, 0.5])
        self.merge_and_compare("sma-bf16-fp64", bf16, accumulate="fp64")
        self.merge_and_compare("ema-bf16-fp64-f32", bf16, method="ema", alpha=0.1, accumulate="fp64",
                               dtype="F32")
        self.merge_and_compare("wma-bf16-f16", bf16, method="wma", dtype="F16")
        self.merge_and_compare("sma-f32", f32)
        self.merge_and_compare("ema-f32-bf16", f32, method="ema", alpha=0.2, dtype="BF16")
        self.merge_and_compare("wma-f32-fp64-bf16", f32, method="wma", accumulate="fp64", dtype="BF16")
        self.merge_and_compare("sma-f32-fp64-f16", f32, accumulate="fp64", dtype="F16")
        self.merge_and_compare("sma-4-f32-f16", self.ckpts["F32"], dtype="F16")

    def test_python_written_sharded_model_matches_the_reference(self):
        models = self.python_models
        out, _ = self.merge_and_compare("sma-sharded", models, extra=["--max-shard-bytes", "12000"])
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        self.assertGreaterEqual(len(set(index["weight_map"].values())), 2)
        self.assertEqual(sorted(os.listdir(out)),
                         sorted(["config.json", "generation_config.json", "merge.json",
                                 "model.safetensors.index.json", "tokenizer.json"]
                                + sorted(set(index["weight_map"].values()))))
        with open(os.path.join(out, "config.json")) as f:
            self.assertEqual(json.load(f)["transformers_version"], "4.43.0")  # from the newest input
        out, _ = self.merge_and_compare("wma-single-bf16", models, method="wma", dtype="BF16")
        self.assertTrue(os.path.exists(os.path.join(out, "model.safetensors")))
        with open(os.path.join(out, "config.json")) as f:
            self.assertEqual(json.load(f)["torch_dtype"], "bfloat16")
        self.merge_and_compare("ema-fp64-f16", models, method="ema", alpha=0.3, accumulate="fp64",
                               dtype="F16")
        # Merged (sharded) outputs are inputs like any other.
        self.merge_and_compare("remerge", [self.out_dir("sma-sharded"), models[0]], method="wma")

    def test_prints_weights_and_a_json_summary(self):
        out, proc = self.merge_and_compare("printed", self.ckpts["BF16"][:3], method="ema", alpha=0.5)
        lines = proc.stdout.strip().splitlines()
        self.assertIn("method ema (alpha 0.5)", lines[0])
        self.assertEqual(len(lines), 5)
        for line, ckpt, weight in zip(lines[1:4], self.ckpts["BF16"], ["0.25", "0.25", "0.5"]):
            self.assertIn(ckpt, line)
            self.assertIn(f"weight {weight} (fp64 {weight})", line)
        summary = json.loads(lines[-1])
        self.assertEqual(set(summary),
                         {"output", "tensors", "bytes_read", "bytes_written", "seconds", "read_GBps"})
        files = reference_merge.read_model(out)
        self.assertEqual(summary["tensors"], len(files))
        self.assertEqual(summary["bytes_read"], 3 * sum(len(raw) for _, _, raw in files.values()))
        self.assertEqual(proc.stderr, "")  # not a terminal, and shorter than the 10 s progress period
        help_text = run(["merge", "--help"]).stdout
        self.assertIn("w_1 = (1-a)^(N-1), w_i = a (1-a)^(N-i)", help_text)

    def make_run(self, name, tokens_by_step):
        run_dir = os.path.join(self.tmp, name)
        entries = []
        for i, (step, tokens) in enumerate(tokens_by_step):
            path = os.path.join(run_dir, "checkpoints", f"step-{step:08d}")
            shutil.copytree(self.ckpts["BF16"][i % 4], path)
            with open(os.path.join(path, "trainer_state.json"), "w") as f:
                json.dump({"format_version": 1, "step": step, "tokens_seen": tokens}, f)
            entries.append({"step": step, "tokens_seen": tokens, "path": f"step-{step:08d}"})
        with open(os.path.join(run_dir, "checkpoints", "index.json"), "w") as f:
            json.dump({"format_version": 1, "checkpoints": entries}, f)
        return run_dir

    def test_selection_from_a_run(self):
        run_dir = self.make_run("run", [(s, 1000 * s) for s in (1, 2, 3, 4, 5, 6)])
        out = self.out_dir("run")
        proc = run(["merge", "--run", run_dir, "--count", "3", "--interval", "2000", "--until", "5500",
                    "--out", out, "--method", "wma"])
        lines = proc.stdout.splitlines()
        chosen = [os.path.join(run_dir, "checkpoints", f"step-{s:08d}") for s in (1, 3, 5)]
        for line, path, step in zip(lines[1:4], chosen, (1, 3, 5)):
            self.assertIn(f"{path}  step {step}  tokens {1000 * step}  weight", line)
        expected = reference_merge.merge(chosen, reference_merge.merge_weights("wma", 3))
        self.assertEqual(reference_merge.compare(out, expected), [])
        with open(os.path.join(out, "merge.json")) as f:
            self.assertEqual([i["tokens_seen"] for i in json.load(f)["inputs"]], [1000, 3000, 5000])

        proc = run(["merge", "--run", run_dir, "--count", "3", "--interval", "1500", "--out",
                    self.out_dir("missing")], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("no checkpoint at tokens_seen = 4500", proc.stderr)
        self.assertIn("step 6 tokens_seen 6000 (step-00000006)", proc.stderr)
        self.assertFalse(os.path.exists(self.out_dir("missing")))

    def expect_failure(self, args, fragments, out):
        parent = os.path.dirname(out)
        before = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        proc = run(["merge", "--out", out] + args, check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        for fragment in fragments:
            self.assertIn(fragment, proc.stderr)
        after = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
        self.assertEqual(after, before, "a failed merge left files behind")

    def test_errors_leave_nothing_behind(self):
        bf16, f32 = self.ckpts["BF16"], self.ckpts["F32"]
        out = os.path.join(self.tmp, "error-out")
        self.expect_failure([bf16[0], bf16[1], bf16[0]], ["is given twice"], out)
        self.expect_failure([bf16[0], bf16[1]], ["lies inside input"], os.path.join(bf16[1], "merged"))
        self.assertFalse(os.path.exists(os.path.join(bf16[1], "merged")))
        self.expect_failure([bf16[0], bf16[1]], ["is the same directory as input"], bf16[0])
        self.expect_failure([bf16[0], f32[1]], ["has dtype F32 in input", f32[1]], out)
        self.expect_failure([bf16[0], self.python_models[0]], ["config.json of input"], out)
        existing = os.path.join(self.tmp, "taken", "merged")
        os.makedirs(existing)
        self.expect_failure([bf16[0], bf16[1]], ["already exists", "never overwrites"], existing)
        self.assertEqual(os.listdir(existing), [])
        self.expect_failure(["--weights", "0.5", bf16[0], bf16[1]], ["1 custom weights for 2"], out)
        self.expect_failure(["--method", "ema", bf16[0], bf16[1]], ["needs --alpha"], out)
        self.expect_failure(["--dtype", "I32", bf16[0]], ["--dtype I32 is not supported"], out)

    def test_sigkill_never_leaves_a_partial_output(self):
        # 8 inputs x 20 MB of F32: long enough (a fraction of a second) to be killed mid-merge.
        rng = np.random.default_rng(0)
        inputs = []
        for i in range(8):
            model_dir = os.path.join(self.tmp, f"big-{i}")
            os.makedirs(model_dir)
            save_file({f"layer.{k}.weight": rng.standard_normal(500_000).astype(np.float32)
                       for k in range(10)}, os.path.join(model_dir, "model.safetensors"))
            with open(os.path.join(model_dir, "config.json"), "w") as f:
                json.dump({"model_type": "toy"}, f)
            inputs.append(model_dir)
        parent = os.path.join(self.tmp, "killed")
        os.makedirs(parent)
        out = os.path.join(parent, "merged")
        start = time.monotonic()
        run(["merge", "--out", out, "--threads", "2"] + inputs)
        duration = time.monotonic() - start
        expected = reference_merge.merge(inputs, reference_merge.merge_weights("sma", 8))
        self.assertEqual(reference_merge.compare(out, expected), [])
        shutil.rmtree(out)

        # Each kill lands at a random moment after the merge created its staging directory. It may
        # still land after the commit (the process exits slowly under the sanitizers, whose leak
        # check runs at exit) or the merge may finish first: then the output must be the complete
        # merge. Killed before the commit, it must leave nothing but staging directories.
        rng_kill = random.Random(1)
        num_killed_mid_merge = 0
        for attempt in range(6):
            proc = subprocess.Popen([MOEFORGE, "merge", "--out", out, "--threads", "2"] + inputs,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while proc.poll() is None and not os.listdir(parent) and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(rng_kill.uniform(0.0, 0.5 * duration))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if os.path.exists(out):
                self.assertEqual(reference_merge.compare(out, expected), [],
                                 f"attempt {attempt}: a merge ended by {proc.returncode} left a partial {out}")
                shutil.rmtree(out)
            else:
                self.assertEqual(proc.returncode, -signal.SIGKILL, f"attempt {attempt}: no output")
                num_killed_mid_merge += 1
            for leftover in os.listdir(parent):
                self.assertRegex(leftover, STAGING, "only staging directories may remain")
                shutil.rmtree(os.path.join(parent, leftover))
        self.assertGreater(num_killed_mid_merge, 0,
                           f"every kill came after the merge's commit ({duration:.2f} s per merge)")

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: merge_cli_test.py MOEFORGE VENV_PYTHON [unittest args]")
    MOEFORGE = os.path.abspath(sys.argv[1])
    unittest.main(argv=[sys.argv[0]] + sys.argv[3:], verbosity=2)
