// Validation, summary and JSON of the sparse prefill attention setting (see prefill_attention.h).
#include "model/prefill_attention.h"

#include <cmath>

namespace moeforge {

void check_prefill_attention(const PrefillAttention& attention) {
  if (attention.flex) ops::check_flex_prefill_params(attention.params);
}

PrefillStatsSummary summarize_prefill_stats(const std::vector<PrefillLayerStats>& layers) {
  PrefillStatsSummary summary;
  double density_sum = 0.0;
  for (const PrefillLayerStats& layer : layers) {
    summary.num_dense_fallback += layer.dense_fallback;
    for (const ops::FlexPrefillHeadStats& head : layer.head_stats) {
      ++summary.num_heads;
      summary.num_query_aware += head.query_aware;
      density_sum += head.density;
    }
  }
  if (summary.num_heads > 0) summary.mean_density = density_sum / summary.num_heads;
  return summary;
}

nlohmann::json flex_prefill_params_json(const ops::FlexPrefillParams& params) {
  return {{"gamma", params.gamma},           {"tau", params.tau},
          {"min_budget", params.min_budget}, {"max_budget", params.max_budget},
          {"block_size", params.block_size}, {"search", ops::flex_search_name(params.search)}};
}

nlohmann::json prefill_stats_json(const std::vector<PrefillLayerStats>& layers) {
  const PrefillStatsSummary summary = summarize_prefill_stats(layers);
  nlohmann::json json_layers = nlohmann::json::array();
  for (size_t layer_idx = 0; layer_idx < layers.size(); ++layer_idx) {
    nlohmann::json heads = nlohmann::json::array();
    const std::vector<ops::FlexPrefillHeadStats>& head_stats = layers[layer_idx].head_stats;
    for (size_t head_idx = 0; head_idx < head_stats.size(); ++head_idx) {
      const ops::FlexPrefillHeadStats& s = head_stats[head_idx];
      heads.push_back({{"head", head_idx},
                       {"density", s.density},
                       {"query_aware", s.query_aware},
                       {"js_distance", std::isfinite(s.js_distance) ? nlohmann::json(s.js_distance)
                                                                    : nlohmann::json(nullptr)},
                       {"num_vertical_blocks", s.num_vertical_blocks},
                       {"num_slash_blocks", s.num_slash_blocks},
                       {"num_selected_blocks", s.num_selected_blocks}});
    }
    json_layers.push_back({{"layer", layer_idx},
                           {"dense_fallback", layers[layer_idx].dense_fallback},
                           {"heads", std::move(heads)}});
  }
  return {{"mean_density", summary.mean_density},
          {"query_aware_heads", summary.num_query_aware},
          {"dense_fallback_layers", summary.num_dense_fallback},
          {"layers", std::move(json_layers)}};
}

}  // namespace moeforge
