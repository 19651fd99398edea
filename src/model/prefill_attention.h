// Opt-in sparse prefill attention of the inference path (FlexPrefill, ops/flex_prefill.h): the
// setting a Transformer applies to its prefills, the per-layer statistics of the last one, and
// their JSON form and summary.
//
// A forward_incremental / forward_prefill call is a sparse prefill when flex is on, the cache is
// empty and it runs more than one token: then every layer picks its block set with
// ops::flex_prefill_select on that layer's q and k (after RoPE) and attends with
// ops::block_sparse_attention_forward. Decode steps, prefills that continue a non-empty cache and
// the training forward/backward stay dense.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <vector>

#include "ops/flex_prefill.h"

namespace moeforge {

struct PrefillAttention {
  bool flex = false;  // false: dense attention everywhere
  ops::FlexPrefillParams params;
};

// The selection of one layer in the last sparse prefill.
struct PrefillLayerStats {
  bool dense_fallback = false;                        // the sequence was too short to be sparse
  std::vector<ops::FlexPrefillHeadStats> head_stats;  // [num_heads]
};

struct PrefillStatsSummary {
  int64_t num_heads = 0;           // (layer, head) pairs
  int64_t num_query_aware = 0;     // of those, the query-aware heads
  int64_t num_dense_fallback = 0;  // layers that took the dense fallback
  double mean_density = 0.0;       // mean over the (layer, head) pairs
};

// Throws moeforge::Error naming the field if attention.params is invalid (flex only).
void check_prefill_attention(const PrefillAttention& attention);

PrefillStatsSummary summarize_prefill_stats(const std::vector<PrefillLayerStats>& layers);

// {"gamma", "tau", "min_budget", "max_budget", "block_size", "search" ("exact" or "fast")}
nlohmann::json flex_prefill_params_json(const ops::FlexPrefillParams& params);

// {"mean_density", "query_aware_heads", "dense_fallback_layers", "layers": [{"layer",
// "dense_fallback", "heads": [{"head", "density", "query_aware", "js_distance" (null in the dense
// fallback), "num_vertical_blocks", "num_slash_blocks", "num_selected_blocks"}]}]}
nlohmann::json prefill_stats_json(const std::vector<PrefillLayerStats>& layers);

}  // namespace moeforge
