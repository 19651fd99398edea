#!/usr/bin/env python3
"""Independent reference of `moeforge merge` (numpy + the safetensors package), for bit-exact checks.

The pinned arithmetic, written again from its definition (src/merge/merge.h):
  weights in fp64 (SMA 1/N, WMA 2i/(N(N+1)), EMA by its recursion's order, or custom), rounded once
  to fp32 (fp32 mode) or kept (fp64 mode); inputs converted exactly (F64 rounded to fp32 in fp32
  mode); per element acc = w_1 x_1, then acc = acc + w_i x_i for i = 2..N, each operation rounded
  in the accumulation type (numpy does one IEEE operation per array op, never a fused one); the
  result rounded to nearest even into the output dtype: BF16 from fp32 on the uint32 bit pattern,
  BF16/F16 from fp64 by scaling to the target grid and rint (not through fp32); integer tensors
  copied from the newest input.

Usage: reference_merge.py [--method sma|ema|wma] [--alpha A] [--weights w,...] [--accumulate fp32|fp64]
       [--dtype F32|BF16|F16] --compare MERGED_DIR INPUT_DIR...   (exit status 1 on any difference)
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
from safetensors import safe_open

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                "BOOL": np.bool_}
FLOATING = ("F64", "F32", "F16", "BF16")


def merge_weights(method, n, alpha=None, custom=None):
    """fp64 weights of n checkpoints, oldest first."""
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        return [2 * i / (n * (n + 1)) for i in range(1, n + 1)]
    if method == "ema":
        weights = []
        for i in range(n):
            w = 1.0 if i == 0 else alpha
            for _ in range(i + 1, n):
                w = (1.0 - alpha) * w
            weights.append(w)
        return weights
    if method == "custom":
        assert len(custom) == n
        return [float(w) for w in custom]
    raise ValueError(method)


def read_header(path):
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def weight_files(model_dir):
    """{tensor name: file} of a model directory (single file or shards with an index)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {name: os.path.join(model_dir, file) for name, file in json.load(f)["weight_map"].items()}
    path = os.path.join(model_dir, "model.safetensors")
    header, _ = read_header(path)
    return {name: path for name in header}


def read_model(model_dir):
    """{name: (dtype, shape, raw little-endian bytes)}, read by our own header parser."""
    tensors = {}
    for name, path in weight_files(model_dir).items():
        header, data_start = read_header(path)
        entry = header[name]
        begin, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            raw = f.read(end - begin)
        assert len(raw) == end - begin, f"{path}: {name} truncated"
        tensors[name] = (entry["dtype"], tuple(entry["shape"]), raw)
    return tensors


def read_values(model_dir):
    """{name: (dtype, shape, numpy array)}: through the safetensors package where numpy has the dtype,
    our own parser for BF16 (as uint16 bit patterns)."""
    raw = read_model(model_dir)
    files = weight_files(model_dir)
    values = {}
    for name, (dtype, shape, data) in raw.items():
        if dtype == "BF16":
            values[name] = (dtype, shape, np.frombuffer(data, dtype="<u2").reshape(shape))
        else:
            with safe_open(files[name], framework="numpy") as f:
                values[name] = (dtype, shape, f.get_tensor(name))
    return values


def to_accumulator(dtype, array, acc_type):
    if dtype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(acc_type)  # exact, except F64 inputs in fp32 mode (rounded to nearest)


def fp32_to_bf16_bits(values):
    """Round to nearest even on the uint32 patterns; NaN keeps its sign and gets the quiet bit."""
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def round_fp64_on_grid(values, mantissa_bits, min_exponent):
    """Nearest value with mantissa_bits explicit bits (exponent clamped below at min_exponent), ties
    to even: scale by the unit in the last place (a power of two: exact), rint, scale back."""
    _, exponent = np.frexp(values)  # values = f 2^exponent, 0.5 <= |f| < 1 (exponent 0 for 0)
    ulp_exponent = np.maximum(exponent - 1, min_exponent) - mantissa_bits
    return np.ldexp(np.rint(np.ldexp(values, -ulp_exponent)), ulp_exponent)


def round_output(acc, out_dtype):
    if acc.dtype == np.float32:
        if out_dtype == "BF16":
            return fp32_to_bf16_bits(acc)
        return acc.astype(NUMPY_DTYPES[out_dtype])
    if out_dtype == "BF16":
        with np.errstate(over="ignore"):
            grid = round_fp64_on_grid(acc, 7, -126).astype(np.float32)  # exact, or inf past the range
        return fp32_to_bf16_bits(np.where(np.isnan(acc), np.float32(np.nan), grid))
    if out_dtype == "F16":
        with np.errstate(over="ignore"):
            return round_fp64_on_grid(acc, 10, -14).astype(np.float16)  # exact, or inf
    return acc.astype(NUMPY_DTYPES[out_dtype])


def merge(input_dirs, weights, accumulate="fp32", out_dtype=None):
    """{name: (dtype, shape, bytes)} of the merge of input_dirs (oldest first)."""
    acc_type = np.float32 if accumulate == "fp32" else np.float64
    models = [read_values(d) for d in input_dirs]
    merged = {}
    for name, (dtype, shape, newest) in models[-1].items():
        if dtype not in FLOATING:
            merged[name] = (dtype, shape, newest.tobytes())
            continue
        acc = None
        for model, weight in zip(models, weights):
            x = to_accumulator(dtype, model[name][2], acc_type)
            product = acc_type(weight) * x
            acc = product if acc is None else acc + product
        target = out_dtype or dtype
        merged[name] = (target, shape, round_output(acc, target).astype(NUMPY_DTYPES[target]).tobytes())
    return merged


def compare(merged_dir, expected):
    """Differences between a merged directory and the reference, as messages (empty: identical)."""
    found = read_model(merged_dir)
    problems = []
    if sorted(found) != sorted(expected):
        problems.append(f"tensor names differ: {sorted(set(found) ^ set(expected))}")
    for name in sorted(set(found) & set(expected)):
        if found[name][:2] != expected[name][:2]:
            problems.append(f"{name}: dtype/shape {found[name][:2]} != reference {expected[name][:2]}")
        elif found[name][2] != expected[name][2]:
            a, b = np.frombuffer(found[name][2], np.uint8), np.frombuffer(expected[name][2], np.uint8)
            first = int(np.flatnonzero(a != b)[0])
            problems.append(f"{name}: bytes differ (first at byte {first} of {len(a)})")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sma", choices=["sma", "ema", "wma"])
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--weights")
    parser.add_argument("--accumulate", default="fp32", choices=["fp32", "fp64"])
    parser.add_argument("--dtype", choices=["F32", "BF16", "F16"])
    parser.add_argument("--compare", required=True, help="merged directory to check")
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    if args.weights:
        weights = merge_weights("custom", len(args.inputs), custom=args.weights.split(","))
    else:
        weights = merge_weights(args.method, len(args.inputs), args.alpha)
    problems = compare(args.compare, merge(args.inputs, weights, args.accumulate, args.dtype))
    for problem in problems:
        print(problem)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
