#!/usr/bin/env python3
"""End-to-end tests of the moeforge command line (run by ctest with the binary's path).

Covers: --help of every command, init -> inspect -> generate (on the CPU, and on a GPU where there
is one), forward (logits, loss, router logits), data prepare -> train -> eval -> resume, clear errors on bad input, and data parallelism under mpirun (2 ranks equal 1 rank with
twice the gradient accumulation, to fp32 rounding), with sequence + expert or tensor parallel
groups."""
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

MOEFORGE = None
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def has_gpu():
    return run([MOEFORGE, "devices"]).stdout.startswith("cuda:")


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

    def step_metrics(self, name):
        """The step records (those with a loss) of the run in tmp/name."""
        return [m for m in read_jsonl(os.path.join(self.tmp, name, "metrics.jsonl")) if "loss" in m]

    def assert_same_training(self, ref, got, name, same_expert_load=False):
        """got tracks ref step by step: the same tokens, the loss within 1e-5 and the gradient
        norm within 1e-4 (relative), and with same_expert_load the same largest expert load."""
        self.assertEqual(len(got), len(ref), name)
        for x, y in zip(ref, got):
            self.assertEqual(x["tokens"], y["tokens"], name)
            self.assertAlmostEqual(x["loss"], y["loss"], delta=1e-5 * abs(x["loss"]), msg=name)
            self.assertAlmostEqual(x["grad_norm"], y["grad_norm"],
                                   delta=1e-4 * abs(x["grad_norm"]), msg=name)
            if same_expert_load:
                self.assertEqual(x["expert_load_max"], y["expert_load_max"], name)

    def synth_tasks(self, name, lengths="600"):
        """A small task file from `moeforge data synth` (two examples per task and length)."""
        path = os.path.join(self.tmp, name)
        if not os.path.exists(path):
            run([MOEFORGE, "data", "synth", "--task", "niah_single,vt", "--lengths", lengths, "--num", "2",
                 "--seed", "1", "--out", path])
        return path

    def init_model(self, name, seed, init_std=None, **config_overrides):
        """`moeforge init` of TINY_MODEL (with config_overrides) into tmp/name, with the dataset's
        tokenizer beside it so that generate and eval can read text."""
        model_json = self.model_json
        if config_overrides:
            model_json = os.path.join(self.tmp, name + ".json")
            with open(model_json, "w") as f:
                json.dump(dict(TINY_MODEL, **config_overrides), f)
        out = os.path.join(self.tmp, name)
        args = [MOEFORGE, "init", "--config", model_json, "--out", out, "--seed", str(seed)]
        if init_std is not None:
            args += ["--init-std", str(init_std)]
        run(args)
        shutil.copy(os.path.join(self.data, "moeforge_tokenizer.json"), out)
        return out

    def test_forward_writes_logits_loss_and_router_logits(self):
        """`moeforge forward`: the logits it writes give the loss it reports, and --router-logits
        adds the router logits of exactly the MoE layers (Qwen3-MoE with layer 0 dense), one row
        per token; a dense model writes none."""
        tokens_json = os.path.join(self.tmp, "forward-tokens.json")
        tokens = [[5, 9, 2, 7, 7, 1, 40], [3, 3, 8, 0, 4, 6, 200]]
        with open(tokens_json, "w") as f:
            json.dump(tokens, f)
        for config, moe_layers in (("tiny-qwen3-moe.json", [1, 2]), ("tiny-llama.json", [])):
            model = os.path.join(self.tmp, "forward-" + config)
            run([MOEFORGE, "init", "--config", os.path.join(REPO, "configs", "models", config),
                 "--out", model, "--seed", "4", "--init-std", "0.2"])
            out = os.path.join(self.tmp, "forward-" + config + ".safetensors")
            run([MOEFORGE, "forward", "--model", model, "--tokens", tokens_json, "--out", out,
                 "--router-logits"])
            tensors, metadata = read_safetensors(out)
            shape, logits = tensors["logits"]
            vocab = shape[2]
            self.assertEqual(shape, [2, 7, vocab])
            ce = []
            for b, row_tokens in enumerate(tokens):
                for t in range(len(row_tokens) - 1):
                    row = logits[(b * 7 + t) * vocab:(b * 7 + t + 1) * vocab]
                    top = max(row)
                    lse = top + math.log(sum(math.exp(x - top) for x in row))
                    ce.append(lse - row[row_tokens[t + 1]])
            self.assertAlmostEqual(sum(ce) / len(ce), float(metadata["ce_loss"]), delta=1e-5)
            routers = sorted(name for name in tensors if name.startswith("router_logits."))
            self.assertEqual(routers, [f"router_logits.{l}" for l in moe_layers])
            for name in routers:
                shape, values = tensors[name]
                self.assertEqual(shape, [14, 8])
                # Distinct tokens route differently: the rows are not copies of one another.
                self.assertGreater(len({tuple(values[i * 8:(i + 1) * 8]) for i in range(14)}), 10)
            # The two MoE layers have their own routers.
            if moe_layers:
                self.assertNotEqual(tensors["router_logits.1"][1], tensors["router_logits.2"][1])

    def test_every_command_has_help(self):
        for cmd in (["train"], ["eval"], ["generate"], ["init"], ["inspect"], ["data"], ["data", "prepare"],
                    ["data", "synth"],
                    ["forward"], ["merge"], ["devices"], ["bench"], ["bench", "train"], ["bench", "gemm"],
                    ["bench", "prefill"], ["bench", "comm"]):
            proc = run([MOEFORGE, *cmd, "--help"])
            self.assertIn("--help", proc.stdout, cmd)
        self.assertIn("train", run([MOEFORGE, "--help"]).stdout)

    def test_bench_prefill_rejects_an_unknown_select_path(self):
        proc = run([MOEFORGE, "bench", "prefill", "--select-path", "one-block"], check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--select-path: one-block not in {auto,many-blocks,clusters}", proc.stderr)

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

    def test_generate_dumps_prefill_qkv(self):
        out = self.init_model("qkv-model", 4)
        dump = os.path.join(self.tmp, "layer1.safetensors")
        prompt = "the quick brown fox"
        run([MOEFORGE, "generate", "--model", out, "--prompt", prompt, "--max-new-tokens", "2",
             "--temperature", "0", "--dump-qkv", "1", dump])
        with open(dump, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        n = len(prompt.encode()) + 1  # BOS + byte tokens
        meta = header["__metadata__"]
        self.assertEqual((meta["format"], meta["layer"]), ("moeforge-prefill-qkv", "1"))
        head_dim = TINY_MODEL["hidden_size"] // TINY_MODEL["num_attention_heads"]
        self.assertEqual(header["q"]["shape"], [n, TINY_MODEL["num_attention_heads"], head_dim])
        self.assertEqual(header["k"]["shape"], [n, TINY_MODEL["num_key_value_heads"], head_dim])
        self.assertEqual(header["v"]["dtype"], "F32")
        for bad, message in ((["2", dump], "outside the model's 2 layers"),
                             (["x", dump], "LAYER must be a layer index")):
            proc = run([MOEFORGE, "generate", "--model", out, "--prompt", prompt, "--dump-qkv", *bad],
                       check=False)
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn(message, proc.stderr)

    def test_generate_and_eval_on_cuda(self):
        """generate and eval --task with --device cuda (GpuInference) next to --device cpu: the same
        prompt, the statistics JSON with prefill and decode times, FlexPrefill statistics, and the
        task report's keys; eval --data on the GPU (dense) next to the CPU's."""
        model = self.init_model("cuda-model", 3, init_std=0.5, hidden_size=128, max_position_embeddings=1100)
        proc = run([MOEFORGE, "eval", "--model", model, "--data", self.data, "--device", "cuda",
                    "--attention", "flex"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("runs dense attention", proc.stderr)
        if not has_gpu():
            self.skipTest("no GPU (tests/cuda covers GpuInference where there is one)")
        # The same windows' loss in bf16 on the GPU and fp32 on the CPU: bf16 noise apart (the
        # loss-curve test's first-window gap, measured 0.0045 nats, bound 0.02).
        losses = {}
        for device in ("cpu", "cuda"):
            ev = json.loads(run([MOEFORGE, "eval", "--model", model, "--data", self.data,
                                 "--seq-len", "64", "--max-batches", "4", "--device", device]).stdout)
            self.assertEqual(ev["device"], device)
            losses[device] = (ev["loss"], ev["tokens"])
        self.assertEqual(losses["cpu"][1], losses["cuda"][1])
        self.assertLess(abs(losses["cpu"][0] - losses["cuda"][0]), 0.02, losses)
        prompt = " ".join(["the quick brown fox jumps over a lazy dog"] * 8)
        stats = {}
        for device in ("cpu", "cuda"):
            proc = run([MOEFORGE, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "8",
                        "--temperature", "0", "--stats", "--device", device])
            self.assertTrue(proc.stdout.startswith(prompt), proc.stdout)
            stats[device] = json.loads(proc.stderr.strip().splitlines()[-1])
            self.assertEqual(stats[device]["device"], device)
            self.assertGreater(stats[device]["prefill_s"], 0.0)
            self.assertLessEqual(stats[device]["new_tokens"], 8)
        self.assertEqual(stats["cpu"]["prompt_tokens"], stats["cuda"]["prompt_tokens"])
        stats_path = os.path.join(self.tmp, "cuda-flex-stats.json")
        run([MOEFORGE, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "4",
             "--temperature", "0", "--device", "cuda", "--attention", "flex", "--gamma", "0.5",
             "--min-budget", "64", "--block-size", "64", "--attention-stats", stats_path])
        with open(stats_path) as f:
            flex = json.load(f)
        # The default on a GPU: the fp32 pattern search (head_dim 8: a multiple of 8, as it needs).
        self.assertEqual(flex["params"]["search"], "fast")
        self.assertTrue(flex["sparse_prefill"])
        self.assertEqual(len(flex["layers"]), TINY_MODEL["num_hidden_layers"])
        self.assertTrue(0.0 < flex["mean_density"] <= 1.0)
        exact_path = os.path.join(self.tmp, "cuda-flex-exact-stats.json")
        run([MOEFORGE, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "4",
             "--temperature", "0", "--device", "cuda", "--attention", "flex", "--gamma", "0.5",
             "--min-budget", "64", "--block-size", "64", "--flex-search", "exact",
             "--attention-stats", exact_path])
        with open(exact_path) as f:
            exact = json.load(f)
        self.assertEqual(exact["params"]["search"], "exact")
        self.assertTrue(exact["sparse_prefill"])
        self.assertTrue(0.0 < exact["mean_density"] <= 1.0)
        # --dump-qkv from the GPU engine: layer 0 (no FFN before it) within bf16 noise of the CPU's.
        dumps = {}
        for device in ("cpu", "cuda"):
            path = os.path.join(self.tmp, f"qkv-{device}.safetensors")
            run([MOEFORGE, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "2",
                 "--temperature", "0", "--device", device, "--dump-qkv", "0", path])
            dumps[device] = read_safetensors(path)
        self.assertEqual(dumps["cuda"][1], dumps["cpu"][1])
        for name, (shape, want) in dumps["cpu"][0].items():
            got_shape, got = dumps["cuda"][0][name]
            self.assertEqual(got_shape, shape, name)
            err = math.sqrt(sum((a - b) ** 2 for a, b in zip(got, want)) / sum(b * b for b in want))
            self.assertLess(err, 2e-2, name)
        tasks = self.synth_tasks("cuda-tasks.jsonl")
        reports = {device: json.loads(run([MOEFORGE, "eval", "--model", model, "--task", tasks,
                                           "--device", device]).stdout) for device in ("cpu", "cuda")}
        self.assertEqual(reports["cuda"]["device"], "cuda")
        self.assertEqual(reports["cuda"]["examples"], reports["cpu"]["examples"])
        self.assertEqual(set(reports["cuda"]["tasks"]), set(reports["cpu"]["tasks"]))

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
        resumed = self.step_metrics("run-b")
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
        proc = run([MOEFORGE, "train", "--config", self.train_config("run-graphs"), "--cuda-graphs"],
                   check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("--cuda-graphs needs --device cuda", proc.stderr)
        broken = os.path.join(self.tmp, "broken-model.json")
        with open(broken, "w") as f:
            json.dump(dict(TINY_MODEL, num_key_value_heads=3), f)
        proc = run([MOEFORGE, "init", "--config", broken, "--out", os.path.join(self.tmp, "x")], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("num_key_value_heads", proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x")))

    def test_cuda_device_without_a_gpu_is_a_clear_error(self):
        if has_gpu():
            self.skipTest("this machine has a GPU (tests/cuda covers --device cuda)")
        model = self.init_model("nogpu-model", 3)
        for args in (["generate", "--model", model, "--prompt", "the"],
                     ["eval", "--model", model, "--task", self.synth_tasks("nogpu-tasks.jsonl")],
                     ["eval", "--model", model, "--data", self.data]):
            proc = run([MOEFORGE, *args, "--device", "cuda"], check=False)
            self.assertEqual(proc.returncode, 1, args)
            self.assertTrue("no usable CUDA device" in proc.stderr or "without CUDA" in proc.stderr,
                            proc.stderr)
        run_dir = os.path.join(self.tmp, "run-cuda")
        proc = run([MOEFORGE, "train", "--config", self.train_config("run-cuda"), "--device", "cuda",
                    "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertTrue("no usable CUDA device" in proc.stderr or "without CUDA" in proc.stderr,
                        proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(run_dir, "checkpoints", "index.json")))

    def test_gpu_tensor_parallel_refuses_what_it_does_not_run(self):
        """parallel.layout "tp" on GPUs refuses what it does not run, naming it, before it touches a
        device: ZeRO-1 in `train --device cuda`; ZeRO-1, CUDA graphs and the sp_ep exchange
        options in `bench train --layout tp`. A build without CUDA says so instead."""
        config = self.train_config("tp-gpu-zero1", parallel__layout="tp", parallel__zero_stage=1)
        proc = run([MOEFORGE, "train", "--config", config, "--device", "cuda", "--no-progress"],
                   check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertTrue('parallel.zero_stage 1 with parallel.layout "tp" runs on the CPU engine only'
                        in proc.stderr or "without CUDA" in proc.stderr, proc.stderr)
        for args, message in ((["--zero-stage", "1"], "--zero-stage 1 runs with --layout sp_ep only"),
                              (["--cuda-graphs"], "--cuda-graphs runs with --layout sp_ep only"),
                              (["--ep-dispatch", "alltoall"], "leave them at their defaults with --layout tp")):
            proc = run([MOEFORGE, "bench", "train", "--config", self.model_json, "--layout", "tp", *args],
                       check=False)
            self.assertEqual(proc.returncode, 1, args)
            self.assertTrue(message in proc.stderr or "without CUDA" in proc.stderr, proc.stderr)

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_data_parallel_matches_gradient_accumulation(self):
        one = self.train_config("dp-1", data__grad_accum_steps=2)
        run([MOEFORGE, "train", "--config", one, "--no-progress"])
        two = self.train_config("dp-2")
        run([os.environ["MOEFORGE_MPIEXEC"], "-np", "2", "--oversubscribe", "--allow-run-as-root",
             MOEFORGE, "train", "--config", two, "--no-progress"])
        a = self.step_metrics("dp-1")
        self.assertEqual(len(a), 6)
        self.assertEqual(len(self.step_metrics("dp-2")), 6)
        self.assert_same_training(a, self.step_metrics("dp-2"), "dp-2")


    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_bf16_gradient_reduction_tracks_fp32(self):
        """parallel.grad_reduce_dtype=bf16 (compressed all-to-all, fp32 local sum) over 2 ranks:
        the same run as fp32 up to bf16 rounding of the exchanged gradients."""
        mpirun = [os.environ["MOEFORGE_MPIEXEC"], "-np", "2", "--oversubscribe", "--allow-run-as-root"]
        losses = {}
        for dtype in ("fp32", "bf16"):
            config = self.train_config(f"reduce-{dtype}", parallel__grad_reduce_dtype=dtype)
            run(mpirun + [MOEFORGE, "train", "--config", config, "--no-progress"])
            losses[dtype] = [m["loss"] for m in self.step_metrics(f"reduce-{dtype}")]
        self.assertEqual(len(losses["bf16"]), 6)
        self.assertEqual(losses["fp32"][0], losses["bf16"][0])  # before any update
        for a, b in zip(losses["fp32"], losses["bf16"]):
            self.assertAlmostEqual(a, b, delta=1e-2 * abs(a))
        self.assertNotEqual(losses["fp32"], losses["bf16"])

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_expert_parallel_matches_one_rank(self):
        """sp = ep = 2 and 4 ranks (and dp = 2 x ep = 2) give the one-rank losses and gradient
        norms: the same global batch, split along the sequence and over the experts. Both expert
        dispatches (parallel.ep_dispatch) run over 2 ranks and agree with each other, also mixed
        per layer; "auto" picks the all-gather at top-2 of 2 ranks and the all-to-all at top-2 of
        4. Ranks hold only their experts, and checkpoints resume across these layouts."""
        model = os.path.join(self.tmp, "ep-model.json")
        with open(model, "w") as f:
            json.dump(dict(TINY_MODEL, num_attention_heads=4, num_key_value_heads=4,
                           head_dim=4, num_local_experts=4), f)
        # name: (ranks, ep, grad_accum_steps, ep_dispatch, the dispatch that runs)
        layouts = {"ep-1": (1, 1, 2, "auto", None), "ep-2": (2, 2, 2, "allgather", "allgather"),
                   "ep-2-a2a": (2, 2, 2, "alltoall", "alltoall"),
                   "ep-2-mixed": (2, 2, 2, "alltoall,allgather", "alltoall,allgather"),
                   "ep-4": (4, 4, 2, "auto", "alltoall"), "dp2-ep2": (4, 2, 1, "auto", "allgather")}
        for name, (ranks, ep, accum, dispatch, runs) in layouts.items():
            config = self.train_config(name, data__grad_accum_steps=accum,
                                       parallel__expert_parallel=ep, parallel__ep_dispatch=dispatch,
                                       model__model_config=model)
            prefix = [] if ranks == 1 else [os.environ["MOEFORGE_MPIEXEC"], "-np", str(ranks),
                                            "--oversubscribe", "--allow-run-as-root"]
            proc = run(prefix + [MOEFORGE, "train", "--config", config, "--no-progress"])
            if runs:
                self.assertIn(f"expert dispatch: {runs} (parallel.ep_dispatch \"{dispatch}\"",
                              proc.stderr, name)
        metrics = {name: self.step_metrics(name) for name in layouts}
        ref = metrics["ep-1"]
        self.assertEqual(len(ref), 6)
        for name in ("ep-2", "ep-2-a2a", "ep-2-mixed", "ep-4", "dp2-ep2"):
            # Under dp the root sees only its own data-parallel replica's expert load.
            self.assert_same_training(ref, metrics[name], name, same_expert_load=name != "dp2-ep2")
        # The two dispatches move different data but compute the same step: equal routing, and
        # losses equal to fp32 rounding (only the order of a few sums differs).
        for other in ("ep-2-a2a", "ep-2-mixed"):
            for x, y in zip(metrics["ep-2"], metrics[other]):
                self.assertEqual(x["expert_load_max"], y["expert_load_max"])
                self.assertAlmostEqual(x["loss"], y["loss"], delta=2e-6 * abs(x["loss"]))
        # Each rank holds only its experts, yet every checkpoint holds the whole model: ep 2's and
        # dp 2 x ep 2's resume on one rank, one rank's resumes with ep 4 and with ep 2 under
        # ZeRO-1, each tracking the uninterrupted one-rank run.
        for name, source, ranks, ep, accum, zero in (
                ("ep-2-to-one", "ep-2", 1, 1, 2, 0), ("dp2-ep2-to-one", "dp2-ep2", 1, 1, 2, 0),
                ("one-to-ep-4", "ep-1", 4, 4, 2, 0), ("one-to-ep-2-zero1", "ep-1", 4, 2, 1, 1)):
            config = self.train_config(name, data__grad_accum_steps=accum, parallel__zero_stage=zero,
                                       parallel__expert_parallel=ep, model__model_config=model)
            prefix = [] if ranks == 1 else [os.environ["MOEFORGE_MPIEXEC"], "-np", str(ranks),
                                            "--oversubscribe", "--allow-run-as-root"]
            run(prefix + [MOEFORGE, "train", "--config", config, "--no-progress", "--resume",
                          os.path.join(self.tmp, source, "checkpoints", "step-00000003")])
            self.assert_same_training(ref[3:], self.step_metrics(name), name)
        # A layout that does not fit and an unknown dispatch are clear errors.
        bad = self.train_config("ep-bad", parallel__expert_parallel=3, model__model_config=model)
        proc = run([MOEFORGE, "train", "--config", bad, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("expert_parallel", proc.stderr)
        bad = self.train_config("ep-bad-dispatch", parallel__expert_parallel=2,
                                parallel__ep_dispatch="all-to-all", model__model_config=model)
        proc = run([MOEFORGE, "train", "--config", bad, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('parallel.ep_dispatch must be "allgather", "alltoall" or "auto"', proc.stderr)
        bad = self.train_config("ep-bad-list", parallel__ep_dispatch="alltoall,alltoall,alltoall",
                                model__model_config=model)
        proc = run([MOEFORGE, "train", "--config", bad, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("has 3 entries for a model of 2 decoder layers", proc.stderr)

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_bench_comm_measures_the_formulas(self):
        """`bench comm` under mpirun: what each rank sends in a forward + backward equals the
        per-layer formulas exactly for tp and the all-gather dispatch (2 and 4 ranks); the
        all-to-all dispatch's exchanges follow the routing, so only its plan's collectives are
        exact and its rows stay near the balanced-routing formula; one rank sends nothing."""
        model = os.path.join(self.tmp, "comm-model.json")
        with open(model, "w") as f:
            json.dump(dict(TINY_MODEL, num_attention_heads=4, num_key_value_heads=4, head_dim=4,
                           num_local_experts=4), f)

        def bench(ranks, *args):
            prefix = [] if ranks == 1 else [os.environ["MOEFORGE_MPIEXEC"], "-np", str(ranks),
                                            "--oversubscribe", "--allow-run-as-root"]
            out = run(prefix + [MOEFORGE, "bench", "comm", "--config", model, "--seq", "64",
                                "--micro-batch", "2"] + list(args)).stdout
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            self.assertEqual(len(lines), 1, out)  # rank 0 prints
            return lines[0]

        for ranks in (2, 4):
            for args in (["--layout", "tp"], ["--layout", "sp_ep", "--ep-dispatch", "allgather"]):
                row = bench(ranks, *args)
                self.assertEqual(row["ranks"], ranks)
                self.assertEqual(row["tokens_per_rank"], 2 * 64 // ranks)
                self.assertEqual(row["elements_per_rank"], row["formula_elements_per_rank"],
                                 (ranks, args))
                self.assertEqual(row["elements_per_rank_max"], row["formula_elements_per_rank"])
                self.assertGreater(row["elements_per_rank_per_layer"], 0)
            row = bench(ranks, "--layout", "sp_ep", "--ep-dispatch", "alltoall")
            got, want = row["elements_per_rank"], row["formula_elements_per_rank"]
            for name in ("all_gather", "all_reduce", "reduce_scatter"):
                self.assertEqual(got[name], want[name], (ranks, name))
            self.assertGreater(got["all_to_all"], 0.5 * want["all_to_all"])
            self.assertLess(got["all_to_all"], 1.5 * want["all_to_all"])
        one = bench(1, "--layout", "sp_ep")
        self.assertEqual(one["elements_per_rank_per_layer"], 0)
        proc = run([MOEFORGE, "bench", "comm", "--config", model, "--ep-dispatch", "auto,auto,auto"],
                   check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("has 3 entries for a model of 2 decoder layers", proc.stderr)

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_tensor_parallel_matches_one_rank(self):
        """parallel.layout "tp" (Megatron-LM's tensor parallelism, the baseline of MegaScale-MoE's
        ablation) over tp = 2 and 4 ranks and dp = 2 x tp = 2 (also with ZeRO-1 over the dp
        group) gives the one-rank losses and gradient norms (GQA, 3 experts: tp splits each
        expert, not the set); its checkpoints hold
        whole tensors, so a tp run resumes on one rank; configs that do not split are clear
        errors."""
        model = os.path.join(self.tmp, "tp-model.json")
        with open(model, "w") as f:
            json.dump(dict(TINY_MODEL, num_attention_heads=8, num_key_value_heads=4, head_dim=4,
                           num_local_experts=3), f)
        mpiexec = os.environ["MOEFORGE_MPIEXEC"]
        # name: (ranks, group size, grad_accum_steps, layout, zero_stage)
        layouts = {"tp-1": (1, 1, 2, "sp_ep", 0), "tp-2": (2, 2, 2, "tp", 0),
                   "tp-4": (4, 4, 2, "tp", 0), "dp2-tp2": (4, 2, 1, "tp", 0),
                   "dp2-tp2-zero1": (4, 2, 1, "tp", 1)}
        for name, (ranks, group, accum, layout, zero) in layouts.items():
            config = self.train_config(name, data__grad_accum_steps=accum,
                                       parallel__expert_parallel=group, parallel__layout=layout,
                                       parallel__zero_stage=zero, model__model_config=model)
            prefix = [] if ranks == 1 else [mpiexec, "-np", str(ranks), "--oversubscribe",
                                            "--allow-run-as-root"]
            proc = run(prefix + [MOEFORGE, "train", "--config", config, "--no-progress"])
            if layout == "tp":
                self.assertIn(f"{group} tensor-parallel (parallel.layout \"tp\")", proc.stderr, name)
                self.assertNotIn("expert dispatch", proc.stderr, name)
        metrics = {name: self.step_metrics(name) for name in layouts}
        ref = metrics["tp-1"]
        self.assertEqual(len(ref), 6)
        for name in ("tp-2", "tp-4", "dp2-tp2", "dp2-tp2-zero1"):
            # Under dp the root sees only its own data-parallel replica's expert load.
            self.assert_same_training(ref, metrics[name], name,
                                      same_expert_load=not name.startswith("dp2"))
        # The tp checkpoint of step 3 continues on one rank as the one-rank run does.
        config = self.train_config("tp-2-to-one", data__grad_accum_steps=2, model__model_config=model)
        run([MOEFORGE, "train", "--config", config, "--no-progress", "--resume",
             os.path.join(self.tmp, "tp-2", "checkpoints", "step-00000003")])
        resumed = self.step_metrics("tp-2-to-one")
        self.assertEqual([m["step"] for m in resumed], [4, 5, 6])
        for x, y in zip(ref[3:], resumed):
            self.assertAlmostEqual(x["loss"], y["loss"], delta=1e-5 * abs(x["loss"]))
        # An expert dispatch under tp, and a model whose expert columns do not split.
        bad = self.train_config("tp-bad-dispatch", parallel__expert_parallel=2, parallel__layout="tp",
                                parallel__ep_dispatch="alltoall", model__model_config=model)
        proc = run([MOEFORGE, "train", "--config", bad, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('parallel.ep_dispatch ("alltoall") applies only to parallel.layout "sp_ep"',
                      proc.stderr)
        odd = os.path.join(self.tmp, "tp-odd-model.json")
        with open(odd, "w") as f:
            json.dump(dict(TINY_MODEL, num_attention_heads=8, num_key_value_heads=4, head_dim=4,
                           intermediate_size=25), f)
        bad = self.train_config("tp-bad-model", parallel__expert_parallel=2, parallel__layout="tp",
                                model__model_config=odd)
        proc = run([mpiexec, "-np", "2", "--oversubscribe", "--allow-run-as-root", MOEFORGE, "train",
                    "--config", bad, "--no-progress"], check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("tensor parallelism over 2 ranks needs moe_intermediate_size (25)", proc.stderr)

    @unittest.skipUnless(os.environ.get("MOEFORGE_MPIEXEC"), "built without MPI")
    def test_zero1_matches_zero0_and_resumes_across_layouts(self):
        """parallel.zero_stage=1 (AdamW state sharded over 2 ranks) trains exactly as zero_stage=0:
        the same losses and byte-identical checkpoints (weights and optimizer state); its
        checkpoint resumes with zero_stage 0 on 1 rank and a 1-rank checkpoint resumes with
        zero_stage 1 on 2 ranks (1 rank x 2 accumulation steps = 2 ranks, to fp32 rounding); with
        dp 2 x ep 2 it tracks zero_stage 0 to fp32 rounding."""
        mpirun = [os.environ["MOEFORGE_MPIEXEC"], "-np", "2", "--oversubscribe", "--allow-run-as-root"]
        losses = {}
        for name, ranks, zero, accum in (("zero0", 2, 0, 1), ("zero1", 2, 1, 1), ("one", 1, 0, 2)):
            config = self.train_config(name, parallel__zero_stage=zero, data__grad_accum_steps=accum)
            proc = run((mpirun if ranks == 2 else []) + [MOEFORGE, "train", "--config", config,
                                                         "--no-progress"])
            self.assertIn(f"on {ranks} rank(s)", proc.stderr, name)
            losses[name] = [m["loss"] for m in self.step_metrics(name)]
        self.assertEqual(len(losses["zero1"]), 6)
        self.assertEqual(losses["zero1"], losses["zero0"])
        for step in (3, 6):
            for file in ("model.safetensors", "optimizer.safetensors"):
                paths = [os.path.join(self.tmp, name, "checkpoints", f"step-{step:08d}", file)
                         for name in ("zero0", "zero1")]
                with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
                    self.assertEqual(a.read(), b.read(), paths[1])
        # zero 1 on 2 ranks -> zero 0 on 1 rank, and zero 0 on 1 rank -> zero 1 on 2 ranks.
        for name, source, ranks, zero, accum in (("zero1-to-one", "zero1", 1, 0, 2),
                                                 ("one-to-zero1", "one", 2, 1, 1)):
            config = self.train_config(name, parallel__zero_stage=zero, data__grad_accum_steps=accum)
            run((mpirun if ranks == 2 else []) + [
                MOEFORGE, "train", "--config", config, "--no-progress", "--resume",
                os.path.join(self.tmp, source, "checkpoints", "step-00000003")])
            resumed = self.step_metrics(name)
            self.assertEqual([m["step"] for m in resumed], [4, 5, 6], name)
            for x, y in zip(losses[source][3:], resumed):
                self.assertAlmostEqual(x, y["loss"], delta=1e-5 * abs(x), msg=name)
        # dp 2 x ep 2: ZeRO-1 shards over the data-parallel group only, after the expert group's
        # partial gradients are summed: the same run to fp32 rounding (the sums are grouped
        # differently from the world all-reduce).
        model = os.path.join(self.tmp, "zero-ep-model.json")
        with open(model, "w") as f:
            json.dump(dict(TINY_MODEL, num_attention_heads=4, num_key_value_heads=4, head_dim=4), f)
        mpirun4 = [os.environ["MOEFORGE_MPIEXEC"], "-np", "4", "--oversubscribe", "--allow-run-as-root"]
        ep = {}
        for zero in (0, 1):
            name = f"zero{zero}-dp2-ep2"
            config = self.train_config(name, parallel__zero_stage=zero, parallel__expert_parallel=2,
                                       model__model_config=model)
            run(mpirun4 + [MOEFORGE, "train", "--config", config, "--no-progress"])
            ep[zero] = self.step_metrics(name)
        self.assertEqual(len(ep[1]), 6)
        self.assert_same_training(ep[0], ep[1], "zero1-dp2-ep2")
        bad = self.train_config("zero-bad", parallel__zero_stage=2)
        proc = run([MOEFORGE, "train", "--config", bad, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("parallel.zero_stage must be 0", proc.stderr)

    def test_flex_prefill_attention(self):
        """generate and eval with --attention flex (FlexPrefill sparse prefill): the statistics JSON
        has the documented keys, eval at gamma 1 with a full budget equals dense, and bad values
        are clear errors naming the option."""
        out = self.init_model("flex-model", 3, init_std=0.5, max_position_embeddings=512)
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
        self.assertEqual(stats["params"]["search"], "exact")
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
        # The CPU always searches exactly, and records so whatever --flex-search says.
        for search in ("fast", "exact"):
            path = os.path.join(self.tmp, f"flex-stats-{search}.json")
            run(generate + sparse + ["--flex-search", search, "--attention-stats", path])
            with open(path) as f:
                explicit = json.load(f)
            self.assertEqual(explicit["params"]["search"], "exact")
            self.assertEqual(explicit["layers"], stats["layers"])
        for args in (["--gamma", "0"], ["--block-size", "100"], ["--attention", "sparse"],
                     ["--min-budget", "0"], ["--flex-search", "approx"]):
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

    def test_data_synth_writes_tasks_and_training_data(self):
        """data synth: the requested examples with exact prompt lengths, the same file for the same
        seed, a token dataset the loader reads (--format train), and errors naming the option."""
        self.assertIn("--lengths", run([MOEFORGE, "data", "synth", "--help"]).stdout)
        self.assertIn("--task", run([MOEFORGE, "eval", "--help"]).stdout)
        tasks = os.path.join(self.tmp, "synth.jsonl")
        def synth(out, seed="5", extra=()):
            return [MOEFORGE, "data", "synth", "--task", "niah_single,niah_multikey,niah_multivalue,vt",
                    "--lengths", "600,1024", "--num", "3", "--seed", seed, "--out", out, *extra]
        run(synth(tasks))
        examples = read_jsonl(tasks)
        self.assertEqual(len(examples), 4 * 2 * 3)
        groups = {}
        for e in examples:
            self.assertEqual(len(e["prompt"].encode()), e["length"])
            self.assertTrue(0.0 <= e["depth"] < 1.0, e["depth"])
            self.assertTrue(e["prompt"].endswith("Answer: "))
            self.assertNotIn(e["answer"], e["prompt"].rsplit("\n", 1)[1])  # not in the question
            groups[(e["task"], e["length"])] = groups.get((e["task"], e["length"]), 0) + 1
        self.assertEqual(groups, {(t, n): 3 for t in ("niah_single", "niah_multikey", "niah_multivalue", "vt")
                                  for n in (600, 1024)})
        again = os.path.join(self.tmp, "synth-again.jsonl")
        run(synth(again))
        with open(tasks) as a, open(again) as b:
            self.assertEqual(a.read(), b.read())
        other = os.path.join(self.tmp, "synth-other.jsonl")
        run(synth(other, seed="6"))
        for x, y in zip(examples, read_jsonl(other)):
            self.assertNotEqual(x["prompt"], y["prompt"])
        proc = run(synth(tasks), check=False)  # no silent overwrite
        self.assertEqual(proc.returncode, 1)
        self.assertIn("--overwrite", proc.stderr)

        train_dir = os.path.join(self.tmp, "synth-train")
        run(synth(train_dir, extra=("--format", "train", "--val-fraction", "0.2")))
        with open(os.path.join(train_dir, "dataset.json")) as f:
            dataset = json.load(f)
        self.assertEqual(dataset["tokenizer"]["kind"], "byte")
        splits = dataset["splits"]
        self.assertEqual(splits["train"]["num_tokens"] + splits["val"]["num_tokens"],
                         sum(len(e["prompt"]) + len(e["answer"]) + 2 for e in examples))  # BOS, EOS
        self.assertGreater(splits["val"]["num_tokens"], 0)
        model = os.path.join(self.tmp, "synth-loader-model")
        run([MOEFORGE, "init", "--config", self.model_json, "--out", model, "--seed", "3"])
        ev = json.loads(run([MOEFORGE, "eval", "--model", model, "--data", train_dir, "--split", "train",
                             "--seq-len", "64", "--batch-size", "2", "--max-batches", "1"]).stdout)
        self.assertEqual(ev["tokens"], 128)
        # --loss answer: the same tokens, and a mask that counts only answers and EOS, which eval
        # and train read (targets the mask does not count are ignored).
        answer_dir = os.path.join(self.tmp, "synth-answer")
        run(synth(answer_dir, extra=("--format", "train", "--val-fraction", "0.2", "--loss", "answer")))
        for split in ("train", "val"):
            with open(os.path.join(train_dir, f"{split}-00000.bin"), "rb") as a, \
                    open(os.path.join(answer_dir, f"{split}-00000.bin"), "rb") as b:
                self.assertEqual(a.read(), b.read(), split)
        with open(os.path.join(answer_dir, "train-00000.mask.bin"), "rb") as f:
            mask = f.read()[64:]
        with open(os.path.join(answer_dir, "train-00000.bin"), "rb") as f:
            blob = f.read()[64:]
        tokens = struct.unpack(f"<{len(blob) // 2}H", blob)
        counted = bytes(t if t < 256 else 10 for t, m in zip(tokens, mask) if m).decode()
        answers = [e["answer"] for e in examples]
        self.assertEqual(len(counted), sum(1 for m in mask if m))
        self.assertGreater(len(counted.splitlines()), 0)
        self.assertTrue(all(line in answers for line in counted.splitlines()), counted[:200])
        ev = json.loads(run([MOEFORGE, "eval", "--model", model, "--data", answer_dir, "--split", "train",
                             "--seq-len", "64", "--batch-size", "32", "--max-batches", "1"]).stdout)
        # The 32 windows scored are spread evenly over the split's stream windows.
        num_windows = (len(tokens) - 1) // 64
        scored = [i * num_windows // 32 for i in range(32)]
        self.assertGreater(num_windows, 32)
        self.assertEqual(ev["tokens"], sum(sum(mask[w * 64 + 1:w * 64 + 65]) for w in scored))
        self.assertGreater(ev["tokens"], 0)
        # The unigram baseline is fitted and scored on the counted tokens only.
        counts = [1.0] * 258
        for t, m in zip(tokens, mask):
            counts[t] += m
        total = sum(counts)
        scored = [-math.log(counts[t] / total) for t, m in zip(tokens[1:], mask[1:]) if m]
        self.assertAlmostEqual(ev["unigram_loss"], sum(scored) / len(scored), places=9)
        # --windows packed: every example whole in its window, so every counted target of the
        # split is scored once (the stream layout drops the last partial window).
        for windows, expected in (("packed", sum(mask)), ("single", sum(mask))):
            ev = json.loads(run([MOEFORGE, "eval", "--model", model, "--data", answer_dir, "--split",
                                 "train", "--seq-len", "4096", "--windows", windows]).stdout)
            self.assertEqual(ev["windows"], windows)
            self.assertEqual(ev["tokens"], expected, windows)
        proc = run([MOEFORGE, "eval", "--model", model, "--data", answer_dir, "--windows", "docs"],
                   check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--windows: docs not in {stream,packed,single}", proc.stderr)
        # The trainer reads its windows in the configured layout: packed windows (padded, starting
        # at documents) count other targets than the stream's windows of the same seed.
        counted = {}
        for windows in ("packed", "stream"):
            name = f"synth-answer-{windows}"
            config = self.train_config(name, data__dataset=answer_dir, data__seq_len=128,
                                       data__windows=windows, eval__max_batches=8,
                                       schedule__max_steps=2, checkpoint__every_steps=0)
            run([MOEFORGE, "train", "--config", config, "--no-progress"])
            counted[windows] = [m["counted_targets"] for m in self.step_metrics(name)]
            self.assertEqual(len(counted[windows]), 2)
        self.assertNotEqual(counted["packed"], counted["stream"])
        config = self.train_config("synth-answer-run", data__dataset=answer_dir, data__seq_len=128,
                                   eval__max_batches=8, schedule__max_steps=2,
                                   checkpoint__every_steps=0)
        run([MOEFORGE, "train", "--config", config, "--no-progress"])
        self.assertEqual(len(self.step_metrics("synth-answer-run")), 2)
        # Gradient accumulation over micro-batches that count different numbers of answer
        # targets equals one micro-batch of them all: the cross-entropy is the mean over the
        # step's counted targets, not a mean of the micro-batches' means (a dense model: the
        # router's load-balancing loss is per micro-batch by design).
        runs = {}
        dense_model = os.path.join(REPO, "configs", "models", "tiny-llama.json")
        for name, micro, accum in (("answer-big", 4, 1), ("answer-accum", 1, 4)):
            config = self.train_config(name, model__model_config=dense_model,
                                       data__dataset=answer_dir, data__seq_len=256,
                                       data__micro_batch_size=micro, data__grad_accum_steps=accum,
                                       eval__max_batches=16 // micro, schedule__max_steps=3,
                                       checkpoint__every_steps=0)
            run([MOEFORGE, "train", "--config", config, "--no-progress"])
            runs[name] = self.step_metrics(name)
        self.assert_same_training(runs["answer-big"], runs["answer-accum"], "answer-accum")
        counted = [m["counted_targets"] for m in runs["answer-big"]]
        self.assertTrue(all(c > 0 for c in counted), counted)
        # Windows that hold no answer have nothing to score: a clear error, not a loss of 0 (the
        # first 16 tokens of an example are its header). The trainer says so before its first step.
        proc = run([MOEFORGE, "eval", "--model", model, "--data", answer_dir, "--split", "val",
                    "--seq-len", "16", "--batch-size", "1", "--max-batches", "1"], check=False)
        self.assertEqual(proc.returncode, 1, proc.stdout)
        self.assertIn("loss mask excludes them all", proc.stderr)
        config = self.train_config("synth-answer-none", data__dataset=answer_dir, data__seq_len=16,
                                   data__micro_batch_size=1, eval__max_batches=1,
                                   schedule__max_steps=2, checkpoint__every_steps=0)
        proc = run([MOEFORGE, "train", "--config", config, "--no-progress"], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("raise eval.max_batches", proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "synth-answer-none", "metrics.jsonl")))
        proc = run([MOEFORGE, "data", "synth", "--task", "vt", "--lengths", "1024", "--loss", "answer",
                    "--out", os.path.join(self.tmp, "x.jsonl")], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("--loss applies to --format train only", proc.stderr)
        # --questions all: each answer is followed by the other questions of its context (3 more
        # 7-digit values for niah_multikey, the other 4-variable chain for vt), every answer counted.
        all_dir = os.path.join(self.tmp, "synth-all-questions")
        run(synth(all_dir, extra=("--format", "train", "--val-fraction", "0", "--loss", "answer",
                                  "--questions", "all")))
        with open(os.path.join(all_dir, "train-00000.mask.bin"), "rb") as f:
            mask = f.read()[64:]
        with open(os.path.join(all_dir, "train-00000.bin"), "rb") as f:
            blob = f.read()[64:]
        tokens = struct.unpack(f"<{len(blob) // 2}H", blob)
        counted = bytes(t if t < 256 else 10 for t, m in zip(tokens, mask) if m).decode().splitlines()
        extra = {"niah_single": 0, "niah_multikey": 3 * 7, "niah_multivalue": 0, "vt": 4 * 5 + 3 * 2}
        self.assertEqual(len(counted), len(examples))
        for line, e in zip(counted, examples):
            self.assertTrue(line.startswith(e["answer"]), (line, e["answer"]))
            self.assertEqual(len(line), len(e["answer"]) + extra[e["task"]], (line, e["task"]))
        text = bytes(t if t < 256 else 10 for t in tokens).decode()
        self.assertEqual(text.count("Answer: "), sum(1 + {"niah_multikey": 3, "vt": 1}.get(e["task"], 0)
                                                      for e in examples))
        # --vt-variables: chains of that many variables; 4 (the default) gives the same file.
        short = os.path.join(self.tmp, "synth-vt2.jsonl")
        run([MOEFORGE, "data", "synth", "--task", "vt", "--lengths", "300,600", "--num", "3",
             "--vt-variables", "2", "--out", short])
        for e in read_jsonl(short):
            self.assertEqual(len(e["answer"].split(", ")), 2, e["answer"])
            self.assertEqual(e["prompt"].count("VAR "), 2 * 2)
            self.assertEqual(len(e["prompt"].encode()), e["length"])
        default_vt, four_vt = (os.path.join(self.tmp, f"synth-vt-{n}.jsonl") for n in ("d", "4"))
        run([MOEFORGE, "data", "synth", "--task", "vt", "--lengths", "600", "--num", "2", "--out", default_vt])
        run([MOEFORGE, "data", "synth", "--task", "vt", "--lengths", "600", "--num", "2",
             "--vt-variables", "4", "--out", four_vt])
        with open(default_vt) as a, open(four_vt) as b:
            self.assertEqual(a.read(), b.read())
        proc = run([MOEFORGE, "data", "synth", "--task", "vt", "--lengths", "1024", "--questions", "all",
                    "--out", os.path.join(self.tmp, "x.jsonl")], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("--questions applies to --format train only", proc.stderr)

        bad = os.path.join(self.tmp, "synth-bad.jsonl")
        for args, option in ((["--task", "niah_triple", "--lengths", "1024"], "--task"),
                             (["--task", "vt", "--lengths", "1024,100"], "--lengths"),
                             (["--task", "niah_multikey", "--lengths", "300"], "--lengths"),
                             (["--task", "vt", "--lengths", "1024", "--num", "0"], "--num"),
                             (["--task", "vt", "--lengths", "1024", "--num", "-3"], "--num"),
                             (["--task", "vt", "--lengths", "1024", "--depth", "1.5"], "--depth"),
                             (["--task", "vt", "--lengths", "1024", "--vt-variables", "0"], "--vt-variables"),
                             (["--task", "vt", "--lengths", "1024", "--vt-variables", "17"], "--vt-variables"),
                             (["--task", "vt", "--lengths", "400", "--vt-variables", "12"], "--lengths")):
            proc = run([MOEFORGE, "data", "synth", *args, "--out", bad], check=False)
            self.assertEqual(proc.returncode, 1, args)
            self.assertIn(option, proc.stderr, args)
            self.assertFalse(os.path.exists(bad), args)
        proc = run([MOEFORGE, "data", "synth", "--task", "vt", "--lengths", "100", "--out", bad], check=False)
        self.assertIn("minimum", proc.stderr)

    def test_eval_task_accuracy_dense_and_flex(self):
        """eval --task: accuracy per task and length in [0, 1] for dense and flex attention (flex
        with the mean density); a model built to answer "7" scores exactly the lines whose answer
        is 7 (the scorer says yes and no); clear errors."""
        model = self.init_model("task-model", 3, init_std=0.5, max_position_embeddings=1100)
        tasks = os.path.join(self.tmp, "eval-tasks.jsonl")
        run([MOEFORGE, "data", "synth", "--task", "niah_single,niah_multikey,niah_multivalue,vt",
             "--lengths", "600,1024", "--num", "2", "--seed", "1", "--out", tasks])
        sparse = ["--attention", "flex", "--gamma", "0.5", "--min-budget", "64", "--block-size", "64"]
        for attention in (["--attention", "dense"], sparse):
            ev = json.loads(run([MOEFORGE, "eval", "--model", model, "--task", tasks, *attention]).stdout)
            self.assertEqual(ev["examples"], 16)
            self.assertTrue(0.0 <= ev["accuracy"] <= 1.0)
            self.assertEqual(set(ev["tasks"]), {"niah_single", "niah_multikey", "niah_multivalue", "vt"})
            for name, task in ev["tasks"].items():
                self.assertEqual(task["examples"], 4, name)
                self.assertEqual(set(task["lengths"]), {"600", "1024"}, name)
                for length in task["lengths"].values():
                    self.assertEqual(length["examples"], 2)
                    self.assertTrue(0.0 <= length["accuracy"] <= 1.0)
                    self.assertEqual(length["accuracy"], length["correct"] / 2)
                    if attention == sparse:
                        self.assertTrue(0.0 < length["mean_density"] < 1.0, length)
            if attention == sparse:
                self.assertEqual(ev["attention_stats"]["prefills"], 16)
                self.assertEqual(ev["attention_stats"]["dense_fallback_layers"], 0)
                self.assertTrue(0.0 < ev["attention_stats"]["mean_density"] < 1.0)
                self.assertLess(ev["tasks"]["vt"]["lengths"]["1024"]["mean_density"],
                                ev["tasks"]["vt"]["lengths"]["600"]["mean_density"])
            else:
                self.assertNotIn("attention_stats", ev)

        # A bigram model that answers "7" after a space, then ends (EOS): attention and experts
        # add nothing, the embedding of ' ' selects '7' in lm_head and that of '7' selects EOS.
        seven = os.path.join(self.tmp, "seven-model")
        shutil.copytree(model, seven)
        space, digit, eos = ord(" "), ord("7"), 257
        def edit(name, shape, values):
            if name.endswith("o_proj.weight") or name.endswith("w2.weight"):
                values[:] = [0.0] * len(values)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                values[:] = [0.0] * len(values)
                hidden = shape[1]
                rows = {space: 0, digit: 1} if name.startswith("model.") else {digit: 0, eos: 1}
                for row, column in rows.items():
                    values[row * hidden + column] = 10.0
        rewrite_safetensors(os.path.join(seven, "model.safetensors"), edit)
        self.assertEqual(run([MOEFORGE, "generate", "--model", seven, "--prompt", "Answer: ",
                              "--max-new-tokens", "6", "--temperature", "0"]).stdout, "Answer: 7\n")
        prompts = {(e["task"], e["length"]): e["prompt"] for e in read_jsonl(tasks)}
        hand = [("niah_single", 600, "7"), ("niah_single", 1024, "8"), ("niah_multikey", 600, "77"),
                ("niah_multivalue", 600, "7, 8"), ("vt", 600, "7")]
        hand_file = os.path.join(self.tmp, "hand-tasks.jsonl")
        with open(hand_file, "w") as f:
            for task, length, answer in hand:
                f.write(json.dumps({"task": task, "length": length, "depth": 0.5,
                                    "prompt": prompts[(task, length)], "answer": answer}) + "\n")
        for attention in (["--attention", "dense"], sparse):
            ev = json.loads(run([MOEFORGE, "eval", "--model", seven, "--task", hand_file, *attention]).stdout)
            self.assertEqual((ev["examples"], ev["correct"]), (5, 2), attention)
            self.assertEqual(ev["tasks"]["niah_single"]["lengths"]["600"]["accuracy"], 1.0)
            self.assertEqual(ev["tasks"]["niah_single"]["lengths"]["1024"]["accuracy"], 0.0)
            self.assertEqual(ev["tasks"]["niah_multikey"]["accuracy"], 0.0)
            self.assertEqual(ev["tasks"]["niah_multivalue"]["accuracy"], 0.0)
            self.assertEqual(ev["tasks"]["vt"]["accuracy"], 1.0)
        # --predictions: every example's answer, output and score, in task-file order.
        predictions = os.path.join(self.tmp, "predictions.jsonl")
        run([MOEFORGE, "eval", "--model", seven, "--task", hand_file, "--predictions", predictions])
        lines = read_jsonl(predictions)
        self.assertEqual([(l["task"], l["length"], l["answer"]) for l in lines], hand)
        self.assertEqual([l["output"].splitlines()[0] for l in lines], ["7"] * 5)
        self.assertEqual([l["correct"] for l in lines], [True, False, False, False, True])
        proc = run([MOEFORGE, "eval", "--model", seven, "--data", self.data, "--predictions", predictions],
                   check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--predictions", proc.stderr)
        # The random model cannot produce a long answer.
        with open(hand_file, "w") as f:
            f.write(json.dumps({"task": "niah_single", "length": 600, "depth": 0.5,
                                "prompt": prompts[("niah_single", 600)],
                                "answer": "the answer nobody generates by chance"}) + "\n")
        ev = json.loads(run([MOEFORGE, "eval", "--model", model, "--task", hand_file]).stdout)
        self.assertEqual((ev["examples"], ev["accuracy"]), (1, 0.0))

        short = self.init_model("short-model", 3)
        proc = run([MOEFORGE, "eval", "--model", short, "--task", tasks], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("max_position_embeddings", proc.stderr)
        proc = run([MOEFORGE, "eval", "--model", model, "--task", tasks, "--seq-len", "64"], check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--seq-len", proc.stderr)
        proc = run([MOEFORGE, "eval", "--model", model], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("--task", proc.stderr)
        with open(hand_file, "w") as f:
            f.write(json.dumps({"task": "niah_triple", "length": 600, "depth": 0.5, "prompt": "x",
                                "answer": "7"}) + "\n")
        proc = run([MOEFORGE, "eval", "--model", model, "--task", hand_file], check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("hand-tasks.jsonl:1: field 'task'", proc.stderr)


def parse_safetensors(blob):
    """(header length, header, {name: (shape, flat list of floats)}) of a float32 .safetensors
    file's bytes."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        begin, end = info["data_offsets"]
        data = blob[8 + header_len + begin:8 + header_len + end]
        tensors[name] = (info["shape"], list(struct.unpack(f"<{(end - begin) // 4}f", data)))
    return header_len, header, tensors


def read_safetensors(path):
    """({name: (shape, flat list of floats)}, metadata) of a float32 .safetensors file."""
    with open(path, "rb") as f:
        _, header, tensors = parse_safetensors(f.read())
    return tensors, header.get("__metadata__", {})


def rewrite_safetensors(path, edit):
    """Calls edit(name, shape, values) for every tensor of a float32 .safetensors file (values: a
    flat list of floats that edit may change in place) and writes the file back."""
    with open(path, "rb") as f:
        blob = f.read()
    header_len, header, tensors = parse_safetensors(blob)
    data = bytearray(blob[8 + header_len:])
    for name, (shape, values) in tensors.items():
        edit(name, shape, values)
        begin, end = header[name]["data_offsets"]
        data[begin:end] = struct.pack(f"<{len(values)}f", *values)
    with open(path, "wb") as f:
        f.write(blob[:8 + header_len] + bytes(data))


if __name__ == "__main__":
    MOEFORGE = sys.argv.pop(1)
    unittest.main()
