// Q/K/V of one attention layer after a prompt's prefill (`moeforge generate --dump-qkv LAYER
// FILE`), for benchmarking and testing prefill attention on real activations: a safetensors file
// with F32 tensors q [N, num_heads, head_dim], k and v [N, num_kv_heads, head_dim] as attention
// reads them (after q/k norm and RoPE), and metadata naming the format, layer and shapes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "model/transformer.h"

namespace moeforge {

struct PrefillQkv {
  int64_t layer = 0;
  int64_t num_positions = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  std::vector<float> q, k, v;  // token-major, as above
};

// Layer `layer` of `model` right after a prefill of cache.length positions into an empty cache.
PrefillQkv capture_prefill_qkv(const Transformer<float>& model, const KvCache<float>& cache,
                               int64_t layer);

// Written atomically; metadata "format": "moeforge-prefill-qkv", "format_version": "1", "layer",
// "num_heads", "num_kv_heads", "head_dim".
void write_prefill_qkv(const std::filesystem::path& path, const PrefillQkv& qkv);
// Checks the format, the three tensors' dtypes and shapes against the metadata (errors name the
// file and what is wrong).
PrefillQkv read_prefill_qkv(const std::filesystem::path& path);

}  // namespace moeforge
