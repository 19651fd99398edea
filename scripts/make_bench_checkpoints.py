#!/usr/bin/env python3
"""Writes N synthetic checkpoints of one bf16 Mixtral-style model (HF layout: config.json, sharded
safetensors with model.safetensors.index.json) for the merge benchmark (scripts/bench-merge.sh).

Checkpoint k holds the same base weights (normal, std 0.02, truncated to bf16) with the low 4
mantissa bits of every element XOR-ed with checkpoint k's own random bits, so the checkpoints are
close to each other like checkpoints of one run, and all differ. Deterministic for a given --seed.
The default shape (hidden 2048, 16 layers, 8 experts of ffn 1024, vocab 32000) has 1.104B
parameters: 2.21 GB per checkpoint.

Usage: make_bench_checkpoints.py OUT_DIR [--num-checkpoints 10] [--hidden 2048] [--layers 16]
       [--experts 8] [--ffn 1024] [--heads 16] [--kv-heads 4] [--vocab 32000]
       [--max-shard-bytes 1e9] [--seed 0]
Creates OUT_DIR/ckpt-01 .. OUT_DIR/ckpt-NN (OUT_DIR/ckpt-* must not exist) and prints the size."""
import argparse
import json
import os
import struct
import sys

import numpy as np


def tensor_shapes(args):
    """[(name, shape)] in file order, HF Mixtral names."""
    head_dim = args.hidden // args.heads
    kv_dim = args.kv_heads * head_dim
    h = args.hidden
    shapes = [("model.embed_tokens.weight", (args.vocab, h))]
    for layer_idx in range(args.layers):
        p = f"model.layers.{layer_idx}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv_dim, h)),
                   (p + "self_attn.v_proj.weight", (kv_dim, h)),
                   (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "block_sparse_moe.gate.weight", (args.experts, h))]
        for expert_idx in range(args.experts):
            e = f"{p}block_sparse_moe.experts.{expert_idx}."
            shapes += [(e + "w1.weight", (args.ffn, h)), (e + "w2.weight", (h, args.ffn)),
                       (e + "w3.weight", (args.ffn, h))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (args.vocab, h))]
    return shapes


def plan_shards(shapes, max_shard_bytes):
    """[[(name, shape)]] filled greedily up to max_shard_bytes of bf16 data."""
    shards, size = [[]], 0
    for name, shape in shapes:
        num_bytes = 2 * int(np.prod(shape))
        if shards[-1] and size + num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += num_bytes
    return shards


def header_bytes(shard):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        num_bytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + num_bytes]}
        offset += num_bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text


def config_json(args):
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": args.hidden, "intermediate_size": args.ffn,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads, "num_local_experts": args.experts,
            "num_experts_per_tok": 2, "vocab_size": args.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def base_bits(rng, shape):
    """bf16 bit patterns of normal(0, 0.02) values (truncated: synthetic data)."""
    values = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
    values *= np.float32(0.02)
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-checkpoints", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-bytes", type=float, default=1e9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shapes = tensor_shapes(args)
    shards = plan_shards(shapes, int(args.max_shard_bytes))
    num_shards = len(shards)
    file_names = ([f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
                  if num_shards > 1 else ["model.safetensors"])
    ckpt_dirs = [os.path.join(args.out_dir, f"ckpt-{k + 1:02d}") for k in range(args.num_checkpoints)]
    for ckpt_dir in ckpt_dirs:
        os.makedirs(ckpt_dir)  # fails if it exists: never overwrite
        with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
            json.dump(config_json(args), f, indent=2)
        if num_shards > 1:
            weight_map = {name: file_names[shard_idx]
                          for shard_idx, shard in enumerate(shards) for name, _ in shard}
            total = sum(2 * int(np.prod(shape)) for _, shape in shapes)
            with open(os.path.join(ckpt_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    base_rng = np.random.default_rng(args.seed)
    noise_rngs = [np.random.default_rng([args.seed, k + 1]) for k in range(args.num_checkpoints)]
    for shard_idx, shard in enumerate(shards):
        files = [open(os.path.join(d, file_names[shard_idx]), "wb") for d in ckpt_dirs]
        prefix = header_bytes(shard)
        for f in files:
            f.write(prefix)
        for name, shape in shard:
            base = base_bits(base_rng, shape)
            for f, rng in zip(files, noise_rngs):
                noise = np.frombuffer(rng.bytes(2 * base.size), dtype=np.uint16)
                (base ^ (noise & np.uint16(0xF))).tofile(f)
        for f in files:
            f.close()
        print(f"shard {shard_idx + 1}/{num_shards} written", file=sys.stderr, flush=True)

    num_params = sum(int(np.prod(shape)) for _, shape in shapes)
    print(json.dumps({"checkpoints": ckpt_dirs, "num_params": num_params,
                      "bytes_per_checkpoint": 2 * num_params, "num_shards": num_shards}))


if __name__ == "__main__":
    main()
