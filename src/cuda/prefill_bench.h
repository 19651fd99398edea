// `moeforge bench prefill`: one sequence's causal prefill attention per length, dense (cuDNN's
// fused SDPA and our block-sparse kernel over every causal block) against FlexPrefill (the GPU
// pattern search, exact and fp32 side by side, then our block-sparse kernel over the selection of
// params.search), on random inputs or on the q/k/v of a real model layer
// (`moeforge generate --dump-qkv`).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ops/flex_prefill.h"

namespace moeforge::cuda {

struct PrefillBenchOptions {
  std::vector<int64_t> seqs = {8192, 32768, 65536, 131072};
  int64_t num_heads = 32, num_kv_heads = 8, head_dim = 128;
  // A dump of `generate --dump-qkv`: its heads and head_dim replace the ones above, and each
  // length runs on the first seq positions of it (a causal prefix is the prefill of that prefix);
  // lengths above its positions are errors.
  std::string qkv_file;
  // Block sets to time our kernel on besides the selection: safetensors with an I64 tensor
  // "block_idx_<seq>" [num_heads, k] of flat indices r * num_blocks + c for every length, and
  // metadata "block_size" equal to params.block_size (the public FlexPrefill kernels' format).
  std::string layout_file;
  ops::FlexPrefillParams params;
  // How the fast search's coverage selects run: "auto", "many-blocks" or "clusters"
  // (cuda/coverage_select.h's SelectPath).
  std::string select_path = "auto";
  int64_t repeats = 5;
  // Where to write a kernel timeline (cuda/kernel_timeline.h) of one more, untimed run of every
  // timed part: JSON lines tagged "seq" and "part" (the part's key without "_ms"); empty: none.
  std::string timeline_file;
  uint64_t seed = 11;
};

// Calls emit once per length, as soon as it is measured, with {"seq", "heads", ..., "gamma", ...,
// "dense_cudnn_ms", "dense_ours_ms", "flex_select_ms" (the exact search), "flex_select_fast_ms"
// (the fp32 search), "select_over_dense_cudnn", "select_fast_over_dense_cudnn",
// "search_agreement" (the fraction of (head, causal block) pairs on which the two searches agree),
// "select_path",
// "density_fast", "query_aware_heads_fast", "flex_search" (the search params.search names, whose
// selection the next keys describe), "flex_attention_ms", "density", "query_aware_heads",
// "flex_speedup_over_dense_cudnn", "dense_ours_over_cudnn" (cuDNN's dense time over ours: our
// throughput per block as a fraction of cuDNN's), "dense_cudnn_tflops", "dense_ours_tflops" (over
// the causal attention's 4 heads head_dim N (N + 1) / 2 flops), ...; with a layout file also
// "layout_ms", "layout_density", "layout_block_cost_over_dense_ours"}; a part that cannot run
// (cuDNN's head_dim limit, say) carries an "..._error" string instead of its time. Progress goes
// to stderr.
void run_prefill_bench(const PrefillBenchOptions& options,
                       const std::function<void(const nlohmann::json&)>& emit);

}  // namespace moeforge::cuda
