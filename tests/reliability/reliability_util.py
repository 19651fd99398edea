"""Shared set-up of the reliability tests: a tiny prepared dataset, model and training config,
running moeforge, and reading metrics.jsonl and the checkpoint index (Python standard library)."""
import json
import os
import random
import subprocess

# A Mixtral small enough to train a step in milliseconds, large enough (450k parameters, ~5 MB per
# checkpoint with the optimizer moments) that writing a checkpoint takes longer than a step, so
# that random kills land inside checkpoint writes too.
MODEL = {
    "architectures": ["MixtralForCausalLM"], "vocab_size": 258, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
}

CHECKPOINT_FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json")


def env_one_thread():
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def run(args, check=True, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", env=env_one_thread(),
                          **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_dataset(moeforge, tmp):
    """A prepared byte-level dataset of random words in tmp/data; returns its path."""
    text = os.path.join(tmp, "text")
    os.makedirs(text)
    rng = random.Random(5)
    words = "the quick brown fox jumps over a lazy dog while cats sleep".split()
    for doc_idx in range(10):
        with open(os.path.join(text, f"doc{doc_idx}.txt"), "w") as f:
            f.write(" ".join(rng.choice(words) for _ in range(600)))
    data = os.path.join(tmp, "data")
    run([moeforge, "data", "prepare", text, "--out", data, "--val-fraction", "0.2"])
    return data


def write_train_config(tmp, name, data, run_dir, max_steps, every_steps=1, keep_last=0, metrics_file=""):
    """Writes tmp/<name>.json (constant LR, a checkpoint every `every_steps`) and returns its path."""
    model_json = os.path.join(tmp, "model.json")
    with open(model_json, "w") as f:
        json.dump(MODEL, f)
    config = {
        "model": {"model_config": model_json, "seed": 1},
        "data": {"dataset": data, "seq_len": 32, "micro_batch_size": 4, "grad_accum_steps": 1},
        "optimizer": {"lr": 0.01},
        "schedule": {"type": "constant", "max_steps": max_steps},
        "checkpoint": {"dir": run_dir, "every_steps": every_steps, "keep_last": keep_last},
        "eval": {"max_batches": 1},
        "log": {"metrics_file": metrics_file},
    }
    path = os.path.join(tmp, name + ".json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def read_metrics(path):
    """The records of metrics.jsonl; every line must be complete JSON (it is appended line by line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(records):
    """{step: [loss, ...]} over the training records, in the order they were written."""
    losses = {}
    for record in records:
        if "loss" in record:
            losses.setdefault(record["step"], []).append(record["loss"])
    return losses


def checkpoint_index(run_dir):
    """The entries of <run>/checkpoints/index.json, oldest first ([] when there is none yet)."""
    path = os.path.join(run_dir, "checkpoints", "index.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["checkpoints"]


def is_complete_checkpoint(path):
    return all(os.path.isfile(os.path.join(path, name)) for name in CHECKPOINT_FILES)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()
