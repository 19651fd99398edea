#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets (fuzz/corpus/<target>/): small valid
examples of every input format plus a few edge cases. Deterministic; run it after changing a
format and commit the result: python3 fuzz/make_seeds.py"""
import json
import math
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
REPO = os.path.dirname(ROOT)
SEPARATOR = b"\n@@file@@\n"  # fuzz::kFileSeparator

DTYPE_FORMATS = {"F32": "<f", "F64": "<d", "I64": "<q", "I32": "<i", "U8": "B"}


def encode(dtype, values):
    if dtype in ("BF16", "F16"):
        out = b""
        for v in values:
            if dtype == "F16":
                out += struct.pack("<e", v)
            else:
                out += struct.pack("<f", v)[2:]
        return out
    return b"".join(struct.pack(DTYPE_FORMATS[dtype], v) for v in values)


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape, values)] -> bytes of a valid file (header padded to 8)."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape, values in tensors:
        blob = encode(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def raw_safetensors(header_text, data=b""):
    text = header_text.encode()
    return struct.pack("<Q", len(text)) + text + data


def token_shard(tokens, vocab_size, token_bytes=None, version=1, num_tokens=None):
    token_bytes = token_bytes or (2 if vocab_size <= 65536 else 4)
    header = b"MFTOKSHD" + struct.pack("<IIQQ", version, token_bytes,
                                       len(tokens) if num_tokens is None else num_tokens, vocab_size)
    header += b"\0" * (64 - len(header))
    fmt = "<H" if token_bytes == 2 else "<I"
    return header + b"".join(struct.pack(fmt, t) for t in tokens)


def values(n, scale=0.1):
    return [((i * 37) % 17 - 8) * scale for i in range(n)]


def write_corpus(target, seeds):
    folder = os.path.join(CORPUS, target)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name, content in seeds.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())


def join_files(*parts):
    return SEPARATOR.join(p if isinstance(p, bytes) else p.encode() for p in parts)


def safetensors_seeds():
    return {
        "f32_with_metadata": safetensors([("a", "F32", [2, 3], values(6)), ("b", "F32", [3], values(3))],
                                         {"format": "pt"}),
        "all_float_dtypes": safetensors([("h", "F16", [2, 2], values(4)), ("b", "BF16", [4], values(4)),
                                         ("d", "F64", [1, 2], values(2))]),
        "int_dtypes": safetensors([("i", "I64", [2], [1, -2]), ("u", "U8", [3], [1, 2, 3]),
                                   ("j", "I32", [1], [7])]),
        "scalar_and_empty": safetensors([("s", "F32", [], [1.5]), ("e", "F32", [0, 4], [])]),
        "empty_header": raw_safetensors("{}      "),
        "unpadded_header": safetensors([("x", "F32", [1], [2.0])], pad=False),
        "overlapping": raw_safetensors('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                       '"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}', b"\0" * 8),
        "huge_shape": raw_safetensors('{"a":{"dtype":"F64","shape":[4294967296,4294967296],'
                                      '"data_offsets":[0,8]}}', b"\0" * 8),
        "truncated_data": safetensors([("a", "F32", [4], values(4))])[:-3],
        "header_past_end": struct.pack("<Q", 1 << 20) + b"{}",
    }


def model_weights_seeds():
    shard1 = safetensors([("w.a", "F32", [2, 2], values(4))], {"format": "pt"})
    shard2 = safetensors([("w.b", "BF16", [3], values(3)), ("w.c", "U8", [2], [1, 2])], {"format": "pt"})
    index = {"metadata": {"total_size": 16 + 6 + 2},
             "weight_map": {"w.a": "model-00001-of-00002.safetensors",
                            "w.b": "model-00002-of-00002.safetensors",
                            "w.c": "model-00002-of-00002.safetensors"}}
    wrong_index = dict(index, weight_map=dict(index["weight_map"], **{"w.a": "model-00002-of-00002.safetensors"}))
    escaping_index = {"weight_map": {"w.a": "../model-00001-of-00002.safetensors"}}
    return {
        "sharded": join_files(json.dumps(index), shard1, shard2),
        "single_file": join_files("", safetensors([("x", "F16", [2], values(2))]), ""),
        "index_lists_wrong_shard": join_files(json.dumps(wrong_index), shard1, shard2),
        "index_escapes_folder": join_files(json.dumps(escaping_index), shard1, shard2),
        "missing_shard": join_files(json.dumps(index), shard1, ""),
    }


def model_config_seeds():
    seeds = {}
    folder = os.path.join(REPO, "configs", "models")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            seeds[name] = f.read()
    base = {"vocab_size": 13, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 10, "max_position_embeddings": 64}
    seeds["llama_tied.json"] = json.dumps(dict(base, architectures=["LlamaForCausalLM"],
                                               tie_word_embeddings=True, bos_token_id=[1, 2]))
    seeds["qwen2.json"] = json.dumps(dict(base, model_type="qwen2", rope_scaling=None))
    seeds["qwen3_head_dim.json"] = json.dumps(dict(base, architectures=["Qwen3ForCausalLM"], head_dim=6,
                                                   rope_parameters={"rope_type": "default",
                                                                    "rope_theta": 1e6}))
    seeds["mixtral.json"] = json.dumps(dict(base, architectures=["MixtralForCausalLM"], num_local_experts=4,
                                            num_experts_per_tok=2, router_z_loss_coef=0.01,
                                            capacity_factor=1.25, moeforge_dense_layers=[1],
                                            sliding_window=None))
    seeds["qwen3_moe_sparse_step.json"] = json.dumps(dict(base, architectures=["Qwen3MoeForCausalLM"],
                                                          num_experts=6, num_experts_per_tok=2,
                                                          moe_intermediate_size=5,
                                                          decoder_sparse_step=2, mlp_only_layers=[0],
                                                          layer_types=["full_attention"] * 2))
    seeds["rope_scaling_rejected.json"] = json.dumps(dict(base, architectures=["LlamaForCausalLM"],
                                                          rope_scaling={"type": "linear", "factor": 2}))
    seeds["not_an_object.json"] = "[1, 2, 3]"
    seeds["huge_num_layers_sparse_step.json"] = json.dumps(dict(json.loads(seeds["qwen3_moe_sparse_step.json"]),
                                                                num_hidden_layers=10**15))
    seeds["huge_dims.json"] = json.dumps(dict(base, architectures=["LlamaForCausalLM"], vocab_size=2**62,
                                              hidden_size=2**40, num_attention_heads=2**39,
                                              num_key_value_heads=2**39))
    return seeds


def train_config_seeds():
    with open(os.path.join(REPO, "configs", "train", "demo.json")) as f:
        demo = f.read()
    minimal = json.dumps({"model": {"model_config": "model.json"}, "data": {"dataset": "data"},
                          "schedule": {"max_steps": 10}})
    wsd = json.dumps({"model": {"init_from": "/ckpt"}, "data": {"dataset": "d", "seq_len": 8},
                      "schedule": {"type": "wsd", "max_steps": 100, "warmup_steps": 10,
                                   "decay_steps": 20, "decay_shape": "cosine"},
                      "optimizer": {"no_decay": ["norm"], "grad_clip": 0},
                      "checkpoint": {"dir": "runs/x", "every_steps": 5, "keep_last": 2},
                      "log": {"metrics_file": "m.jsonl"}})
    return {
        "demo.json": demo,
        "minimal.json": minimal,
        "wsd_init_from.json": wsd,
        "demo_with_overrides": join_files(demo, "optimizer.lr=0.01", "schedule.type=cosine",
                                          "schedule.decay_fraction=null", "data.dataset=other"),
        "override_section": join_files(minimal, 'optimizer={"lr": 0.5, "beta1": 0.8}', "model.seed=7"),
        "override_typo": join_files(minimal, "optimizer.lrr=1"),
        "unknown_section.json": json.dumps({"modle": {}}),
        "number_overflow.json": '{"optimizer": {"lr": 1e999}}',
        "override_invalid_utf8": join_files(minimal, b"optimizer.lr=\xff\xfe"),
        "wsd_steps_overflow.json": json.dumps(dict(json.loads(minimal), schedule={
            "type": "wsd", "max_steps": 2**63 - 1, "warmup_steps": 2**63 - 1, "decay_steps": 2**63 - 1})),
        # Within the max_steps limit, warmup_steps + decay_steps still passes 2^63.
        "wsd_steps_sum_overflow.json": json.dumps(dict(json.loads(minimal), data={
            "dataset": "d", "seq_len": 1, "micro_batch_size": 1}, schedule={
            "type": "wsd", "max_steps": 2**40, "warmup_steps": 2**40, "decay_steps": 2**63 - 1})),
        "pma_step_tokens_overflow.json": json.dumps(dict(json.loads(minimal), data={
            "dataset": "d", "seq_len": 2**32, "micro_batch_size": 2**32, "grad_accum_steps": 2},
            pma={"enabled": True, "interval_tokens": 5, "every_steps": 1, "count": 2})),
    }


def token_shard_seeds():
    return {
        "u16": token_shard([0, 5, 257, 3, 1], 258),
        "u32": token_shard([70000, 1, 2], 70001),
        "empty": token_shard([], 10),
        "token_out_of_vocab": token_shard([1, 9, 10], 10),
        "truncated": token_shard([1, 2, 3], 10)[:-1],
        "newer_version": token_shard([1], 10, version=2),
        "num_tokens_overflow": token_shard([], 10, num_tokens=(1 << 63) + 5),
    }


def dataset_seeds():
    shard = token_shard([256, 5, 7, 9, 11, 13, 15, 257, 256, 1, 2, 257], 258)
    dataset = {"format_version": 1, "vocab_size": 258, "token_bytes": 2,
               "splits": {"train": {"num_tokens": 12, "num_documents": 2,
                                    "shards": [{"file": "train-00000.bin", "num_tokens": 12}]},
                          "val": {"num_tokens": 0, "num_documents": 0, "shards": []}}}
    tokenizer = {"format_version": 1, "kind": "byte", "vocab_size": 258, "bos_id": 256, "eos_id": 257}
    documents = dict(dataset, tokenizer={"kind": "byte", "vocab_size": 258, "bos_id": 256, "eos_id": 257},
                     documents=[{"relative_path": "a.txt", "split": "train", "num_tokens": 8},
                                {"relative_path": "b.txt", "split": "train", "num_tokens": 4}])
    cut = json.loads(json.dumps(documents))
    cut["documents"][1]["split"] = "train+val"
    cut["documents"][1]["num_tokens"] = 6
    two_shards = json.loads(json.dumps(dataset))
    two_shards["splits"]["train"]["shards"].append({"file": "train-00000.bin", "num_tokens": 12})
    two_shards["splits"]["train"]["num_tokens"] = 24
    return {
        "byte": join_files(json.dumps(dataset), shard, json.dumps(tokenizer)),
        "same_shard_twice": join_files(json.dumps(two_shards), shard, json.dumps(tokenizer)),
        "count_mismatch": join_files(json.dumps(dataset).replace('"num_tokens": 12}]', '"num_tokens": 13}]'),
                                     shard, json.dumps(tokenizer)),
        "sentencepiece_without_model": join_files(json.dumps(dataset), shard,
                                                  json.dumps(dict(tokenizer, kind="sentencepiece",
                                                                  model_file="tokenizer.model"))),
        "number_overflow": join_files(json.dumps(dataset).replace('"vocab_size": 258', '"vocab_size": 1e999'),
                                     shard, json.dumps(tokenizer)),
        "too_few_tokens": join_files(json.dumps(dataset).replace("12", "3"), token_shard([1, 2, 3], 258),
                                     json.dumps(dict(tokenizer, bos_id=5))),
        "documents": join_files(json.dumps(documents), shard, json.dumps(tokenizer)),
        "documents_cut_into_val": join_files(json.dumps(cut), shard, json.dumps(tokenizer)),
        "documents_not_adding_up": join_files(json.dumps(documents).replace('"num_tokens": 4}]', '"num_tokens": 5}]'),
                                              shard, json.dumps(tokenizer)),
    }


# The tiny Mixtral of checkpoint_fuzz.cpp (fuzz_model_config there) under its HF names.
CHECKPOINT_MODEL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 8, "hidden_size": 4,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
    "intermediate_size": 4, "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "num_local_experts": 2, "num_experts_per_tok": 1, "router_aux_loss_coef": 0.01,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def checkpoint_tensors():
    p = "model.layers.0."
    shapes = [("model.embed_tokens.weight", [8, 4]), (p + "input_layernorm.weight", [4]),
              (p + "self_attn.q_proj.weight", [4, 4]), (p + "self_attn.k_proj.weight", [2, 4]),
              (p + "self_attn.v_proj.weight", [2, 4]), (p + "self_attn.o_proj.weight", [4, 4]),
              (p + "post_attention_layernorm.weight", [4]), (p + "block_sparse_moe.gate.weight", [2, 4])]
    for e in range(2):
        for w in ("w1", "w3", "w2"):
            shapes.append((f"{p}block_sparse_moe.experts.{e}.{w}.weight", [4, 4]))
    shapes += [("model.norm.weight", [4]), ("lm_head.weight", [8, 4])]
    return shapes


def checkpoint_seeds():
    shapes = checkpoint_tensors()
    model = safetensors([(n, "F32", s, values(math.prod(s))) for n, s in shapes], {"format": "pt"})
    model_bf16 = safetensors([(n, "BF16", s, values(math.prod(s))) for n, s in shapes], {"format": "pt"})
    moments = []
    for n, s in shapes:
        moments.append(("exp_avg." + n, "F32", s, values(math.prod(s), 0.01)))
        moments.append(("exp_avg_sq." + n, "F32", s, values(math.prod(s), 0.001)))
    optimizer = safetensors(moments, {"format": "moeforge-adamw", "step_count": "1"})
    state = {"format_version": 1, "step": 1, "tokens_seen": 64, "lr": 0.001,
             "loader": {"epoch": 0, "position": 2}, "init_seed": 1, "data_seed": 42}
    index = {"format_version": 1, "checkpoints": [{"step": 1, "tokens_seen": 64, "path": "step-00000001"}]}
    config = json.dumps(CHECKPOINT_MODEL)
    return {
        "valid": join_files(config, model, optimizer, json.dumps(state), json.dumps(index)),
        "bf16_weights": join_files(config, model_bf16, optimizer, json.dumps(state), json.dumps(index)),
        "bad_step_count": join_files(config, model, optimizer.replace(b'"step_count":"1"', b'"step_count":"x"'),
                                     json.dumps(state), json.dumps(index)),
        "state_not_object": join_files(config, model, optimizer, "[1]", json.dumps(index)),
        "newer_index": join_files(config, model, optimizer, json.dumps(state),
                                  json.dumps(dict(index, format_version=2))),
        "no_optimizer": join_files(config, model, "", json.dumps(state), ""),
        "config_number_overflow": join_files(config.replace('"vocab_size": 8', '"vocab_size": 1e999'), model,
                                             optimizer, json.dumps(state), json.dumps(index)),
        "float_format_versions": join_files(config, model, optimizer, json.dumps(dict(state, format_version=1e300)),
                                            json.dumps(dict(index, format_version=1e300))),
        "float_index_step": join_files(config, model, optimizer, json.dumps(state),
                                       json.dumps({"format_version": 1, "checkpoints": [
                                           {"step": 1e300, "tokens_seen": 64, "path": "step-00000001"}]})),
        "index_path_outside_run": join_files(config, model, optimizer, "", json.dumps({
            "format_version": 1, "checkpoints": [{"step": 1, "tokens_seen": 64, "path": "/etc"}]})),
        "other_model": join_files(json.dumps(dict(CHECKPOINT_MODEL, num_local_experts=3)), model, optimizer,
                                  json.dumps(state), json.dumps(index)),
    }


def synth_tasks_seeds():
    """Task files of `eval --task`: every task, a hand-written file, edge cases the reader rejects."""
    def line(task, answer, **extra):
        example = {"format_version": 1, "task": task, "length": 40, "depth": 0.5,
                   "prompt": f"Some text. The value is {answer}.\nWhat is it? Answer: ", "answer": answer}
        example.update(extra)
        return json.dumps(example)
    return {
        "every_task": "\n".join([line("niah_single", "1234567"), line("niah_multikey", "7654321"),
                                  line("niah_multivalue", "1111111, 2222222"),
                                  line("vt", "ABCDE, FGHIJ")]) + "\n",
        "by_hand": '{"task": "vt", "length": 5, "depth": 0, "prompt": "p", "answer": "A"}\n\n',
        "answer_two_lines": line("niah_single", "1\n2") + "\n",
        "answer_no_item": line("vt", " , ,") + "\n",
        "depth_out_of_range": line("niah_single", "1", depth=1.5) + "\n",
        "unknown_task": line("niah_double", "1") + "\n",
        "not_json": "{not json\n",
    }


def main():
    write_corpus("safetensors", safetensors_seeds())
    write_corpus("model_weights", model_weights_seeds())
    write_corpus("model_config", model_config_seeds())
    write_corpus("train_config", train_config_seeds())
    write_corpus("token_shard", token_shard_seeds())
    write_corpus("dataset", dataset_seeds())
    write_corpus("checkpoint", checkpoint_seeds())
    write_corpus("synth_tasks", synth_tasks_seeds())


if __name__ == "__main__":
    main()
