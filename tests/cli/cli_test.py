#!/usr/bin/env python3
"""End-to-end tests of the moeforge command line (run by ctest with the binary's path).

Covers: --help of every command, init -> inspect -> generate, data prepare -> train -> eval ->
resume, clear errors on bad input, and data parallelism under mpirun (2 ranks equal 1 rank with
twice the gradient accumulation, to fp32 rounding)."""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest

MOEFORGE = None

TINY_MODEL = {
    "architectures": ["MixtralForCausalLM"], "vocab_size": 258, "hidden_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 24, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "num_local_experts": 4, "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
}


def run(args, check=True, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1")
    if env:
        full_env.update(env)
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="moeforge-cli-")
        text = os.path.join(cls.tmp, "text")
        os.makedirs(text)
        rng = random.Random(5)
        words = "the quick brown fox jumps over a lazy dog while cats sleep".split()
        for d in range(10):
            with open(os.path.join(text, f"doc{d}.txt"), "w") as f:
                f.write(" ".join(rng.choice(words) for _ in range(600)))
        cls.data = os.path.join(cls.tmp, "data")
        run([MOEFORGE, "data", "prepare", text, "--out", cls.data, "--val-fraction", "0.2"])
        cls.model_json = os.path.join(cls.tmp, "model.json")
        with open(cls.model_json, "w") as f:
            json.dump(TINY_MODEL, f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def train_config(self, name, **overrides):
        config = {
            "model": {"model_config": self.model_json, "seed": 1},
            "data": {"dataset": self.data, "seq_len": 32, "micro_batch_size": 4, "grad_accum_steps": 1},
            "optimizer": {"lr": 0.01},
            "schedule": {"type": "constant", "max_steps": 6},
            "checkpoint": {"dir": os.path.join(self.tmp, name), "every_steps": 3},
            "eval": {"max_batches": 2},
        }
        for key, value in overrides.items():
            section, field = key.split("__")
            config.setdefault(section, {})[field] = value
        path = os.path.join(self.tmp, name + ".json")
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def test_every_command_has_help(self):
        for cmd in (["train"], ["eval"], ["generate"], ["init"], ["inspect"], ["data"], ["data", "prepare"],
                    ["forward"], ["merge"], ["devices"], ["bench"], ["bench", "train"], ["bench", "gemm"]):
            proc = run([MOEFORGE, *cmd, "--help"])
            self.assertIn("--help", proc.stdout, cmd)
        self.assertIn("train", run([MOEFORGE, "--help"]).stdout)

    def test_init_inspect_generate(self):
        out = os.path.join(self.tmp, "init-model")
        run([MOEFORGE, "init", "--config", self.model_json, "--out", out, "--seed", "3"])
        info = json.loads(run([MOEFORGE, "inspect", out, "--json"]).stdout)
        self.assertEqual(info["num_params"], info["num_params_in_files"])
        names = {t["name"] for t in info["tensors"]}
        self.assertIn("model.layers.1.block_sparse_moe.experts.3.w2.weight", names)
        with open(os.path.join(out, "config.json")) as f:
            self.assertEqual(json.load(f)["architectures"], ["MixtralForCausalLM"])
        # init refuses to overwrite unless forced
        proc = run([MOEFORGE, "init", "--config", self.model_json, "--out", out], check=False)
        self.assertNotEqual(proc.returncode, 0)
        shutil.copy(os.path.join(self.data, "moeforge_tokenizer.json"), out)
        proc = run([MOEFORGE, "generate", "--model", out, "--prompt", "the", "--max-new-tokens", "8",
                    "--temperature", "0", "--stats"])
        stats = json.loads(proc.stderr.strip().splitlines()[-1])
        self.assertGreater(stats["prompt_tokens"], 0)

    def test_train_eval_resume(self):
        config = self.train_config("run-a")
        proc = run([MOEFORGE, "train", "--config", config, "--no-progress"])
        self.assertIn("trained 6 steps", proc.stdout)
        run_dir = os.path.join(self.tmp, "run-a")
        metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        steps = [m for m in metrics if "loss" in m]
        self.assertEqual([m["step"] for m in steps], list(range(1, 7)))
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                    "expert_load_min", "expert_load_max"):
            self.assertIn(key, steps[0])
        self.assertTrue(any("val_loss" in m for m in metrics))
        ev = json.loads(run([MOEFORGE, "eval", "--model", run_dir, "--data", self.data,
                             "--seq-len", "32"]).stdout)
        self.assertLess(ev["loss"], 5.0)
        self.assertGreater(ev["bits_per_byte"], 0.0)
        # Resume from step 3 in a new run dir reproduces steps 4..6 exactly.
        config_b = self.train_config("run-b")
        run([MOEFORGE, "train", "--config", config_b, "--no-progress",
             "--resume", os.path.join(run_dir, "checkpoints", "step-00000003")])
        resumed = [m for m in read_jsonl(os.path.join(self.tmp, "run-b", "metrics.jsonl")) if "loss" in m]
        self.assertEqual([m["loss"] for m in resumed], [m["loss"] for m in steps[3:]])

    def test_bad_inputs_give_clear_errors(self):
        bad = self.train_config("run-bad", optimizer__beta2=1.5)
        proc = run([MOEFORGE, "train", "--config", bad], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("optimizer.beta2", proc.stderr)
        proc = run([MOEFORGE, "train", "--config", self.train_config("run-typo"), "--set", "optimizer.lrr=1"],
                   check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("lrr", proc.stderr)
        broken = os.path.join(self.tmp, "broken-model.json")
        with open(broken, "w") as f:
            json.dump(dict(TINY_MODEL, num_key_value_heads=3), f)
        proc = run([MOEFORGE, "init", "--config", broken, "--out", os.path.join(self.tmp, "x")], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("num_key_value_heads", proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x")))

    def test_cuda_device_without_a_gpu_is_a_clear_error(self):
        if run([MOEFORGE, "devices"]).stdout.startswith("cuda:"):
            self.skipTest("this machine has a GPU (tests/cuda covers --device cuda)")
        run_dir = os.path.join(self.tmp, "run-cuda")
        proc = run([MOEFORGE, "train", "--config", self.train_config("run-cuda"), "--device", "cuda",
                    "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertTrue("no usable CUDA device" in proc.stderr or "without CUDA" in proc.stderr,
                        proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(run_dir, "checkpoints", "index.json")))

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_data_parallel_matches_gradient_accumulation(self):
        one = self.train_config("dp-1", data__grad_accum_steps=2)
        run([MOEFORGE, "train", "--config", one, "--no-progress"])
        two = self.train_config("dp-2")
        run([os.environ["MOEFORGE_MPIEXEC"], "-np", "2", "--oversubscribe", "--allow-run-as-root",
             MOEFORGE, "train", "--config", two, "--no-progress"])
        a = [m for m in read_jsonl(os.path.join(self.tmp, "dp-1", "metrics.jsonl")) if "loss" in m]
        b = [m for m in read_jsonl(os.path.join(self.tmp, "dp-2", "metrics.jsonl")) if "loss" in m]
        self.assertEqual(len(a), 6)
        self.assertEqual(len(b), 6)
        for x, y in zip(a, b):
            self.assertEqual(x["tokens"], y["tokens"])
            self.assertAlmostEqual(x["loss"], y["loss"], delta=1e-5 * abs(x["loss"]))
            self.assertAlmostEqual(x["grad_norm"], y["grad_norm"], delta=1e-4 * abs(x["grad_norm"]))


    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_bf16_gradient_reduction_tracks_fp32(self):
        """parallel.grad_reduce_dtype=bf16 (compressed all-to-all, fp32 local sum) over 2 ranks:
        the same run as fp32 up to bf16 rounding of the exchanged gradients."""
        mpirun = [os.environ["MOEFORGE_MPIEXEC"], "-np", "2", "--oversubscribe", "--allow-run-as-root"]
        losses = {}
        for dtype in ("fp32", "bf16"):
            config = self.train_config(f"reduce-{dtype}", parallel__grad_reduce_dtype=dtype)
            run(mpirun + [MOEFORGE, "train", "--config", config, "--no-progress"])
            losses[dtype] = [m["loss"] for m in
                             read_jsonl(os.path.join(self.tmp, f"reduce-{dtype}", "metrics.jsonl"))
                             if "loss" in m]
        self.assertEqual(len(losses["bf16"]), 6)
        self.assertEqual(losses["fp32"][0], losses["bf16"][0])  # before any update
        for a, b in zip(losses["fp32"], losses["bf16"]):
            self.assertAlmostEqual(a, b, delta=1e-2 * abs(a))
        self.assertNotEqual(losses["fp32"], losses["bf16"])

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_expert_parallel_matches_one_rank(self):
        """sp = ep = 2 and 4 ranks (and dp = 2 x ep = 2) give the one-rank losses and gradient
        norms: the same global batch, split along the sequence and over the experts."""
        model = os.path.join(self.tmp, "ep-model.json")
        with open(model, "w") as f:
            json.dump(dict(TINY_MODEL, num_attention_heads=4, num_key_value_heads=4,
                           head_dim=4, num_local_experts=4), f)
        layouts = {"ep-1": (1, 1, 2), "ep-2": (2, 2, 2), "ep-4": (4, 4, 2), "dp2-ep2": (4, 2, 1)}
        for name, (ranks, ep, accum) in layouts.items():
            config = self.train_config(name, data__grad_accum_steps=accum,
                                       parallel__expert_parallel=ep, model__model_config=model)
            prefix = [] if ranks == 1 else [os.environ["MOEFORGE_MPIEXEC"], "-np", str(ranks),
                                            "--oversubscribe", "--allow-run-as-root"]
            run(prefix + [MOEFORGE, "train", "--config", config, "--no-progress"])
        ref = [m for m in read_jsonl(os.path.join(self.tmp, "ep-1", "metrics.jsonl")) if "loss" in m]
        self.assertEqual(len(ref), 6)
        for name in ("ep-2", "ep-4", "dp2-ep2"):
            got = [m for m in read_jsonl(os.path.join(self.tmp, name, "metrics.jsonl")) if "loss" in m]
            self.assertEqual(len(got), 6, name)
            for x, y in zip(ref, got):
                self.assertEqual(x["tokens"], y["tokens"], name)
                self.assertAlmostEqual(x["loss"], y["loss"], delta=1e-5 * abs(x["loss"]), msg=name)
                self.assertAlmostEqual(x["grad_norm"], y["grad_norm"],
                                       delta=1e-4 * abs(x["grad_norm"]), msg=name)
                if name != "dp2-ep2":  # the root sees only its own data-parallel replica's load
                    self.assertEqual(x["expert_load_max"], y["expert_load_max"], name)
        # A layout that does not fit is a clear error.
        bad = self.train_config("ep-bad", parallel__expert_parallel=3, model__model_config=model)
        proc = run([MOEFORGE, "train", "--config", bad, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("expert_parallel", proc.stderr)

    def test_flex_prefill_attention(self):
        """generate and eval with --attention flex (FlexPrefill sparse prefill): the statistics JSON
        has the documented keys, eval at gamma 1 with a full budget equals dense, and bad values
        are clear errors naming the option."""
        model_json = os.path.join(self.tmp, "flex-model.json")
        with open(model_json, "w") as f:
            json.dump(dict(TINY_MODEL, max_position_embeddings=512), f)
        out = os.path.join(self.tmp, "flex-model")
        run([MOEFORGE, "init", "--config", model_json, "--out", out, "--seed", "3", "--init-std", "0.5"])
        shutil.copy(os.path.join(self.data, "moeforge_tokenizer.json"), out)
        prompt = " ".join(["the quick brown fox jumps over a lazy dog"] * 8)  # > 300 byte tokens
        sparse = ["--attention", "flex", "--gamma", "0.5", "--tau", "0.1", "--min-budget", "64",
                  "--block-size", "64"]
        stats_path = os.path.join(self.tmp, "flex-stats.json")
        generate = [MOEFORGE, "generate", "--model", out, "--prompt", prompt, "--max-new-tokens", "4",
                    "--temperature", "0"]
        run(generate + sparse + ["--attention-stats", stats_path])
        with open(stats_path) as f:
            stats = json.load(f)
        for key in ("format_version", "attention", "params", "prompt_tokens", "sparse_prefill",
                    "mean_density", "query_aware_heads", "dense_fallback_layers", "layers"):
            self.assertIn(key, stats)
        self.assertEqual(stats["attention"], "flex")
        self.assertEqual(stats["params"]["block_size"], 64)
        self.assertGreater(stats["prompt_tokens"], 2 * 64)
        self.assertTrue(stats["sparse_prefill"])
        self.assertEqual(stats["dense_fallback_layers"], 0)
        self.assertEqual(len(stats["layers"]), TINY_MODEL["num_hidden_layers"])
        for layer in stats["layers"]:
            self.assertFalse(layer["dense_fallback"])
            self.assertEqual(len(layer["heads"]), TINY_MODEL["num_attention_heads"])
            for head in layer["heads"]:
                for key in ("head", "density", "query_aware", "js_distance", "num_vertical_blocks",
                            "num_slash_blocks", "num_selected_blocks"):
                    self.assertIn(key, head)
                self.assertGreater(head["density"], 0.0)
                self.assertLessEqual(head["density"], 1.0)
        self.assertLessEqual(stats["mean_density"], 1.0)
        for args in (["--gamma", "0"], ["--block-size", "100"], ["--attention", "sparse"],
                     ["--min-budget", "0"]):
            proc = run(generate + args, check=False)
            self.assertEqual(proc.returncode, 1, args)
            self.assertIn(args[0], proc.stderr)
        evaluate = [MOEFORGE, "eval", "--model", out, "--data", self.data, "--seq-len", "200",
                    "--batch-size", "2", "--max-batches", "1"]
        dense = json.loads(run(evaluate).stdout)
        full = json.loads(run(evaluate + ["--attention", "flex", "--gamma", "1", "--min-budget", "256",
                                          "--block-size", "64"]).stdout)
        for key in dense:
            self.assertIn(key, full)
        self.assertEqual(full["tokens"], dense["tokens"])
        self.assertAlmostEqual(full["loss"], dense["loss"], delta=1e-5 * abs(dense["loss"]))
        self.assertEqual(full["attention_stats"]["windows"], 2)
        self.assertEqual(full["attention_stats"]["mean_density"], 1.0)
        flex = json.loads(run(evaluate + sparse).stdout)
        self.assertEqual(flex["attention_stats"]["dense_fallback_layers"], 0)
        self.assertLessEqual(flex["attention_stats"]["mean_density"], 1.0)
        self.assertIn("query_aware_heads", flex["attention_stats"])
        self.assertNotEqual(flex["loss"], dense["loss"])
        proc = run(evaluate + ["--tau", "-1"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("--tau", proc.stderr)


if __name__ == "__main__":
    MOEFORGE = sys.argv.pop(1)
    unittest.main()
