// Registration and validation of the prefill attention options (see attention_options.h).
#include "cli/attention_options.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace moeforge::cli {

const char* const kFlexSearchHelp =
    "flex, GPU only: fast (bf16 tensor cores and fp32, several times quicker: decisions within "
    "fp32 noise of a threshold may differ from the reference's) or exact (the reference's fp64 "
    "pattern search, bit for bit); the CPU always searches exactly";

ops::FlexSearch parse_flex_search(const std::string& name) {
  MF_CHECK(name == "exact" || name == "fast", "--flex-search must be exact or fast, got '{}'",
           name);
  return name == "fast" ? ops::FlexSearch::kFp32 : ops::FlexSearch::kExact;
}

void add_attention_options(CLI::App* cmd, AttentionOptions& opts) {
  cmd->add_option(
         "--attention", opts.attention,
         "Prefill attention: dense, or flex (FlexPrefill block-sparse; decode stays dense)")
      ->capture_default_str();
  cmd->add_option("--gamma", opts.gamma, "flex: attention coverage of the selected blocks, (0, 1]")
      ->capture_default_str();
  cmd->add_option("--tau", opts.tau, "flex: JS-distance threshold of query-aware heads, >= 0")
      ->capture_default_str();
  cmd->add_option("--min-budget", opts.min_budget, "flex: least tokens per pattern, >= 1")
      ->capture_default_str();
  cmd->add_option("--max-budget", opts.max_budget,
                  "flex: most tokens per pattern (0 = unlimited, else >= --min-budget)")
      ->capture_default_str();
  cmd->add_option("--block-size", opts.block_size, "flex: block size, 64 or 128")
      ->capture_default_str();
  cmd->add_option("--flex-search", opts.flex_search, kFlexSearchHelp)->capture_default_str();
}

PrefillAttention parse_attention_options(const AttentionOptions& opts, const std::string& device) {
  MF_CHECK(opts.attention == "dense" || opts.attention == "flex",
           "--attention must be dense or flex, got '{}'", opts.attention);
  MF_CHECK(opts.gamma > 0.0 && opts.gamma <= 1.0, "--gamma must be in (0, 1], got {}", opts.gamma);
  MF_CHECK(std::isfinite(opts.tau) && opts.tau >= 0.0,
           "--tau must be a finite value >= 0 (0: no query-aware heads), got {}", opts.tau);
  MF_CHECK(opts.min_budget >= 1, "--min-budget must be >= 1 token, got {}", opts.min_budget);
  MF_CHECK(opts.max_budget <= 0 || opts.max_budget >= opts.min_budget,
           "--max-budget must be 0 (unlimited) or >= --min-budget ({}), got {}", opts.min_budget,
           opts.max_budget);
  MF_CHECK(opts.block_size == 64 || opts.block_size == 128,
           "--block-size must be 64 or 128, got {}", opts.block_size);
  PrefillAttention attention;
  attention.flex = opts.attention == "flex";
  attention.params =
      ops::FlexPrefillParams{opts.gamma,      opts.tau,        opts.min_budget,
                             opts.max_budget, opts.block_size, parse_flex_search(opts.flex_search)};
  if (device == "cpu") attention.params.search = ops::FlexSearch::kExact;
  check_prefill_attention(attention);
  return attention;
}

}  // namespace moeforge::cli
