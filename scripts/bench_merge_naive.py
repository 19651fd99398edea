#!/usr/bin/env python3
"""The naive baseline of the merge benchmark (scripts/bench-merge.sh): load every tensor of every
input checkpoint into memory, then average (SMA, the pinned arithmetic of `moeforge merge`: fp32,
acc = w x_1, then acc = acc + w x_i, round to nearest even back to bf16), keep the merged model in
memory and save it as one model.safetensors. Peak memory is about N x the model size plus the
merged model; numpy only (bf16 handled as uint16 bit patterns).

Usage: bench_merge_naive.py --out DIR INPUT_DIR...      merge (DIR must not exist)
       bench_merge_naive.py --compare DIR_A DIR_B       exit 1 unless both models hold the same
                                                        tensors bit for bit (read one at a time)"""
import argparse
import json
import os
import struct
import sys

import numpy as np

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def tensor_locations(model_dir):
    """{name: (file, dtype, shape, byte offset, num bytes)} of a single-file or sharded model."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    locations = {}
    for file in files:
        path = os.path.join(model_dir, file)
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            locations[name] = (path, entry["dtype"], tuple(entry["shape"]), 8 + header_size + begin,
                               end - begin)
    return locations


def read_tensor(location):
    path, dtype, shape, offset, num_bytes = location
    if dtype not in NUMPY_DTYPES:
        sys.exit(f"{path}: dtype {dtype} is not handled by this baseline (floating tensors only)")
    array = np.fromfile(path, dtype=NUMPY_DTYPES[dtype], count=num_bytes // np.dtype(NUMPY_DTYPES[dtype]).itemsize,
                        offset=offset)
    return dtype, array.reshape(shape)


def to_fp32(dtype, array):
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def from_fp32(dtype, values):
    if dtype == "BF16":
        bits = values.view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return values.astype(NUMPY_DTYPES[dtype])


def save(path, tensors):
    header, offset = {}, 0
    for name, (dtype, array) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, array in tensors.values():
            array.tofile(f)
        f.flush()
        os.fsync(f.fileno())  # as durable as `moeforge merge`, which fsyncs its output


def merge(input_dirs, out_dir):
    os.makedirs(out_dir)
    # Load everything first: [input][name] -> (dtype, array as stored).
    loaded = [{name: read_tensor(loc) for name, loc in tensor_locations(d).items()} for d in input_dirs]
    weight = np.float32(1.0 / len(input_dirs))
    merged = {}
    for name, (dtype, first) in loaded[0].items():
        acc = weight * to_fp32(dtype, first)
        for model in loaded[1:]:
            acc = acc + weight * to_fp32(dtype, model[name][1])
        merged[name] = (dtype, from_fp32(dtype, acc))
    save(os.path.join(out_dir, "model.safetensors"), merged)


def compare(dir_a, dir_b):
    a, b = tensor_locations(dir_a), tensor_locations(dir_b)
    if sorted(a) != sorted(b):
        sys.exit(f"tensor names differ between {dir_a} and {dir_b}")
    for name in a:
        if not np.array_equal(read_tensor(a[name])[1], read_tensor(b[name])[1]):
            sys.exit(f"tensor {name} differs between {dir_a} and {dir_b}")
    print(f"identical: {len(a)} tensors")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("dirs", nargs="+")
    args = parser.parse_args()
    if args.compare:
        if len(args.dirs) != 2:
            parser.error("--compare takes two model directories")
        compare(*args.dirs)
    else:
        if not args.out:
            parser.error("--out DIR is required to merge")
        merge(args.dirs, args.out)


if __name__ == "__main__":
    main()
